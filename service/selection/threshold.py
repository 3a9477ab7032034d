"""Coordinator side of the histogram-threshold protocol: exact per-group top m over S shards.

No shard ships all its scores. Scores are compared through order-preserving uint64 keys (see
``workers.shard_threshold.score_keys``), so histogram bins are exact integer ranges. A stage
holds G groups (the classes of a class-quota stage, or one group of every sample) and takes the
top ``quotas[g]`` of each; every message below carries one entry per group, so the number of
calls does not depend on G:

1. every shard reports, per group, (count, min key, max key) of its eligible scores
   (``open_stage`` or ``stage_summary``);
2. for every group still too wide, its window [klo, khi] (initially [min, max]) is cut into at
   most ``2**b`` bins of width ``2**shift``; the summed (group, bin) histogram locates the bin
   holding the group's boundary (its ``quotas[g]``-th largest key); the window shrinks to it,
   remembering how many keys lie above. One ``group_histogram`` call per round serves every
   group, until each window holds at most its share of ``cap`` candidates or a single key;
3. a group whose boundary is a single key held by too many samples (heavy ties) refines, in the
   same rounds, over the tie-breaks of that key's samples;
4. the coordinator pulls every group's boundary candidates (score, tie-break, global index) in
   one call, orders each group's by (score desc, tie-break desc, index asc) and, in one more
   call, tells every shard: take in each group every key above its window plus these exact
   indices.

So a stage costs 3 + (histogram rounds) calls; the rounds depend on the spread of the keys (2
for uniform scores at N = 1e7), not on G. The result equals
:func:`service.selection.topk.top_m` per group on the concatenated scores exactly. The code is
generic over ``broadcast(method_name, *args) -> [result per shard]``, so it drives in-process
:class:`workers.selection_shard.SelectionShard` objects (:func:`local_broadcast`) and Ray actor
handles alike (``ray.get([a.call.remote(name, *args) for a in actors])``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "Broadcast",
    "ProtocolTrace",
    "global_top_m",
    "grouped_top_m_protocol",
    "local_broadcast",
]

Broadcast = Callable[..., list[Any]]
"""broadcast(method_name, *args) -> one result per shard, in shard order."""

_U64_MAX = (1 << 64) - 1
_NO_KEY = _U64_MAX  # workers.shard_threshold.NO_KEY: take nothing by key
_CELLS = 1 << 16  # (group, bin) cells per histogram round: at most 512 KiB per shard


class ProtocolTrace(NamedTuple):
    """What one run of the protocol cost."""

    rounds: int
    """Histogram rounds (score keys and tie-breaks together)."""
    candidates: int
    """Boundary candidates pulled to the coordinator."""
    taken: int
    """Samples taken over all shards (== sum of the quotas)."""
    calls: int = 0
    """Broadcasts made, counting the summary (``open_stage`` or ``stage_summary``)."""


def local_broadcast(shards: Sequence[Any]) -> Broadcast:
    """A :data:`Broadcast` over in-process shard objects (calls each shard in order)."""

    def broadcast(method: str, *args: Any) -> list[Any]:
        return [getattr(s, method)(*args) for s in shards]

    return broadcast


@dataclass
class _Window:
    """One group's refinement state on the coordinator."""

    quota: int
    lo: int  # key window [lo, hi], or tie-break window while tie is set
    hi: int
    count: int  # eligible samples in the window
    above: int = 0  # samples known to rank above the window
    key: int | None = None  # the single boundary key whose tie-breaks are being refined

    @property
    def need(self) -> int:
        return self.quota - self.above


def _refine_step(w: _Window, counts: np.ndarray, shift: int) -> None:
    """Shrink w's window to the bin of ``counts`` (int64 (bins,)) holding its need-th value."""
    nbins = counts.shape[0]
    rev_cum = np.cumsum(counts[::-1])
    j = int(np.searchsorted(rev_cum, w.need, side="left"))
    b = nbins - 1 - j
    w.above += int(rev_cum[j] - counts[b])
    w.count = int(counts[b])
    w.lo, w.hi = w.lo + (b << shift), min(w.hi, w.lo + ((b + 1) << shift) - 1)


def global_top_m(
    broadcast: Broadcast, m: int, *, bins: int = 1024, cap: int = 65536
) -> ProtocolTrace:
    """Make the shards take, in their open stage, exactly the global top m.

    The stage must be ungrouped (no quotas); see :func:`grouped_top_m_protocol` for the
    general case and the parameters.

    Raises
    ------
    ValueError
        For bad bins or cap, or m outside [0, eligible].
    """
    _check(bins, cap)
    summaries = broadcast("stage_summary")
    trace = grouped_top_m_protocol(broadcast, [m], summaries, bins=bins, cap=cap)
    return trace._replace(calls=trace.calls + 1)


def _check(bins: int, cap: int) -> None:
    if bins < 2 or bins & (bins - 1):
        raise ValueError(f"bins={bins} must be a power of two >= 2")
    if cap < 1:
        raise ValueError(f"cap={cap} must be >= 1")


