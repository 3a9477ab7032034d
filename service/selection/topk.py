"""Exact top-m selection in O(N): a partition finds the m-th largest value, then only the
boundary ties are ordered.

Order: score descending, then tie-break descending, then position ascending. ``-inf`` marks an
ineligible sample, which is never selected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
from saelect.service.selection.pool import run_tasks, selection_threads

__all__ = ["GroupLayout", "TiebreakSource", "grouped_top_m", "top_m"]

_MIN_SPLIT = 1 << 16  # below this many positions the groups run on one thread
_SAMPLE_MIN = 1 << 18  # from this many scores the m-th largest is bracketed by a sample
_SAMPLE = 1 << 16  # scores in that sample (about)

TiebreakSource = np.ndarray | Callable[[np.ndarray], np.ndarray]
"""Either a uint64 array (N,) of tie-breaks, or a function positions -> uint64 tie-breaks.

The function form lets callers hash only the few positions that tie at the boundary."""


def _tiebreak_at(tiebreak: TiebreakSource, pos: np.ndarray) -> np.ndarray:
    if callable(tiebreak):
        return np.asarray(tiebreak(pos), dtype=np.uint64)
    return np.asarray(tiebreak, dtype=np.uint64)[pos]


def top_m(scores: np.ndarray, tiebreak: TiebreakSource, m: int) -> np.ndarray:
    """Positions of the m best samples by (score desc, tiebreak desc, position asc).

    Parameters
    ----------
    scores:
        float64 (N,); ``-inf`` = ineligible; NaN is not allowed.
    tiebreak:
        uint64 (N,) or a callable mapping an int64 position array to its uint64 tie-breaks.
    m:
        How many to select, ``0 <= m <= number of eligible samples``.

    Returns
    -------
    int64 (m,) positions, in no particular order (callers sort or shuffle).

    Raises
    ------
    ValueError
        If m is negative or larger than the number of eligible (finite or +inf) scores.

    Example
    -------
    >>> import numpy as np
    >>> s = np.array([0.5, 0.9, 0.5, -np.inf])
    >>> sorted(top_m(s, np.array([1, 0, 2, 3], dtype=np.uint64), 2).tolist())
    [1, 2]
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.shape[0]
    if m < 0 or m > n:
        raise ValueError(f"m={m} outside [0, {n}]")
    if m == 0:
        return np.empty(0, dtype=np.int64)
    eligible = scores != -np.inf  # (N,); NaN counts here and is refused at the boundary
    n_eligible = int(np.count_nonzero(eligible))
    if n_eligible < m:
        raise ValueError(f"m={m} exceeds the {n_eligible} eligible samples")
    if 2 * n_eligible > n:
        return _partition_top(scores, tiebreak, m)
    # mostly ineligible (a class stage): select among the eligible positions only; sub is
    # ascending, so "position asc" among ties is kept
    sub = np.flatnonzero(eligible)  # (n_eligible,)
    return sub[_partition_top(scores[sub], lambda p: _tiebreak_at(tiebreak, sub[p]), m)]


def _partition_top(scores: np.ndarray, tiebreak: TiebreakSource, m: int) -> np.ndarray:
    """top_m's core for 1 <= m <= eligible: the m-th largest value by a partition of the values
    (no index array), then the positions above it and only the boundary ties ordered."""
    v = _mth_largest(scores, m)  # the m-th largest score, finite or +inf
    if np.isnan(v):
        raise ValueError("scores contain NaN")
    above = np.flatnonzero(scores > v)  # (< m,)
    need = m - above.shape[0]
    ties = np.flatnonzero(scores == v)  # every position holding the boundary value, ascending
    if ties.shape[0] < need:  # NaN sorts last in the partition and counts as neither
        raise ValueError("scores contain NaN")
    if ties.shape[0] > need:
        tb = _tiebreak_at(tiebreak, ties)
        order = np.lexsort((ties, ~tb))  # tiebreak desc, then position asc
        ties = ties[order[:need]]
    return np.concatenate([above, ties])


