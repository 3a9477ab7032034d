"""Read-only structures derived from one shard's data, built on first use.

:class:`ShardDerived` holds, for one ``workers.shard_data.ShardData``: the label layout
(positions grouped by class, a counting sort), the class counts, and the codes for dynamic
coverage. The coverage weights are a sparse matrix-vector product: the clipped activations as a
CSR matrix split into row blocks (one per thread, and none over 2**24 rows), each a zero-copy
view of the stored unit ids, multiplied block by block on a small thread pool (scipy's sparse
kernels release the GIL; a row's sum never crosses blocks). The units covered by a selection
are counted over the selected rows only: their unit ids are gathered in cache-sized blocks of
rows and counted by a transposed sparse product over each block (exact integers, whatever the
blocks or threads). So the results do not depend on the number of threads.

Threads: ``SAELECT_SELECTION_THREADS`` (default: min(2, CPUs)).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from saelect.service.selection.pool import run_tasks as _run
from saelect.service.selection.pool import selection_threads

if TYPE_CHECKING:
    from saelect.workers.shard_data import ShardData

__all__ = ["LabelLayout", "ShardDerived", "selection_threads"]

_PROFILE_MEMO = 3  # coverage weight vectors whose products a shard keeps
_MAX_BLOCK_ROWS = 1 << 24  # rows per block of the coverage product at most
_MIN_SPLIT_ROWS = 1 << 16  # below this one block: a thread costs more than it saves
_COUNT_ROWS = 16384  # selected rows gathered per block of the unit counts (k int32 ids each)


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
    """The codes as row blocks of CSR matrices (a, b, clipped activations (b - a, M)) and the
    unit ids the unit counts read."""

    blocks: list[tuple[int, int, Any]]
    active_ids: np.ndarray  # int32 (n, k) unit ids, M where the clipped activation is 0
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

    def nbytes(self) -> int:
        """Bytes held by the structures built so far (for memory accounting).

        With codes of k units per sample: 4 k + 9 bytes per sample (float32 activations, their
        row pointers, the mass and its sign; the column ids are the stored ``code_ids`` when
        they are int32), plus 4 k more when some activation is <= 0 or the ids are not int32
        (the ids the unit counts read, 0-activation entries masked), plus the last coverage
        profiles (4 bytes per sample each, up to 3); with labels, 16 bytes per sample for the
        label layout.
        """
        total = 0
        if self._codes is not None:
            ids = self._data.code_ids
            shared = []
            for _, _, values in self._codes.blocks:
                total += int(values.data.nbytes) + int(values.indptr.nbytes)
                if ids is None or not np.shares_memory(values.indices, ids):
                    total += int(values.indices.nbytes)
                    shared.append(values.indices)
            active = self._codes.active_ids
            if (ids is None or not np.shares_memory(active, ids)) and not any(
                np.shares_memory(active, x) for x in shared
            ):
                total += int(active.nbytes)
            total += int(self._codes.mass.nbytes) + int(self._codes.positive.nbytes)
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
        """The codes' row blocks: CSR (b - a, M) float32 clipped activations whose column ids
        are views of ``code_ids``, and the int32 ids of the active entries (built once)."""
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
            index = np.int32 if n * k < np.iinfo(np.int32).max else np.int64
            indices = np.ascontiguousarray(d.code_ids, dtype=index).reshape(-1)
            blocks = []
            for a, b in row_blocks(n, selection_threads()):
                indptr = np.arange(0, (b - a) * k + 1, k, dtype=index)
                cut = slice(a * k, b * k)
                shape = (b - a, units)
                values = sp.csr_matrix((flat[cut], indices[cut], indptr), shape=shape, copy=False)
                blocks.append((a, b, values))
            active = vals > 0  # (n, k)
            if index == np.int32 and bool(active.all()):
                active_ids = indices.reshape(n, k)  # a view: nothing to mask
            else:
                active_ids = np.where(active, d.code_ids, units).astype(np.int32)
            self._codes = _Codes(blocks, active_ids, mass, mass > 0, np.flatnonzero(mass <= 0))
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

        _run([lambda a=a, b=b, v=v: block(a, b, v) for a, b, v in codes.blocks])
        h[codes.massless] = 1.0  # no positive activation: weight 1
        self._profile_memo = [(g.copy(), h), *self._profile_memo[: _PROFILE_MEMO - 1]]
        return h

    def unit_counts(self, rows: np.ndarray) -> np.ndarray:
        """int64 (M,) how many of the samples ``rows`` (int (m,) local positions, distinct) have
        each unit active (activation > 0). The last result is memoized by the identity of
        ``rows``.

        Reads only the selected rows: their unit ids are gathered in blocks of
        ``_COUNT_ROWS`` rows (2 MiB at k = 32, so the gather and the count stay in
        cache), each block counted by a transposed sparse product (M + 1 columns: an inactive
        entry counts in the last, dropped); the rows are split between the pool's threads.
        """
        memo = self._counts_memo
        if memo is not None and memo[0] is rows:
            return memo[1]
        counts = self._count(rows, selection_threads())
        self._counts_memo = (rows, counts)
        return counts

    def _count(self, rows: np.ndarray, threads: int) -> np.ndarray:
        """:meth:`unit_counts` computed, the rows split into ``threads`` parts."""
        codes = self._codes_blocks()
        assert self._data.p is not None  # the codes were built
        units = int(self._data.p.shape[0])
        pos = np.asarray(rows, dtype=np.int64).reshape(-1)
        n = codes.active_ids.shape[0]
        if pos.shape[0] and (int(pos.min()) < 0 or int(pos.max()) >= n):
            raise IndexError(f"unit_counts: rows outside [0, {n})")
        parts = threads if pos.shape[0] >= _MIN_SPLIT_ROWS else 1
        bounds = np.linspace(0, pos.shape[0], parts + 1).astype(np.int64)
        tasks = [
            lambda a=int(a), b=int(b): _count_units(codes.active_ids, pos[a:b], units)
            for a, b in itertools.pairwise(bounds)
        ]
        return np.rint(np.sum(_run(tasks), axis=0)).astype(np.int64)


def _count_units(ids: np.ndarray, rows: np.ndarray, units: int) -> np.ndarray:
    """float64 (units,) how often each unit id in [0, units) occurs in the rows ``rows`` of
    ``ids`` (int32 (n, k), C-contiguous; the id ``units`` marks an entry not to count).

    Blocks of ``_COUNT_ROWS`` rows: one gather (each row is one k * 4-byte item) into a reused
    buffer, then a transposed sparse product with a vector of ones (float32 sums of at most
    ``_COUNT_ROWS`` ones per block are exact; the float64 total stays exact below 2**53)."""
    import scipy.sparse as sp

    k = ids.shape[1]
    size = min(_COUNT_ROWS, rows.shape[0])
    buffer = np.empty((size, k), dtype=np.int32)
    ones = np.ones(size * k, dtype=np.float32)
    indptr = np.arange(0, size * k + 1, k, dtype=np.int32)
    x = np.ones(size, dtype=np.float32)
    total = np.zeros(units + 1, dtype=np.float64)
    for a in range(0, rows.shape[0], _COUNT_ROWS):
        r = min(_COUNT_ROWS, rows.shape[0] - a)
        np.take(ids, rows[a : a + r], axis=0, out=buffer[:r], mode="clip")  # rows checked
        block = sp.csr_matrix(
            (ones[: r * k], buffer[:r].reshape(-1), indptr[: r + 1]),
            shape=(r, units + 1),
            copy=False,
        )
        total += block.T @ x[:r]
    return total[:units]
