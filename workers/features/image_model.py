"""The ``image_model`` extractor: a pretrained image backbone's pooled penultimate features.

``spec.library`` picks where the backbone comes from (``spec.model`` names it):

- ``timm`` (default): ``timm.create_model(model, num_classes=0)``, which returns the pooled
  pre-logits features. Weights: ``spec.weights`` (a local file, loaded through timm's
  ``pretrained_cfg_overlay={"file": ...}``, which drops the classifier's tensors), or timm's
  pretrained weights from the local Hugging Face cache.
- ``torchvision``: ``torchvision.models.get_model(model)`` with the last ``nn.Linear`` (the
  classifier) replaced by the identity. Weights: ``spec.weights`` (a state dict file), or the
  ``DEFAULT`` weights from torch's local hub cache.
- ``transformers``: ``AutoModel.from_pretrained(model, local_files_only=True)``, ``model`` being
  a local directory (``save_pretrained``) or a name in the local Hugging Face cache; features are
  ``pooler_output`` when the model has one, else the mean of ``last_hidden_state`` over tokens
  or positions.

Nothing is downloaded (``HF_HUB_OFFLINE=1``). Images (`workers.features.images`) are resized to
``spec.image_size`` (default 224), scaled to [0, 1] and normalized with the backbone's mean and
std (timm's pretrained config, else ImageNet's). Batches of ``spec.batch_size`` run under
``torch.no_grad`` in eval mode, on CUDA when the process sees a GPU. The weights must be
readable at the same path on every node that scores.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
from saelect.workers.features.base import (
    FeatureSpec,
    dim_from_state,
    dim_state,
    map_batches,
    require_fitted,
)
from saelect.workers.features.images import decode_images

__all__ = ["DEFAULT_IMAGE_SIZE", "ImageModelExtractor", "load_backbone", "load_weights_file"]

DEFAULT_IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Backbone = tuple[Any, tuple[float, ...], tuple[float, ...]]
"""(callable (B, 3, S, S) -> (B, F) features, channel mean, channel std)."""
_BACKBONES: dict[tuple[Any, ...], Backbone] = {}
_LOCK = threading.Lock()


def load_weights_file(path: str) -> dict[str, Any]:
    """A state dict (name -> tensor) from ``.safetensors`` or a torch file (``.pth``, ``.pt``,
    ``.bin``; loaded with ``weights_only=True``, unwrapping a ``state_dict``/``model`` entry).

    Raises
    ------
    ValueError
        When the file is missing or holds no state dict.
    """
    import torch

    if not os.path.isfile(path):
        raise ValueError(f"weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return dict(load_file(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"weights file {path!r} holds no state dict of tensors")
    return state


def _drop_classifier(model: Any, name: str) -> None:
    """Replace the last ``nn.Linear`` of ``model`` (its classifier) by the identity."""
    import torch

    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError(f"torchvision model {name!r} has no nn.Linear classifier to drop")
    parent, _, child = linears[-1].rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, torch.nn.Identity())


class _Pooled:
    """Calls a transformers model on pixel values; (B, F) pooled features."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, x_BCHW: Any) -> Any:
        out = self.model(pixel_values=x_BCHW)
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return pooled.reshape(pooled.shape[0], -1)
        hidden = out.last_hidden_state  # (B, T, H) tokens or (B, C, H, W) feature maps
        return hidden.mean(dim=1) if hidden.ndim == 3 else hidden.flatten(2).mean(dim=2)


def _build(spec: FeatureSpec) -> tuple[Any, Backbone]:
    """(the torch module, the `Backbone` calling it) on the CPU, in eval mode."""
    library, name = spec.library or "timm", str(spec.model)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if library == "timm":
        import timm

        if spec.weights is not None:
            load_weights_file(spec.weights)  # a clear error for a missing or bad file first
            overlay = {"file": spec.weights}
            model = timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0
            )
        else:
            model = timm.create_model(name, pretrained=True, num_classes=0)
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        mean = tuple(cfg.get("mean", mean))
        std = tuple(cfg.get("std", std))
        return model.eval(), (model, mean, std)
    if library == "torchvision":
        from torchvision import models

        model = models.get_model(name, weights=None if spec.weights else "DEFAULT")
        if spec.weights is not None:
            model.load_state_dict(load_weights_file(spec.weights))
        _drop_classifier(model, name)
        return model.eval(), (model, mean, std)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(name, local_files_only=True).eval()
    return model, (_Pooled(model), mean, std)


def load_backbone(spec: FeatureSpec, device: str) -> Backbone:
    """The `Backbone` of ``spec`` on ``device``, loaded once per process.

    Raises
    ------
    ImportError
        With the install command when the library is missing.
    """
    key = (spec.library, spec.model, spec.weights, device)
    with _LOCK:
        if key not in _BACKBONES:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            try:
                module, backbone = _build(spec)
            except ImportError as exc:
                raise ImportError(
                    f"image_model with library {spec.library or 'timm'!r} needs it installed: "
                    f"pip install 'saelect[vision]' ({exc})"
                ) from exc
            module.to(device)
            _BACKBONES[key] = backbone
        return _BACKBONES[key]


class ImageModelExtractor:
    """Pooled penultimate features of a pretrained backbone on encoded images: float32 (n, F)."""

    def __init__(self, spec: FeatureSpec, device: str | None = None) -> None:
        self.spec = spec
        self.device = device
        self.size = spec.image_size or DEFAULT_IMAGE_SIZE
        self.out_dim: int | None = None

    def _run(self, rows: list[Any]) -> np.ndarray:
        """float32 (B, F) features of B encoded images."""
        import torch

        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        fn, mean, std = load_backbone(self.spec, self.device)
        x_BCHW = torch.from_numpy(decode_images(rows, self.size)).to(self.device)
        mean_C = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        std_C = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        with torch.no_grad():
            out = fn((x_BCHW - mean_C) / std_C)
        out_BF = out.reshape(out.shape[0], -1).float().cpu().numpy()
        if not np.isfinite(out_BF).all():
            raise ValueError(f"image model {self.spec.model!r} produced non-finite features")
        return out_BF

    def fit(self, sample: Any) -> None:
        """Run the backbone on the first rows of ``sample`` to learn the feature dim."""
        rows = list(sample)
        if not rows:
            raise ValueError("image_model extractor needs at least 1 row to fit")
        out_dim = int(self._run(rows[:2]).shape[1])
        if self.spec.dim is not None and out_dim != self.spec.dim:
            raise ValueError(
                f"image model {self.spec.model!r} gives {out_dim}-d features, the spec says "
                f"{self.spec.dim}"
            )
        self.out_dim = out_dim

    def transform(self, values: Any, *, progress: bool = True) -> np.ndarray:
        """float32 (n, out_dim) features of ``values`` (n encoded images)."""
        out_dim = require_fitted(self.out_dim, "image_model")
        return map_batches(
            self._run, list(values), out_dim, self.spec.batch_size, progress=progress, desc="images"
        )

    def state_dict(self) -> dict[str, np.ndarray]:
        """``{"out_dim": int64 scalar}`` (the weights are the backbone's files)."""
        return dim_state(self.out_dim, "image_model")

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore from `state_dict`."""
        self.out_dim = dim_from_state(state)
