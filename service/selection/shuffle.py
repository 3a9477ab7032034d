"""Per-epoch shuffle of a selected subset, seeded by (seed, epoch) only."""

from __future__ import annotations

import numpy as np

__all__ = ["epoch_permutation", "shuffle_epoch"]


def epoch_permutation(size: int, seed: int, epoch: int) -> np.ndarray:
    """int64 (size,) permutation drawn from ``np.random.default_rng([seed, epoch])``.

    Raises ValueError for a negative size, seed or epoch.
    """
    if size < 0 or seed < 0 or epoch < 0:
        raise ValueError(f"size, seed and epoch must be >= 0, got {(size, seed, epoch)}")
    return np.random.default_rng([seed, epoch]).permutation(size).astype(np.int64, copy=False)


def shuffle_epoch(indices: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The epoch order of a selected subset.

    Parameters
    ----------
    indices:
        int64 (m,) selected global indices, in any order (they are sorted first, so the order
        never depends on how the selection was gathered from shards).
    seed, epoch:
        The stream of the shuffle.

    Returns
    -------
    int64 (m,) the same indices in the epoch's shuffled order.

    Example
    -------
    >>> import numpy as np
    >>> a = shuffle_epoch(np.array([3, 1, 2]), 0, 0)
    >>> bool((a == shuffle_epoch(np.array([2, 3, 1]), 0, 0)).all())
    True
    """
    ordered = np.sort(np.asarray(indices, dtype=np.int64))
    return ordered[epoch_permutation(ordered.shape[0], seed, epoch)]
