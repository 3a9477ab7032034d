"""Sparse SAE codes: per sample the k active unit ids and their activations.

`SparseCodes` is what the SAE encoder emits (`workers.sae_encode.encode`), what shards store
(``codes.npz``) and what the factor statistics read (`workers.factors`, `workers.scores`).

Layout: ``ids`` int32 (N, k) and ``values`` float16 (N, k), row i = sample i. Every row holds
exactly k entries with distinct ids; the encoder writes them in decreasing order of value. A value
of 0 (TopK keeps a unit whose pre-activation was <= 0, ReLU zeroes it) marks an inactive entry:
every statistic counts a unit as active in a sample only when its value is > 0.

Example:
    >>> import numpy as np
    >>> c = SparseCodes(np.array([[2, 0]]), np.array([[1.5, 0.5]]))
    >>> c.to_dense(3).tolist()
    [[0.5, 0.0, 1.5]]
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["SparseCodes"]


@dataclass(frozen=True, eq=False)
class SparseCodes:
    """k (unit id, activation) pairs per sample.

    Inputs are converted to int32 / float16 on construction.
    """

    ids: np.ndarray
    """int32 (N, k) active unit ids; distinct within a row."""
    values: np.ndarray
    """float16 (N, k) activations, >= 0 (0 = inactive entry)."""

    def __post_init__(self) -> None:
        ids = np.asarray(self.ids)
        values = np.asarray(self.values)
        if ids.ndim != 2 or values.ndim != 2:
            raise ValueError(
                f"ids and values must be 2-D (N, k), got shapes {ids.shape} and {values.shape}"
            )
        if ids.shape != values.shape:
            raise ValueError(f"ids shape {ids.shape} != values shape {values.shape}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
        if ids.size and ids.min() < 0:
            raise ValueError(f"ids must be >= 0, got min {ids.min()}")
        object.__setattr__(self, "ids", np.ascontiguousarray(ids, dtype=np.int32))
        object.__setattr__(self, "values", np.ascontiguousarray(values, dtype=np.float16))

    # ------------------------------------------------------------------ shape
    @property
    def num_samples(self) -> int:
        """N, the number of samples (rows)."""
        return int(self.ids.shape[0])

    @property
    def k(self) -> int:
        """Entries per sample."""
        return int(self.ids.shape[1])

    def __len__(self) -> int:
        return self.num_samples

    # ------------------------------------------------------------------ combine
    @classmethod
    def concat(cls, parts: Sequence[SparseCodes]) -> SparseCodes:
        """Rows of ``parts`` one after the other; all parts must have the same k.

        Raises ValueError for an empty sequence or parts with different k.
        """
        if not parts:
            raise ValueError("concat needs at least one SparseCodes part, got 0")
        ks = {p.k for p in parts}
        if len(ks) != 1:
            raise ValueError(f"parts have different k: {sorted(ks)}")
        return cls(
            np.concatenate([p.ids for p in parts]), np.concatenate([p.values for p in parts])
        )

    def slice(self, start: int, stop: int) -> SparseCodes:
        """Rows ``[start, stop)`` (a copy)."""
        return SparseCodes(self.ids[start:stop].copy(), self.values[start:stop].copy())

    def take(self, rows: np.ndarray) -> SparseCodes:
        """Rows at the given positions (int array), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        return SparseCodes(self.ids[rows], self.values[rows])

    # ------------------------------------------------------------------ views
    def to_dense(self, units: int) -> np.ndarray:
        """float32 (N, units) dense activations (for tests and small data).

        Raises ValueError when an id is >= units.
        """
        if self.ids.size and int(self.ids.max()) >= units:
            raise ValueError(f"unit id {int(self.ids.max())} >= units={units}")
        dense_NM = np.zeros((self.num_samples, units), dtype=np.float32)
        rows = np.repeat(np.arange(self.num_samples), self.k)
        np.add.at(
            dense_NM, (rows, self.ids.reshape(-1)), self.values.reshape(-1).astype(np.float32)
        )
        return dense_NM

    def active_mask(self) -> np.ndarray:
        """bool (N, k): the entries with value > 0."""
        return self.values > 0

    # ------------------------------------------------------------------ bytes
    def to_bytes(self) -> bytes:
        """The codes as an ``.npz`` archive (arrays ``ids``, ``values``)."""
        buf = io.BytesIO()
        np.savez(buf, ids=self.ids, values=self.values)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> SparseCodes:
        """Codes from `to_bytes` output (or any npz with ``ids`` and ``values``)."""
        with np.load(io.BytesIO(data)) as z:
            return cls(z["ids"], z["values"])

    def equals(self, other: SparseCodes) -> bool:
        """Exact equality of ids and values (bitwise on the float16 values)."""
        return (
            self.ids.shape == other.ids.shape
            and bool(np.array_equal(self.ids, other.ids))
            and bool(np.array_equal(self.values.view(np.uint16), other.values.view(np.uint16)))
        )