def grouped_top_m_protocol(
    broadcast: Broadcast,
    quotas: Sequence[int],
    summaries: list[Any],
    *,
    bins: int = 1024,
    cap: int = 65536,
) -> ProtocolTrace:
    """Make the shards take, in their open stage, exactly the top ``quotas[g]`` of every group.

    Parameters
    ----------
    broadcast:
        Calls a shard method on every shard (see module docstring).
    quotas:
        How many to take per group, ``0 <= quotas[g] <= eligible samples of group g``; one
        entry for an ungrouped stage.
    summaries:
        Every shard's ``(count, min key, max key)`` arrays (G,) of its open stage, as returned
        by ``open_stage`` / ``stage_summary``.
    bins:
        Most histogram bins per group and round, a power of two >= 2 (fewer per group when
        many groups refine at once, so a round's histogram stays within 65536 cells).
    cap:
        Largest boundary set pulled to the coordinator over all groups, >= 1.

    Returns
    -------
    :class:`ProtocolTrace` (``calls`` counts the broadcasts made here, not the summary).

    Raises
    ------
    ValueError
        For bad bins or cap, or a quota outside [0, eligible].
    """
    _check(bins, cap)
    quotas = [int(q) for q in quotas]
    size = len(quotas)
    count = np.zeros(size, dtype=np.int64)
    kmin = [_U64_MAX] * size
    kmax = [0] * size
    for c, lo, hi in summaries:
        count += np.asarray(c, dtype=np.int64)
        for g in np.flatnonzero(np.asarray(c) > 0).tolist():
            kmin[g] = min(kmin[g], int(lo[g]))
            kmax[g] = max(kmax[g], int(hi[g]))
    for g, q in enumerate(quotas):
        if not 0 <= q <= count[g]:
            where = "" if size == 1 else f" in group {g}"
            raise ValueError(f"m={q} outside [0, {int(count[g])}] (the eligible samples{where})")
    if sum(quotas) == 0:
        return ProtocolTrace(0, 0, 0, 0)
    min_key = np.full(size, _NO_KEY, dtype=np.uint64)  # per group: take keys >= this
    windows: dict[int, _Window] = {}
    for g, q in enumerate(quotas):
        if q == count[g]:
            min_key[g] = 1  # the whole group
        elif q:
            windows[g] = _Window(q, kmin[g], kmax[g], int(count[g]))
    bins_log2 = bins.bit_length() - 1
    share = max(1, cap // max(1, len(windows)))  # each group's boundary set
    rounds = calls = 0
    while True:
        active = []
        for g, w in windows.items():
            if w.count <= share:
                continue
            if w.key is None and w.lo == w.hi:  # one key holds too many: go to its tie-breaks
                w.key, w.lo, w.hi = w.lo, 0, _U64_MAX
            if w.lo < w.hi:
                active.append(g)
        if not active:
            break
        b = min(bins_log2, max(1, (_CELLS // len(active)).bit_length() - 1))
        shifts = [max(0, (windows[g].hi - windows[g].lo).bit_length() - b) for g in active]
        spec = _spec(windows, active)
        hist = np.sum(
            broadcast(
                "group_histogram", *spec[:4], np.array(shifts, dtype=np.uint64), spec[4], 1 << b
            ),
            axis=0,
        )  # (A, 2**b)
        for a, g in enumerate(active):
            _refine_step(windows[g], hist[a], shifts[a])
        rounds += 1
        calls += 1
    exact = np.empty(0, dtype=np.int64)
    pulled = 0
    if windows:
        groups = list(windows)
        parts = broadcast("group_candidates", *_spec(windows, groups))
        calls += 1
        grp = np.concatenate([p[0] for p in parts]).astype(np.int64, copy=False)
        scores = np.concatenate([p[1] for p in parts])
        tbs = np.concatenate([p[2] for p in parts]).astype(np.uint64, copy=False)
        idx = np.concatenate([p[3] for p in parts]).astype(np.int64, copy=False)
        pulled = int(idx.shape[0])
        order = np.lexsort((idx, ~tbs, -scores, grp))  # per group: score, tie-break desc, idx
        grp, idx = grp[order], idx[order]
        starts = np.searchsorted(grp, groups, side="left")
        exact = np.sort(
            np.concatenate(
                [idx[s : s + windows[g].need] for s, g in zip(starts, groups, strict=True)]
            )
        )
    tie_groups, tie_keys, tie_min = [], [], []
    for g, w in windows.items():
        if w.key is None:
            min_key[g] = w.hi + 1  # every key above the window
        else:
            min_key[g] = w.key + 1
            if w.hi < _U64_MAX:  # the boundary key's tie-breaks above the window
                tie_groups.append(g)
                tie_keys.append(w.key)
                tie_min.append(w.hi + 1)
    taken = int(
        sum(
            broadcast(
                "group_take",
                min_key,
                np.array(tie_groups, dtype=np.int64),
                np.array(tie_keys, dtype=np.uint64),
                np.array(tie_min, dtype=np.uint64),
                exact,
            )
        )
    )
    calls += 1
    if taken != sum(quotas):
        raise RuntimeError(f"threshold protocol took {taken} samples, expected {sum(quotas)}")
    return ProtocolTrace(rounds, pulled, taken, calls)


def _spec(
    windows: dict[int, _Window], groups: list[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(groups, tie flags, lo, hi, tie keys) arrays of the windows of ``groups``."""
    ws = [windows[g] for g in groups]
    return (
        np.array(groups, dtype=np.int64),
        np.array([w.key is not None for w in ws], dtype=bool),
        np.array([w.lo for w in ws], dtype=np.uint64),
        np.array([w.hi for w in ws], dtype=np.uint64),
        np.array([0 if w.key is None else w.key for w in ws], dtype=np.uint64),
    )
