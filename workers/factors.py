"""Factor statistics of sparse codes (docs/architecture.md, The method 3): counts, frequencies
p, alive units, profiles.

A unit ("factor") j is active in sample i when it is among the sample's k stored entries with a
value > 0. Counts add over shards, so the global frequencies are
``p = sum_s factor_counts(codes_s, M) / N``.

Example:
    >>> import numpy as np
    >>> from workers.codes import SparseCodes
    >>> codes = SparseCodes(np.array([[0, 1], [0, 2]]), np.array([[1.0, 0.0], [2.0, 1.0]]))
    >>> factor_counts(codes, 4).tolist()
    [2, 0, 1, 0]
    >>> factor_frequencies(factor_counts(codes, 4), 2).tolist()
    [1.0, 0.0, 0.5, 0.0]
"""

from __future__ import annotations

import numpy as np
from saelect.workers.codes import SparseCodes

__all__ = [
    "alive_units",
    "dead_share",
    "factor_counts",
    "factor_frequencies",
    "profiles",
]


def factor_counts(codes: SparseCodes, units: int) -> np.ndarray:
    """int64 (M,) number of samples in which each unit is active (value > 0).

    Raises ValueError when ``units`` < 1 or an id is >= ``units``.
    """
    if units < 1:
        raise ValueError(f"units must be >= 1, got {units}")
    if codes.ids.size and int(codes.ids.max()) >= units:
        raise ValueError(f"unit id {int(codes.ids.max())} >= units={units}")
    active = codes.active_mask()  # (N, k); ids are distinct per row: each sample counts once
    return np.bincount(codes.ids[active], minlength=units).astype(np.int64)


def factor_frequencies(counts: np.ndarray, num_samples: int) -> np.ndarray:
    """float64 (M,) p_j = counts_j / N: the share of samples in which unit j is active.

    Raises ValueError when N < 1, a count is negative or exceeds N.
    """
    counts = np.asarray(counts)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if counts.ndim != 1:
        raise ValueError(f"counts must be 1-D (M,), got shape {counts.shape}")
    if counts.size and (counts.min() < 0 or counts.max() > num_samples):
        raise ValueError(
            f"counts must lie in [0, {num_samples}], got [{counts.min()}, {counts.max()}]"
        )
    return counts.astype(np.float64) / float(num_samples)


def alive_units(p: np.ndarray) -> np.ndarray:
    """bool (M,): the units with p_j > 0 (dead units are dropped from every score)."""
    return np.asarray(p, dtype=np.float64) > 0


def dead_share(codes: SparseCodes, units: int) -> float:
    """Share of the ``units`` never active in ``codes`` (in [0, 1])."""
    return float(np.mean(factor_counts(codes, units) == 0))


def profiles(codes: SparseCodes, p: np.ndarray | None = None) -> np.ndarray:
    """float64 (N, k) activation profile a_i = z_i / sum_j z_ij over the active entries.

    With ``p`` (float64 (M,) factor frequencies), entries on dead units (p_j = 0) are dropped
    first (The method 3). Rows with no active (alive) entry get an all-zero profile.
    """
    z_NK = codes.values.astype(np.float64)
    dropped_NK = ~codes.active_mask()
    if p is not None:
        dropped_NK |= np.asarray(p, dtype=np.float64)[codes.ids] <= 0
    z_NK[dropped_NK] = 0.0
    s_N = z_NK.sum(axis=1, keepdims=True)
    out = np.zeros_like(z_NK)
    np.divide(z_NK, s_N, out=out, where=s_N > 0)
    return out
