"""splitmix64 on numpy uint64 arrays: the mixing step shared by every counter-based draw.

Both the selection's hash streams (``service.selection.hashing``) and the shard plan's row keys
(`workers.shard_plan.row_keys`) are splitmix64 outputs: a counter times an odd constant plus a
key, passed through the finalizer below with wrapping uint64 arithmetic.

Example:
    >>> import numpy as np
    >>> z = np.arange(3, dtype=np.uint64)
    >>> mix64(z) is z
    True
"""

from __future__ import annotations

import numpy as np

__all__ = ["C1", "C2", "GOLDEN", "mix64"]

GOLDEN = 0x9E3779B97F4A7C15
"""splitmix64's increment (the golden ratio in 64-bit fixed point)."""
C1 = 0xBF58476D1CE4E5B9
"""First multiplier of the finalizer."""
C2 = 0x94D049BB133111EB
"""Second multiplier of the finalizer."""


def mix64(z: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
    """Apply splitmix64's finalizer to the uint64 array ``z`` in place; returns ``z``.

    z ^= z >> 30; z *= C1; z ^= z >> 27; z *= C2; z ^= z >> 31 (all modulo 2**64).
    ``scratch``: a uint64 array of z's shape for the shifted copies (allocated when None).
    """
    t = np.right_shift(z, np.uint64(30), out=scratch)
    z ^= t
    z *= np.uint64(C1)
    np.right_shift(z, np.uint64(27), out=t)
    z ^= t
    z *= np.uint64(C2)
    np.right_shift(z, np.uint64(31), out=t)
    z ^= t
    return z
