"""Representativeness R and rare-factor diversity D of samples, and ranks (docs/architecture.md,
The method 4 and 5).

Given sparse codes z (k entries per sample) and the global factor frequencies p (`workers.factors`):

- profile a_ij = z_ij / sum_j' z_ij' over the sample's active entries on alive units (p_j > 0);
  dead units (p_j = 0) are dropped, a sample with no active alive unit has a zero profile;
- R ``weighted``: R_i = sum_j a_ij p_j / max_j p_j, in [0, 1];
- R ``frequent_set``: R_i = sum of a_ij over units with p_j >= the ``quantile``-quantile of the
  alive p's (so the most frequent unit is always in the set), in [0, 1];
- D ``weighted``: w_j = log(1/p_j) min-max scaled to [0, 1] over the alive units (all 0 when all
  alive p's are equal); D_i = sum_j a_ij w_j, in [0, 1];
- D ``max``: D_i = max of w_j over the sample's active alive units (0 when there is none).

Scores are then rank-normalized to [0, 1] over the whole dataset: `rank_normalize` in one process,
`global_rank_normalize` on a shard given every shard's sorted scores; both give the same float64
bits, so a sharded result concatenates to the single-process one exactly.

Example:
    >>> import numpy as np
    >>> rank_normalize(np.array([3.0, 1.0, 3.0, 2.0])).tolist()
    [0.8333333333333334, 0.0, 0.8333333333333334, 0.3333333333333333]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from saelect.workers.codes import SparseCodes
from saelect.workers.factors import profiles

__all__ = [
    "DIVERSITY_FORMS",
    "REPRESENTATIVENESS_FORMS",
    "ScoreConfig",
    "diversity",
    "global_rank_normalize",
    "rank_normalize",
    "rarity_weights",
    "representativeness",
    "score_codes",
]

REPRESENTATIVENESS_FORMS = ("weighted", "frequent_set")
"""Forms of R (The method 4)."""
DIVERSITY_FORMS = ("weighted", "max")
"""Forms of D (The method 5)."""


@dataclass(frozen=True)
class ScoreConfig:
    """Which forms of R and D to compute."""

    representativeness: str = "weighted"
    """R form: ``weighted`` (sum_j a_ij p_j / max p) or ``frequent_set`` (frequent-unit mass)."""
    diversity: str = "weighted"
    """D form: ``weighted`` (sum_j a_ij w_j) or ``max`` (max_j w_j over active units)."""
    quantile: float = 0.9
    """``frequent_set``: units with p_j >= this quantile of the alive p's; in [0, 1]."""

    def __post_init__(self) -> None:
        if self.representativeness not in REPRESENTATIVENESS_FORMS:
            raise ValueError(
                f"representativeness must be one of {REPRESENTATIVENESS_FORMS}, "
                f"got {self.representativeness!r}"
            )
        if self.diversity not in DIVERSITY_FORMS:
            raise ValueError(f"diversity must be one of {DIVERSITY_FORMS}, got {self.diversity!r}")
        if not 0.0 <= float(self.quantile) <= 1.0:
            raise ValueError(f"quantile must lie in [0, 1], got {self.quantile}")


def _check_p(codes: SparseCodes, p: np.ndarray) -> np.ndarray:
    p_M = np.asarray(p, dtype=np.float64)
    if p_M.ndim != 1 or p_M.shape[0] < 1:
        raise ValueError(f"p must be a non-empty 1-D array (M,), got shape {p_M.shape}")
    if not np.all(np.isfinite(p_M)) or p_M.min() < 0 or p_M.max() > 1:
        raise ValueError(f"p must lie in [0, 1], got range [{p_M.min()}, {p_M.max()}]")
    if codes.ids.size and int(codes.ids.max()) >= p_M.shape[0]:
        raise ValueError(f"unit id {int(codes.ids.max())} >= len(p)={p_M.shape[0]}")
    return p_M


def rarity_weights(p: np.ndarray) -> np.ndarray:
    """float64 (M,) w_j = log(1/p_j) min-max scaled to [0, 1] over alive units; 0 on dead units.

    When every alive unit has the same p the weights are all 0 (no unit is rarer than another).
    """
    p_M = np.asarray(p, dtype=np.float64)
    w_M = np.zeros_like(p_M)
    alive = p_M > 0
    if not alive.any():
        return w_M
    logw = -np.log(p_M[alive])
    lo, hi = float(logw.min()), float(logw.max())
    if hi > lo:
        w_M[alive] = (logw - lo) / (hi - lo)
    return w_M


