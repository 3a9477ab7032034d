"""Coordinator side of the histogram-threshold protocol: exact global top m over S shards.

No shard ships all its scores. Scores are compared through order-preserving uint64 keys (see
``workers.selection_shard.score_keys``), so histogram bins are exact integer ranges:

1. every shard reports (count, min key, max key) of its eligible scores;
2. the window [klo, khi] (initially [min, max]) is cut into at most ``bins`` bins of width
   2**shift; the summed histogram locates the bin holding the m-th largest key; the window
   shrinks to it, remembering how many keys lie above. Repeat until the window holds at most
   ``cap`` candidates or a single key;
3. if a single key still holds more than ``cap`` samples (heavy ties), the same refinement runs
   over the tie-breaks of that key's samples;
4. the coordinator pulls the boundary candidates (score, tie-break, global index), orders them by
   (score desc, tie-break desc, index asc) and tells every shard: take every key above the window
   plus these exact indices.

The result equals :func:`service.selection.topk.top_m` on the concatenated scores exactly.
The code is generic over ``broadcast(method_name, *args) -> [result per shard]``, so it drives
in-process :class:`workers.selection_shard.SelectionShard` objects (:func:`local_broadcast`) and
Ray actor handles alike (``ray.get([getattr(a, name).remote(*args) for a in actors])``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = ["Broadcast", "ProtocolTrace", "global_top_m", "local_broadcast"]

Broadcast = Callable[..., list[Any]]
"""broadcast(method_name, *args) -> one result per shard, in shard order."""

_U64_MAX = (1 << 64) - 1


class ProtocolTrace(NamedTuple):
    """What one run of the protocol cost."""

    rounds: int
    """Histogram rounds (score keys and tie-breaks together)."""
    candidates: int
    """Boundary candidates pulled to the coordinator."""
    taken: int
    """Samples taken over all shards (== m)."""


def local_broadcast(shards: Sequence[Any]) -> Broadcast:
    """A :data:`Broadcast` over in-process shard objects (calls each shard in order)."""

    def broadcast(method: str, *args: Any) -> list[Any]:
        return [getattr(s, method)(*args) for s in shards]

    return broadcast


def _refine(
    hist: Callable[[int, int, int, int], np.ndarray],
    lo: int,
    hi: int,
    count: int,
    need: int,
    *,
    bins_log2: int,
    cap: int,
) -> tuple[int, int, int, int, int]:
    """Shrink [lo, hi] around the need-th largest value until it holds <= cap or one value.

    ``hist(lo, hi, shift, nbins)`` returns summed counts; returns (lo, hi, count in window,
    count above the window, rounds).
    """
    above = 0
    rounds = 0
    while count > cap and lo < hi:
        width = hi - lo
        shift = max(0, width.bit_length() - bins_log2)
        nbins = (width >> shift) + 1
        counts = np.asarray(hist(lo, hi, shift, nbins), dtype=np.int64)  # (nbins,)
        rev_cum = np.cumsum(counts[::-1])
        j = int(np.searchsorted(rev_cum, need - above, side="left"))
        b = nbins - 1 - j
        above += int(rev_cum[j] - counts[b])
        count = int(counts[b])
        lo, hi = lo + (b << shift), min(hi, lo + ((b + 1) << shift) - 1)
        rounds += 1
    return lo, hi, count, above, rounds


def global_top_m(
    broadcast: Broadcast, m: int, *, bins: int = 1024, cap: int = 65536
) -> ProtocolTrace:
    """Make the shards take, in their open stage, exactly the global top m.

    Parameters
    ----------
    broadcast:
        Calls a shard method on every shard (see module docstring).
    m:
        How many to take, ``0 <= m <= eligible samples over all shards``.
    bins:
        Histogram bins per round, a power of two >= 2.
    cap:
        Largest boundary set pulled to the coordinator, >= 1.

    Returns
    -------
    :class:`ProtocolTrace`.

    Raises
    ------
    ValueError
        For bad bins or cap, or m outside [0, eligible].
    """
    if bins < 2 or bins & (bins - 1):
        raise ValueError(f"bins={bins} must be a power of two >= 2")
    if cap < 1:
        raise ValueError(f"cap={cap} must be >= 1")
    bins_log2 = bins.bit_length() - 1
    summaries = broadcast("score_summary")
    total = sum(int(s[0]) for s in summaries)
    if not 0 <= m <= total:
        raise ValueError(f"m={m} outside [0, {total}] (the eligible samples)")
    if m == 0:
        return ProtocolTrace(0, 0, 0)
    kmin = min(int(s[1]) for s in summaries if s[0] > 0)
    kmax = max(int(s[2]) for s in summaries if s[0] > 0)
    if m == total:
        taken = sum(broadcast("take", kmin, np.empty(0, dtype=np.int64), None))
        return ProtocolTrace(0, 0, int(taken))

    def key_hist(lo: int, hi: int, shift: int, nbins: int) -> np.ndarray:
        return np.sum(broadcast("histogram", lo, hi, shift, nbins), axis=0)

    klo, khi, count, above, rounds = _refine(
        key_hist, kmin, kmax, total, m, bins_log2=bins_log2, cap=cap
    )
    need = m - above
    tie: tuple[int, int] | None = None
    if count > cap:  # a single key holds more than cap samples: refine over its tie-breaks
        ties = [t for t in broadcast("tie_summary", klo) if t[0] > 0]
        tmin, tmax = min(int(t[1]) for t in ties), max(int(t[2]) for t in ties)

        def tie_hist(lo: int, hi: int, shift: int, nbins: int) -> np.ndarray:
            return np.sum(broadcast("tie_histogram", klo, lo, hi, shift, nbins), axis=0)

        tlo, thi, count, tie_above, tie_rounds = _refine(
            tie_hist, tmin, tmax, count, need, bins_log2=bins_log2, cap=cap
        )
        rounds += tie_rounds
        need -= tie_above
        tie = (tlo, thi)
    parts = broadcast("candidates", klo, khi, tie)
    scores = np.concatenate([p[0] for p in parts])
    tbs = np.concatenate([p[1] for p in parts]).astype(np.uint64, copy=False)
    idx = np.concatenate([p[2] for p in parts]).astype(np.int64, copy=False)
    order = np.lexsort((idx, ~tbs, -scores))  # score desc, tie-break desc, index asc
    exact = np.sort(idx[order[:need]])
    take_tie = None if tie is None or tie[1] >= _U64_MAX else (klo, tie[1] + 1)
    taken = int(sum(broadcast("take", khi + 1, exact, take_tie)))
    if taken != m:
        raise RuntimeError(f"threshold protocol took {taken} samples, expected {m}")
    return ProtocolTrace(rounds, int(idx.shape[0]), taken)
