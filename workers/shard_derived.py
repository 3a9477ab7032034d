"""Read-only structures derived from one shard's data, built on first use.

:class:`ShardDerived` holds, for one ``workers.selection_shard.ShardData``: the label layout
(positions grouped by class, a counting sort), the class counts, and the codes as sparse
matrices for dynamic coverage. The matrices are split into row blocks (one per thread, and
none over 2**24 rows), each a zero-copy view of the stored unit ids; the two per-epoch sparse
products run block by block on a small thread pool (scipy's sparse kernels release the GIL).
Every block computes exactly what the whole matrix would (a row's sum never crosses blocks;
unit counts are exact integers), so the results do not depend on the number of threads.

Threads: ``SAELECT_SELECTION_THREADS`` (default: min(2, CPUs)).
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from saelect.workers.selection_shard import ShardData

__all__ = ["LabelLayout", "ShardDerived", "selection_threads"]

_PROFILE_MEMO = 3  # coverage weight vectors whose products a shard keeps
_MAX_BLOCK_ROWS = 1 << 24  # float32 sums of 0/1 stay exact below 2**24 rows
_MIN_SPLIT_ROWS = 1 << 16  # below this one block: a thread costs more than it saves
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def selection_threads() -> int:
    """Threads of the shard's sparse products: ``SAELECT_SELECTION_THREADS`` or min(2, CPUs)."""
    raw = os.environ.get("SAELECT_SELECTION_THREADS", "")
    if raw.strip():
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"SAELECT_SELECTION_THREADS={raw!r} must be an integer >= 1")
        return value
    return max(1, min(2, os.cpu_count() or 1))


def _run(tasks: list[Any]) -> list[Any]:
    """Call every zero-argument function of ``tasks``; on the shared pool when more than one."""
    global _POOL
    if len(tasks) == 1:
        return [tasks[0]()]
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=max(2, selection_threads()))
        pool = _POOL
    return [f.result() for f in [pool.submit(t) for t in tasks]]