def _mth_largest(scores: np.ndarray, m: int) -> float:
    """The m-th largest of the float64 (N,) ``scores`` (1 <= m <= N), exactly what a partition
    at N - m gives (NaN when the scores hold NaN and it lands there).

    Large arrays: a strided sample of about :data:`_SAMPLE` scores brackets the value (a few
    standard deviations of the sample rank either side); one count above the bracket and one
    compress of the scores inside it leave a small array to partition (a few passes over the
    scores, no full copy). When the bracket misses, or the scores' sum is NaN (NaN, or both
    infinities), it falls back to the partition of every score.
    """
    n = scores.shape[0]
    kth = n - m
    if n >= _SAMPLE_MIN:
        with np.errstate(invalid="ignore", over="ignore"):
            total = scores.sum()
        if not np.isnan(total):
            sample = scores[:: n // _SAMPLE].copy()  # (>= _SAMPLE,) a deterministic sample
            rank = kth * sample.shape[0] / n  # where the value sits in the sorted sample
            margin = 4.0 * np.sqrt(sample.shape[0]) + 8.0
            a = max(0, int(rank - margin))
            b = min(sample.shape[0] - 1, int(rank + margin) + 1)
            sample.partition([a, b])
            lo, hi = sample[a], sample[b]
            above = int(np.count_nonzero(scores > hi))  # all of them are in the top m
            if above < m:
                inside = scores[(scores >= lo) & (scores <= hi)]  # (w,) the bracket
                if above + inside.shape[0] >= m:  # the m-th largest is inside
                    j = inside.shape[0] - (m - above)
                    inside.partition(j)
                    return float(inside[j])
    return float(np.partition(scores, kth)[kth])


class GroupLayout(Protocol):
    """Positions grouped by class (``workers.shard_derived.LabelLayout``)."""

    @property
    def order(self) -> np.ndarray:
        """int64 (N,) positions sorted by group, ascending within a group."""
        ...

    @property
    def starts(self) -> np.ndarray:
        """int64 (G + 1,) group g is ``order[starts[g]:starts[g + 1]]``."""
        ...

    @property
    def inverse(self) -> np.ndarray:
        """int64 (N,) ``order[inverse[i]] == i``."""
        ...


def grouped_top_m(
    scores: np.ndarray,
    tiebreak: Callable[[np.ndarray], np.ndarray],
    layout: GroupLayout,
    quotas: Sequence[int],
) -> np.ndarray:
    """Positions of the top ``quotas[g]`` of every group g, each by :func:`top_m`'s order.

    Parameters
    ----------
    scores:
        float64 (N,) over all positions; ``-inf`` = ineligible.
    tiebreak:
        A function int64 positions -> their uint64 tie-breaks.
    layout:
        The positions grouped by class (``order``, ``starts``, ``inverse``); groups past
        ``starts`` are empty.
    quotas:
        How many to take per group, ``0 <= quotas[g] <=`` eligible in group g.

    Returns
    -------
    int64 (sum(quotas),) positions, grouped in group order.

    Raises
    ------
    ValueError
        If a quota exceeds its group's eligible samples.

    Example
    -------
    >>> import numpy as np
    >>> from workers.shard_data import ShardData
    >>> layout = ShardData(0, 4, labels=np.array([0, 1, 0, 1])).derived.label_layout()
    >>> s = np.array([0.5, 0.9, 0.1, 0.7])
    >>> grouped_top_m(s, lambda p: p.astype(np.uint64), layout, [1, 2]).tolist()
    [0, 1, 3]
    """
    order, starts = layout.order, layout.starts
    in_order = np.empty(order.shape[0])
    in_order[layout.inverse] = scores  # one in-order read: faster than gathering scores[order]
    groups = [g for g, q in enumerate(quotas) if q > 0]

    def take(g: int) -> np.ndarray:
        lo, hi = (int(starts[g]), int(starts[g + 1])) if g + 1 < starts.shape[0] else (0, 0)

        def group_tiebreak(p: np.ndarray) -> np.ndarray:
            return tiebreak(order[p + lo])

        try:  # positions ascend within a group, so "position asc" among ties is kept
            sub = top_m(in_order[lo:hi], group_tiebreak, int(quotas[g]))
        except ValueError as exc:
            raise ValueError(f"group {g}: {exc}") from None
        return order[sub + lo]

    def run(chunk: list[int]) -> list[np.ndarray]:
        return [take(g) for g in chunk]

    # the groups in contiguous chunks of about equal size, one per thread; each group's
    # picks do not depend on the others, and they are joined in group order
    sizes = [int(starts[g + 1] - starts[g]) if g + 1 < starts.shape[0] else 0 for g in groups]
    threads = selection_threads() if order.shape[0] >= _MIN_SPLIT else 1
    chunks = _chunks(groups, sizes, threads)
    picks = [np.empty(0, dtype=np.int64)]
    for part in run_tasks([lambda c=c: run(c) for c in chunks]):
        picks += part
    return np.concatenate(picks)


def _chunks(items: list[int], sizes: list[int], parts: int) -> list[list[int]]:
    """``items`` cut into at most ``parts`` contiguous runs of about equal total size."""
    total = sum(sizes)
    if parts <= 1 or len(items) <= 1 or total == 0:
        return [items] if items else []
    out: list[list[int]] = [[]]
    done = 0
    for item, size in zip(items, sizes, strict=True):
        if out[-1] and done >= total * len(out) / parts and len(out) < parts:
            out.append([])
        out[-1].append(item)
        done += size
    return out
