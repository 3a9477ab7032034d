"""Sparse codes of features from a trained SAE (`encode`; the model is :mod:`workers.sae`)."""

from __future__ import annotations

import numpy as np
import torch
from saelect.workers.codes import SparseCodes
from saelect.workers.progress import batch_ranges
from saelect.workers.sae import ENCODE_DTYPES, TopKSAE

__all__ = ["encode"]

_F16_MAX = 65504.0


def _first_nonfinite_row(x_ND: np.ndarray) -> int | None:
    """Position of the first row holding NaN/inf, or None when every value is finite."""
    finite_N = np.isfinite(x_ND).all(axis=1)
    return None if finite_N.all() else int(np.flatnonzero(~finite_N)[0])


def encode(model: TopKSAE, features_ND: np.ndarray, *, batch_size: int = 8192) -> SparseCodes:
    """Sparse codes of raw features (N, D): ids int32 (N, k), values float16 (N, k).

    Per sample exactly k entries with distinct ids, in decreasing order of value; values are
    >= 0 (a 0 is an inactive entry) and clipped to the float16 range. Runs on the model's device
    in batches of ``batch_size`` under ``torch.inference_mode``, in ``model.encode_dtype``
    (`SAEConfig.encode_dtype`: float32, or bfloat16 for speed).

    Raises ValueError for a wrong feature dim or NaN/inf features.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    f_ND = np.asarray(features_ND)
    if f_ND.ndim != 2 or f_ND.shape[1] != model.d_in:
        raise ValueError(f"features must have shape (N, {model.d_in}), got {f_ND.shape}")
    n, k = f_ND.shape[0], model.k
    dtype = ENCODE_DTYPES[model.encode_dtype]
    ids = np.empty((n, k), dtype=np.int32)
    values = np.empty((n, k), dtype=np.float16)
    device = model.W_enc.device
    with torch.inference_mode():
        for start, stop in batch_ranges(n, batch_size):
            part = np.ascontiguousarray(f_ND[start:stop], dtype=np.float32)
            row = _first_nonfinite_row(part)
            if row is not None:
                raise ValueError(f"features have a non-finite value (NaN/inf) in row {start + row}")
            out = model.encode_topk(torch.from_numpy(part).to(device), dtype=dtype)
            ids[start:stop] = out.top_indices_BK.to(torch.int32).cpu().numpy()
            vals = out.top_acts_BK.clamp(max=_F16_MAX).to(torch.float16)
            values[start:stop] = vals.cpu().numpy()
    return SparseCodes(ids, values)