def representativeness(
    codes: SparseCodes, p: np.ndarray, *, form: str = "weighted", quantile: float = 0.9
) -> np.ndarray:
    """Raw representativeness R, float64 (N,) in [0, 1].

    Parameters
    ----------
    codes: sparse codes of the samples (ids int32 (N, k), values float16 (N, k)).
    p: float64 (M,) global factor frequencies.
    form: ``weighted`` (R_i = sum_j a_ij p_j / max p) or ``frequent_set`` (mass of a_i on units
        with p_j >= the ``quantile``-quantile of the alive p's).
    quantile: see ``frequent_set``; in [0, 1].

    Raises
    ------
    ValueError: unknown form, quantile outside [0, 1], p outside [0, 1], id >= len(p).
    """
    ScoreConfig(representativeness=form, quantile=quantile)  # validates form and quantile
    p_M = _check_p(codes, p)
    a_NK = profiles(codes, p_M)
    alive = p_M > 0
    if not alive.any():
        return np.zeros(codes.num_samples, dtype=np.float64)
    if form == "weighted":
        return (a_NK * p_M[codes.ids]).sum(axis=1) / float(p_M.max())
    threshold = float(np.quantile(p_M[alive], quantile))
    frequent_M = alive & (p_M >= threshold)
    return (a_NK * frequent_M[codes.ids]).sum(axis=1)


def diversity(codes: SparseCodes, p: np.ndarray, *, form: str = "weighted") -> np.ndarray:
    """Raw rare-factor diversity D, float64 (N,) in [0, 1].

    Parameters
    ----------
    codes: sparse codes of the samples.
    p: float64 (M,) global factor frequencies; w = `rarity_weights` (p).
    form: ``weighted`` (D_i = sum_j a_ij w_j) or ``max`` (max_j w_j over active alive units).

    Raises
    ------
    ValueError: unknown form, p outside [0, 1], id >= len(p).
    """
    ScoreConfig(diversity=form)
    p_M = _check_p(codes, p)
    w_M = rarity_weights(p_M)
    if form == "weighted":
        a_NK = profiles(codes, p_M)
        return (a_NK * w_M[codes.ids]).sum(axis=1)
    w_NK = w_M[codes.ids]
    active = codes.active_mask() & (p_M[codes.ids] > 0)
    w_NK = np.where(active, w_NK, 0.0)  # w >= 0, so inactive entries cannot raise the max
    if codes.k == 0:
        return np.zeros(codes.num_samples, dtype=np.float64)
    return w_NK.max(axis=1)


def score_codes(
    codes: SparseCodes, p: np.ndarray, config: ScoreConfig | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Raw (R, D), each float64 (N,), in the forms of ``config`` (default `ScoreConfig()`)."""
    cfg = config or ScoreConfig()
    r = representativeness(codes, p, form=cfg.representativeness, quantile=cfg.quantile)
    d = diversity(codes, p, form=cfg.diversity)
    return r, d


def _check_scores(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.all(np.isfinite(arr)):
        bad = arr[~np.isfinite(arr)][0]
        raise ValueError(f"{name} must be finite, got {bad}")
    return arr


def global_rank_normalize(
    x_local: np.ndarray, sorted_parts: Sequence[np.ndarray], total: int
) -> np.ndarray:
    """Rank-normalize a shard's scores against every shard's sorted scores.

    The average rank of x among all ``total`` scores (0-based; ties share the mean of their
    ranks) divided by ``total - 1``; 0.5 when ``total == 1``. Exact: counts of smaller and
    smaller-or-equal values are integer sums of ``searchsorted`` over the parts.

    Parameters
    ----------
    x_local: float (n,) this shard's raw scores.
    sorted_parts: every shard's raw scores sorted ascending (including this shard's).
    total: the number of scores over all parts.

    Returns
    -------
    float64 (n,) in [0, 1].

    Raises
    ------
    ValueError: non-finite scores, or part sizes not summing to ``total``.
    """
    x = _check_scores(x_local, "x_local")
    parts = [_check_scores(s, "sorted part") for s in sorted_parts]
    if sum(s.shape[0] for s in parts) != total:
        raise ValueError(
            f"sorted parts hold {sum(s.shape[0] for s in parts)} scores, total says {total}"
        )
    if x.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    if total < 1:
        raise ValueError(f"total must be >= 1 for non-empty x_local, got {total}")
    if total == 1:
        return np.full(x.shape[0], 0.5, dtype=np.float64)
    less = np.zeros(x.shape[0], dtype=np.int64)  # scores < x
    leq = np.zeros(x.shape[0], dtype=np.int64)  # scores <= x
    for s in parts:
        less += np.searchsorted(s, x, side="left")
        leq += np.searchsorted(s, x, side="right")
    # mean of the 0-based ranks less .. leq - 1, divided by (total - 1)
    return (less + leq - 1).astype(np.float64) / float(2 * (total - 1))


def rank_normalize(x: np.ndarray) -> np.ndarray:
    """float64 (N,) average ranks of x scaled to [0, 1] (ties share their mean rank).

    ``rank / (N - 1)``; N = 1 gives 0.5. Equal to ``global_rank_normalize(x, [np.sort(x)], N)``
    bit for bit. Order preserving: x_a < x_b implies result_a < result_b.
    """
    arr = _check_scores(x, "x")
    return global_rank_normalize(arr, [np.sort(arr)], arr.shape[0])
