"""Per-rank partition of an epoch order (docs/api.md, Indices).

The order is padded to a multiple of the world size W by repeating its head (cyclically, like
torch's DistributedSampler), and rank R takes positions R, R + W, ...; every rank gets the same
length, so DDP never hangs on unequal lengths.
"""

from __future__ import annotations

import numpy as np

__all__ = ["per_rank_length", "rank_indices", "rank_slice"]


def _check(world_size: int, rank: int | None = None) -> None:
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    if rank is not None and not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} outside [0, {world_size})")


def per_rank_length(size: int, world_size: int) -> int:
    """Length of every rank's share of an epoch of ``size`` samples: ceil(size / world_size)."""
    _check(world_size)
    if size < 0:
        raise ValueError(f"size={size} must be >= 0")
    return -(-size // world_size)


def rank_indices(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """The indices rank ``rank`` of ``world_size`` trains on.

    Parameters
    ----------
    order:
        int64 (m,) the epoch order.
    rank, world_size:
        ``0 <= rank < world_size``.

    Returns
    -------
    int64 (per_rank_length(m, world_size),).

    Example
    -------
    >>> import numpy as np
    >>> rank_indices(np.array([5, 6, 7]), 1, 2).tolist()
    [6, 5]
    """
    return rank_slice(np.asarray(order, dtype=np.int64), rank, world_size)


def rank_slice(values: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s share of any per-position array of the epoch order (indices, weights).

    values (m,), any dtype -> (per_rank_length(m, world_size),), same dtype: the array padded
    to a multiple of W by repeating its head, then positions rank, rank + W, ...
    """
    _check(world_size, rank)
    values = np.asarray(values)
    m = values.shape[0]
    length = per_rank_length(m, world_size)
    if m == 0:
        return values[:0].copy()
    # position i of the padded order is values[i % m] (the head repeated cyclically, as
    # np.resize pads); only this rank's positions are gathered: O(m / W), not O(m), per request
    return values[np.arange(rank, length * world_size, world_size) % m]
