"""``factor``'s per-sample scores over a whole shard, computed in cache-sized blocks.

One epoch's scores are element-wise in R, D, the coverage profile h, the usage counts and the
Gumbel noise, so they are computed block by block (:data:`service.selection.hashing.BLOCK`
samples at a time) into one output array: the temporaries of a block stay in cache and no
full-length temporary is allocated. Every element goes through the same floating-point
operations, in the same order, as the unblocked formula:

    s_i = ((R_i (1 - lambda)) + ((D_i h_i) lambda)) - (pen_i + f_i) + tau G_i

with h_i = 1 without dynamic coverage (the product is skipped), pen_i the usage penalty
(``additive``: u_i gamma / max(t, 1); ``multiplicative``: -(B_i expm1(-gamma u_i / (r t + 1)))),
f_i the optional factor-usage penalty, G_i the Gumbel draw of global index lo + i.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from saelect.service.selection.hashing import BLOCK, STREAM_GUMBEL, gumbel_range

__all__ = ["ScoreTerms", "factor_scores"]


@dataclass(frozen=True)
class ScoreTerms:
    """The scalar terms of one epoch's scores (see the module docstring)."""

    lam: float
    """lambda(t) of the schedule."""
    penalty: str | None
    """``additive``, ``multiplicative`` or None (gamma = 0: no usage penalty)."""
    coef: float
    """The usage penalty's factor: gamma / max(t, 1) (additive) or -gamma / (r t + 1)."""
    noise_seed: int | None
    """Seed of the Gumbel stream, or None (no noise)."""
    epoch: int
    """The epoch t (the Gumbel stream's epoch)."""
    tau: float = 1.0
    """Noise scale (1 skips the multiplication)."""


def factor_scores(
    R: np.ndarray,
    D: np.ndarray,
    h: np.ndarray | None,
    usage: np.ndarray,
    fpen: np.ndarray | None,
    terms: ScoreTerms,
    lo: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The scores s (float64 (n,)) of the samples lo .. lo + n - 1, written into ``out``.

    Parameters
    ----------
    R, D:
        float64 (n,) representativeness and diversity.
    h:
        float32 (n,) coverage profile (dynamic coverage), or None.
    usage:
        int32 (n,) committed selections per sample.
    fpen:
        float64 (n,) factor-usage penalty, or None.
    terms:
        lambda, the penalty's form and factor, the noise stream.
    lo:
        Global index of the first sample (the noise is a function of the global index).
    out:
        float64 (n,) destination (allocated when None); must not alias the inputs.

    Returns
    -------
    ``out``.
    """
    n = R.shape[0]
    if out is None:
        out = np.empty(n, dtype=np.float64)
    if out.shape != (n,) or out.dtype != np.float64:
        raise ValueError(f"out must be float64 ({n},), got {out.dtype} {out.shape}")
    size = max(1, min(n, BLOCK))
    tmp = np.empty(size, dtype=np.float64)
    noise = np.empty(size, dtype=np.float64) if terms.noise_seed is not None else None
    lam, keep = terms.lam, 1.0 - terms.lam
    for a in range(0, n, size):
        b = min(a + size, n)
        s, t = out[a:b], tmp[: b - a]
        np.multiply(R[a:b], keep, out=s)  # B = R (1 - lambda) + D h lambda
        if h is None:
            np.multiply(D[a:b], lam, out=t)
        else:
            np.multiply(D[a:b], h[a:b], out=t, dtype=np.float64)
            t *= lam
        s += t
        if terms.penalty is not None:
            np.multiply(usage[a:b], terms.coef, out=t)
            if terms.penalty == "multiplicative":
                np.expm1(t, out=t)
                t *= s
                np.negative(t, out=t)
            if fpen is not None:
                t += fpen[a:b]
            s -= t
        elif fpen is not None:
            s -= fpen[a:b]
        if noise is not None and terms.noise_seed is not None:
            g = noise[: b - a]
            gumbel_range(terms.noise_seed, terms.epoch, STREAM_GUMBEL, lo + a, lo + b, out=g)
            if terms.tau != 1.0:  # 1.0 * x == x: the default skips a pass
                g *= terms.tau
            s += g
    return out
