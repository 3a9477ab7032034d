"""The ``module`` extractor: a user's frozen torch module, by import path, batched.

``spec.module = "pkg.mod:factory"``; ``factory()`` returns an ``nn.Module`` mapping a float32
batch (B, ...) (the column's rows as stored, e.g. (B, 784) pixels) to (B, ...) features, which
are flattened per row. Runs under ``torch.no_grad`` in eval mode, on CUDA when available.
Which modules a service accepts is the service's allow-list (``service.specs``), not this file's.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
from saelect.workers.features.base import (
    FeatureSpec,
    as_float_matrix,
    dim_from_state,
    dim_state,
    map_batches,
    require_fitted,
)

__all__ = ["ModuleExtractor", "load_factory"]


def load_factory(path: str) -> Any:
    """The callable at ``"pkg.mod:attr"`` (attr may be dotted).

    Raises ValueError when the module or attribute does not exist or is not callable.
    """
    mod_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {mod_name!r} of {path!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{path!r}: {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{path!r} is not callable")
    return obj


class ModuleExtractor:
    """Features from ``factory()`` (an ``nn.Module``) applied batch by batch."""

    def __init__(self, spec: FeatureSpec, device: str | None = None) -> None:
        self.spec = spec
        self.device = device
        self.out_dim: int | None = None
        self._model: Any = None

    def _module(self) -> Any:
        if self._model is None:
            import torch

            if self.spec.module is None:
                raise ValueError(f"module extractor needs spec.module, got {self.spec!r}")
            model = load_factory(self.spec.module)()
            if not isinstance(model, torch.nn.Module):
                raise ValueError(
                    f"{self.spec.module!r} returned {type(model).__name__}, not a torch nn.Module"
                )
            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            self.device = device
            self._model = model.to(device).eval()
        return self._model

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        model = self._module()
        x_B = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        with torch.no_grad():
            out = model(x_B)
        out_BF = out.reshape(out.shape[0], -1).float().cpu().numpy()
        if not np.isfinite(out_BF).all():
            raise ValueError(f"module {self.spec.module!r} produced non-finite features")
        return out_BF

    def fit(self, sample: Any) -> None:
        """Run the module on up to one batch of ``sample`` to learn the output dim."""
        x_ND = as_float_matrix(sample, f"column {self.spec.column!r}")
        if x_ND.shape[0] < 1:
            raise ValueError("module extractor needs at least 1 row to fit")
        out_dim = int(self._run(np.asarray(sample)[: self.spec.batch_size]).shape[1])
        if self.spec.dim is not None and out_dim != self.spec.dim:
            raise ValueError(
                f"module {self.spec.module!r} gives {out_dim}-d features, the spec says "
                f"{self.spec.dim}"
            )
        self.out_dim = out_dim

    def transform(self, values: Any, *, progress: bool = True) -> np.ndarray:
        """float32 (n, out_dim) module outputs, flattened per row."""
        out_dim = require_fitted(self.out_dim, "module")
        arr = np.asarray(values)
        as_float_matrix(arr[:1], f"column {self.spec.column!r}")  # numeric check, cheap
        if not np.isfinite(np.asarray(arr, dtype=np.float32)).all():
            as_float_matrix(arr, f"column {self.spec.column!r}")  # raises naming the row
        return map_batches(
            self._run, arr, out_dim, self.spec.batch_size, progress=progress, desc="module"
        )

    def state_dict(self) -> dict[str, np.ndarray]:
        """``{"out_dim": int64 scalar}`` (the weights come from the factory)."""
        return dim_state(self.out_dim, "module")

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore from `state_dict`."""
        self.out_dim = dim_from_state(state)