def row_blocks(n: int, threads: int) -> list[tuple[int, int]]:
    """Contiguous row ranges [a, b) covering [0, n): ``threads`` of them (one when n is small),
    more where a block would exceed 2**24 rows."""
    parts = threads if n >= _MIN_SPLIT_ROWS else 1
    parts = max(parts, -(-n // _MAX_BLOCK_ROWS), 1)
    bounds = np.linspace(0, n, parts + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


class LabelLayout(NamedTuple):
    """The shard's positions grouped by label (a counting sort, built once)."""

    order: np.ndarray
    """int64 (n,) local positions sorted by label, ascending positions within a label."""
    starts: np.ndarray
    """int64 (C + 1,) label c's positions are ``order[starts[c]:starts[c + 1]]``."""
    inverse: np.ndarray
    """int64 (n,) where each position sits in ``order`` (``order[inverse[i]] == i``): putting an
    array in label order as ``out[inverse] = x`` reads x once, in order."""

    def segment(self, c: int) -> np.ndarray:
        """int64 ascending local positions of label c (empty beyond the local labels)."""
        if c + 1 >= self.starts.shape[0]:
            return self.order[:0]
        return self.order[self.starts[c] : self.starts[c + 1]]


class _Codes(NamedTuple):
    """The codes as row blocks of CSR matrices (a, b, activations (b - a, M), 0/1 pattern)."""

    blocks: list[tuple[int, int, Any, Any]]
    mass: np.ndarray  # float32 (n,) sum of the clipped activations
    positive: np.ndarray  # bool (n,) mass > 0
    massless: np.ndarray  # int64 positions whose mass is 0


class ShardDerived:
    """Read-only structures derived from one ``ShardData``, built on first use.

    Everything here is a pure function of the data (and of the arguments, for the two
    memoized products), so sharing it between engines or policies over the same data is safe.
    """

    def __init__(self, data: ShardData) -> None:
        self._data = data
        self._layout: LabelLayout | None = None
        self._class_counts: np.ndarray | None = None
        self._codes: _Codes | None = None
        self._profile_memo: list[tuple[np.ndarray, np.ndarray]] = []  # [(g (M,), h (n,))]
        self._counts_memo: tuple[np.ndarray, np.ndarray] | None = None  # (rows, counts (M,))
        self._x: np.ndarray | None = None  # float32 (n,) selection indicator, reused
        self._lock = threading.Lock()

    def nbytes(self) -> int:
        """Bytes held by the structures built so far (for memory accounting).

        With codes of k units per sample: 8 k + 13 bytes per sample (float32 activations and 0/1
        pattern, the mass and its sign, the selection indicator once counted; the column ids
        are the stored ``code_ids``), plus the last coverage profiles (4 bytes per sample each,
        up to 3); with labels, 16 bytes per sample for the label layout.
        """
        total = 0
        if self._codes is not None:
            ids = self._data.code_ids
            for _, _, values, active in self._codes.blocks:
                total += int(values.data.nbytes) + int(active.data.nbytes)
                total += int(values.indptr.nbytes)
                if ids is None or not np.shares_memory(values.indices, ids):
                    total += int(values.indices.nbytes)
            total += int(self._codes.mass.nbytes) + int(self._codes.positive.nbytes)
        if self._x is not None:
            total += int(self._x.nbytes)
        if self._class_counts is not None:
            total += int(self._class_counts.nbytes)
        if self._layout is not None:
            total += sum(int(a.nbytes) for a in self._layout)
        total += sum(int(h.nbytes) for _, h in self._profile_memo)
        return total

    def _labels(self) -> np.ndarray:
        if self._data.labels is None:
            raise ValueError("the shard data holds no labels")
        return self._data.labels

    def label_layout(self) -> LabelLayout:
        """Positions grouped by label (stable: ascending positions within each label)."""
        if self._layout is None:
            labels = self._labels()
            counts = self.class_counts()
            small = counts.shape[0] <= np.iinfo(np.uint16).max
            keys = labels.astype(np.uint16) if small else labels  # uint16 sorts by radix
            order = np.argsort(keys, kind="stable").astype(np.int64, copy=False)
            starts = np.zeros(counts.shape[0] + 1, dtype=np.int64)
            np.cumsum(counts, out=starts[1:])
            inverse = np.empty_like(order)
            inverse[order] = np.arange(order.shape[0])
            self._layout = LabelLayout(order, starts, inverse)
        return self._layout

    def class_counts(self) -> np.ndarray:
        """int64 (C,) samples per label, C = the largest local label + 1."""
        if self._class_counts is None:
            self._class_counts = np.bincount(self._labels()).astype(np.int64, copy=False)
        return self._class_counts

    def _codes_blocks(self) -> _Codes:
        """The codes' row blocks: CSR (b - a, M) float32 clipped activations and 0/1 pattern,
        whose column ids are views of ``code_ids`` (built once)."""
        if self._codes is None:
            import scipy.sparse as sp

            d = self._data
            if d.code_ids is None or d.code_values is None or d.p is None:
                raise ValueError("the shard data holds no codes")
            n, k = d.code_ids.shape
            units = int(d.p.shape[0])
            vals = d.code_values.astype(np.float32)  # (n, k), as the literal computation
            np.maximum(vals, 0, out=vals)
            mass = vals.sum(axis=1)  # (n,) float32, the literal per-sample mass
            flat = vals.reshape(-1)
            ones = (flat > 0).astype(np.float32)
            index = np.int32 if n * k < np.iinfo(np.int32).max else np.int64
            indices = np.ascontiguousarray(d.code_ids, dtype=index).reshape(-1)
            blocks = []
            for a, b in row_blocks(n, selection_threads()):
                indptr = np.arange(0, (b - a) * k + 1, k, dtype=index)
                cut = slice(a * k, b * k)
                shape = (b - a, units)
                values = sp.csr_matrix((flat[cut], indices[cut], indptr), shape=shape, copy=False)
                active = sp.csr_matrix((ones[cut], indices[cut], indptr), shape=shape, copy=False)
                blocks.append((a, b, values, active))
            self._codes = _Codes(blocks, mass, mass > 0, np.flatnonzero(mass <= 0))
        return self._codes

    def profile_dot(self, g: np.ndarray) -> np.ndarray:
        """float32 (n,) ``sum_j a_ij g_j / sum_j a_ij`` over each sample's clipped activations
        a_i (1 where the sample has no positive activation); g: float32 (M,). The last results
        are memoized (the engine asks again for the selected samples' stats; a policy may use
        a few weight vectors per epoch)."""
        g = np.asarray(g, dtype=np.float32)
        for seen, h in self._profile_memo:
            if np.array_equal(seen, g):
                return h
        codes = self._codes_blocks()
        h = np.empty(self._data.n, dtype=np.float32)

        def block(a: int, b: int, values: Any) -> None:
            part = values @ g  # (b - a,) float32, one pass over the block's activations
            np.divide(part, codes.mass[a:b], out=h[a:b], where=codes.positive[a:b])

        _run([lambda a=a, b=b, v=v: block(a, b, v) for a, b, v, _ in codes.blocks])
        h[codes.massless] = 1.0  # no positive activation: weight 1
        self._profile_memo = [(g.copy(), h), *self._profile_memo[: _PROFILE_MEMO - 1]]
        return h

    def unit_counts(self, rows: np.ndarray) -> np.ndarray:
        """int64 (M,) how many of the samples ``rows`` (local positions) have each unit active
        (activation > 0). The last result is memoized by the identity of ``rows``."""
        memo = self._counts_memo
        if memo is not None and memo[0] is rows:
            return memo[1]
        codes = self._codes_blocks()
        with self._lock:  # the selection indicator x is a buffer reused across epochs
            if self._x is None:
                self._x = np.empty(self._data.n, dtype=np.float32)
            x = self._x
            x.fill(0.0)
            x[rows] = 1.0

            def block(a: int, b: int, active: Any) -> np.ndarray:
                # float32 sums of 0/1 over < 2**24 rows are exact integers
                return np.rint(active.T @ x[a:b]).astype(np.int64)

            parts = _run([lambda a=a, b=b, m=m: block(a, b, m) for a, b, _, m in codes.blocks])
        counts: np.ndarray = np.asarray(np.sum(parts, axis=0, dtype=np.int64))
        self._counts_memo = (rows, counts)
        return counts
