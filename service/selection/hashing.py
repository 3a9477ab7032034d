"""Counter-based hashing of (seed, epoch, stream, global index).

Every per-sample random draw in selection (tie-breaks, Gumbel noise, the random baselines'
choices) is a pure function of ``(seed, epoch, stream, global index)``, so a result never depends
on how many shards hold the data or in which order they are visited. The generator is splitmix64:
the key ``(seed, epoch, stream)`` is mixed into a 64-bit state and sample ``i`` gets the ``i``-th
output of that stream, computed with wrapping uint64 arithmetic in numpy.

Example:
    >>> import numpy as np
    >>> h = hash_u64(0, 3, STREAM_TIEBREAK, np.arange(4))
    >>> h.dtype, h.shape
    (dtype('uint64'), (4,))
    >>> bool((hash_u64(0, 3, STREAM_TIEBREAK, np.array([2])) == h[2]).all())
    True
"""

from __future__ import annotations

import numpy as np
from saelect.workers.splitmix import C1 as _C1
from saelect.workers.splitmix import C2 as _C2
from saelect.workers.splitmix import GOLDEN as _GOLDEN
from saelect.workers.splitmix import mix64

__all__ = [
    "STREAM_GUMBEL",
    "STREAM_PRUNE",
    "STREAM_RANDOM",
    "STREAM_TIEBREAK",
    "gumbel",
    "gumbel_range",
    "hash_range",
    "hash_u64",
    "stream_key",
    "uniform01",
]

STREAM_TIEBREAK = 1
"""Stream of the tie-break of equal scores."""
STREAM_GUMBEL = 2
"""Stream of the Gumbel noise of ``factor`` with ``sampling="gumbel"``."""
STREAM_RANDOM = 3
"""Stream of the random baselines' choices (static_random, rs2, exploration)."""
STREAM_PRUNE = 4
"""Stream of infobatch's pruning draws."""

_MASK = (1 << 64) - 1


def _mix_int(x: int) -> int:
    """splitmix64 finalizer on a Python int (taken modulo 2**64)."""
    z = (x + _GOLDEN) & _MASK
    z = ((z ^ (z >> 30)) * _C1) & _MASK
    z = ((z ^ (z >> 27)) * _C2) & _MASK
    return z ^ (z >> 31)


def stream_key(seed: int, epoch: int, stream: int) -> int:
    """64-bit state of the stream ``(seed, epoch, stream)``.

    Parameters
    ----------
    seed, epoch, stream:
        Non-negative integers (taken modulo 2**64).

    Returns
    -------
    int in [0, 2**64).
    """
    if seed < 0 or epoch < 0 or stream < 0:
        raise ValueError(f"seed, epoch and stream must be >= 0, got {(seed, epoch, stream)}")
    return _mix_int(_mix_int(_mix_int(seed & _MASK) ^ (epoch & _MASK)) ^ (stream & _MASK))


def hash_u64(seed: int, epoch: int, stream: int, index: np.ndarray) -> np.ndarray:
    """uint64 hash of every global index under the stream ``(seed, epoch, stream)``.

    Parameters
    ----------
    seed, epoch, stream:
        Non-negative integers naming the stream.
    index:
        Global sample indices, integer array of any shape (non-negative).

    Returns
    -------
    uint64 array of ``index``'s shape: the splitmix64 output number ``index`` of the stream.
    """
    key = np.uint64(stream_key(seed, epoch, stream))
    z = np.asarray(index).astype(np.uint64, copy=True)  # (N,)
    z *= np.uint64(_GOLDEN)
    z += key
    return mix64(z)


def hash_range(seed: int, epoch: int, stream: int, lo: int, hi: int) -> np.ndarray:
    """:func:`hash_u64` of the indices ``lo .. hi - 1`` (uint64 (hi - lo,)), without
    materializing the index array first."""
    z = np.arange(lo, hi, dtype=np.uint64)
    z *= np.uint64(_GOLDEN)
    z += np.uint64(stream_key(seed, epoch, stream))
    return mix64(z)


def uniform01(seed: int, epoch: int, stream: int, index: np.ndarray) -> np.ndarray:
    """float64 draws in [0, 1) from the top 53 bits of :func:`hash_u64` (same shape as index)."""
    h = hash_u64(seed, epoch, stream, index)
    h >>= np.uint64(11)
    return h.astype(np.float64) * (1.0 / (1 << 53))


def gumbel(seed: int, epoch: int, stream: int, index: np.ndarray) -> np.ndarray:
    """Standard Gumbel draws ``-log(-log(u))`` with u in (0, 1) (same shape as index, float64)."""
    return _gumbel_of(hash_u64(seed, epoch, stream, index))


BLOCK = 1 << 15
"""Samples per block of the blocked element-wise passes (a few float64 blocks fit in L2)."""


def gumbel_range(
    seed: int, epoch: int, stream: int, lo: int, hi: int, out: np.ndarray | None = None
) -> np.ndarray:
    """:func:`gumbel` of the indices ``lo .. hi - 1`` (float64 (hi - lo,)), written into
    ``out`` (float64 (hi - lo,)) when given.

    Computed in blocks of :data:`BLOCK` samples whose temporaries stay in cache: the same
    draws as :func:`gumbel` (every step is element-wise), without full-length temporaries.
    """
    if hi < lo:
        raise ValueError(f"a range needs hi >= lo, got lo={lo}, hi={hi}")
    n = hi - lo
    if out is None:
        out = np.empty(n, dtype=np.float64)
    elif out.shape != (n,) or out.dtype != np.float64:
        raise ValueError(f"out must be float64 ({n},), got {out.dtype} {out.shape}")
    if n == 0:
        return out
    key = stream_key(seed, epoch, stream)
    size = min(n, BLOCK)
    steps = np.arange(size, dtype=np.uint64)
    steps *= np.uint64(_GOLDEN)  # j * GOLDEN: block a's hashes are these + (a GOLDEN + key)
    z = np.empty(size, dtype=np.uint64)
    t = np.empty(size, dtype=np.uint64)
    for a in range(0, n, size):
        k = min(size, n - a)
        zb, tb = z[:k], t[:k]
        np.add(steps[:k], np.uint64(((lo + a) * _GOLDEN + key) & _MASK), out=zb)
        mix64(zb, tb)
        _gumbel_into(zb, out[a : a + k])
    return out


def _gumbel_into(h: np.ndarray, u: np.ndarray) -> None:
    """u (float64) = ``-log(-log((top 53 bits of h + 0.5) 2**-53))``; h (uint64) is consumed."""
    h >>= np.uint64(11)
    np.copyto(u, h, casting="unsafe")  # exact: h < 2**53
    u += 0.5
    u *= 1.0 / (1 << 53)  # the same two roundings as (h + 0.5) * 2**-53
    np.log(u, out=u)
    np.negative(u, out=u)
    np.log(u, out=u)
    np.negative(u, out=u)


def _gumbel_of(h: np.ndarray) -> np.ndarray:
    """``-log(-log(u))`` with u = (top 53 bits of h + 0.5) 2**-53; h is consumed."""
    u = np.empty(h.shape, dtype=np.float64)
    _gumbel_into(h, u)
    return u
