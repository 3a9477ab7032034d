"""A trained SAE on disk: `save_sae` writes ``sae.safetensors`` then ``sae.json``, `load_sae`
reads them back bit-exact (the model is :mod:`workers.sae`)."""

from __future__ import annotations

import dataclasses
import json
import os

from saelect.workers.sae import SAEConfig, TopKSAE

__all__ = ["load_sae", "save_sae"]

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "sae.json"


def save_sae(
    model: TopKSAE, directory: str | os.PathLike[str], config: SAEConfig | None = None
) -> None:
    """Write ``sae.safetensors`` (weights and buffers) then ``sae.json`` (shape and config).

    ``sae.json`` is written last, so its presence marks a complete save.
    """
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE))
    meta = {
        "d_in": model.d_in,
        "units": model.units,
        "k": model.k,
        "activation": model.activation,
        "aux_k": model.aux_k,
        "encode_dtype": model.encode_dtype,
        "config": dataclasses.asdict(config) if config is not None else None,
    }
    tmp = os.path.join(directory, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(directory, CONFIG_FILE))


def load_sae(directory: str | os.PathLike[str], device: str = "cpu") -> TopKSAE:
    """The SAE `save_sae` wrote (bit-exact weights), in eval mode on ``device``.

    Raises FileNotFoundError when a file is missing, ValueError when they disagree.
    """
    from safetensors.torch import load_file

    with open(os.path.join(directory, CONFIG_FILE)) as f:
        meta = json.load(f)
    model = TopKSAE(
        int(meta["d_in"]),
        int(meta["units"]),
        int(meta["k"]),
        activation=str(meta["activation"]),
        aux_k=meta.get("aux_k"),
    )
    model.encode_dtype = str(meta.get("encode_dtype", "float32"))
    state = load_file(os.path.join(directory, WEIGHTS_FILE))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{directory}: weights do not match sae.json: {exc}") from exc
    return model.to(device).eval()
