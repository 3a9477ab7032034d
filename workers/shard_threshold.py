"""The shard side of the grouped threshold protocol: score keys, histograms, candidates, take.

:class:`GroupedThreshold` is the part of :class:`workers.selection_shard.SelectionShard` that
answers the coordinator's threshold protocol (``service.selection.threshold``) over the open
stage's scores: ``stage_summary``, ``group_histogram`` rounds, ``group_candidates`` and
``group_take``. Pure numpy.

A stage with ``quotas`` (class quotas) groups the samples by ``data.labels`` and takes the top
``quotas[c]`` of every class c in one protocol run: every message carries one entry per class,
so the number of calls per stage does not grow with the number of classes. A stage without
quotas is a single group holding every sample.

Scores are compared through order-preserving uint64 keys: ``key(a) < key(b)`` iff ``a < b`` for
non-NaN floats (``-0.0`` is normalized to ``+0.0`` first). Ineligible samples (score ``-inf``)
get key 0, below every eligible key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from saelect.workers.shard_data import ShardData

__all__ = ["NO_KEY", "GroupSummary", "GroupedThreshold", "score_keys"]

_SIGN = np.uint64(1 << 63)
NO_KEY = (1 << 64) - 1
"""Take threshold meaning "take nothing by key" (above every score key)."""

_NEG_INF_KEY = np.uint64(0x000FFFFFFFFFFFFF)  # raw order key of -inf, the smallest non-NaN


def score_keys(scores: np.ndarray) -> np.ndarray:
    """Order-preserving uint64 keys of float64 scores (N,); ``-inf`` (ineligible) maps to 0.

    Scores must be NaN-free with ``-0.0`` already normalized to ``+0.0``. Negative floats have
    their bits flipped, non-negative ones their sign bit set; subtracting the key of ``-inf``
    (the smallest) makes it 0 without wrapping.
    """
    bits = scores.view(np.uint64)
    keys = np.right_shift(bits, np.uint64(63))  # 1 for negatives
    np.negative(keys, out=keys)  # all ones for negatives, 0 otherwise
    keys |= _SIGN
    keys ^= bits
    keys -= _NEG_INF_KEY
    return keys


def _cell_counts(
    v: np.ndarray, row: np.ndarray, lo: np.ndarray, shift: np.ndarray, bins: int, rows: int
) -> np.ndarray:
    """int64 (rows * bins,) counts of values v (c,) at cell ``row * bins + (v - lo[row]) >>
    shift[row]``."""
    d = v - lo[row]
    d >>= shift[row]
    d += row.astype(np.uint64) * np.uint64(bins)
    return np.bincount(d.view(np.int64), minlength=rows * bins)


class GroupSummary(NamedTuple):
    """Per group of the open stage: eligible count and key range (keys 0 where count is 0)."""

    eligible: np.ndarray
    """int64 (G,) eligible samples per group."""
    min_key: np.ndarray
    """uint64 (G,) smallest eligible key per group."""
    max_key: np.ndarray
    """uint64 (G,) largest eligible key per group."""


class GroupedThreshold:
    """The threshold protocol over the open stage's scores, mixed into ``SelectionShard``.

    The host class provides ``data``, the open stage's ``_quotas`` (None: one group), and
    ``stage_scores()``, ``tiebreak_local(pos)`` and ``take_local(pos)``; it calls
    :meth:`_reset_threshold` whenever a stage opens or closes.
    """

    data: ShardData
    _quotas: tuple[int, ...] | None  # the open stage's per-class counts
    _keys: np.ndarray | None  # uint64 (n,)
    _summary: GroupSummary | None
    _gk: tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray] | None
    stage_scores: Callable[[], np.ndarray]  # float64 (n,) scores of the open stage
    tiebreak_local: Callable[[np.ndarray], np.ndarray]  # uint64 tie-breaks of local positions
    take_local: Callable[[np.ndarray], int]  # select local positions, close the stage

    def _reset_threshold(self) -> None:
        """Forget the open stage's keys, summary and narrowed windows."""
        self._keys = None
        self._summary = None
        self._gk = None
        # the protocol's narrowed windows, kept between rounds (they nest): (positions, group,
        # key) of the refined groups' samples inside their key window, and (positions, group,
        # tie-break) of the tie groups' samples of their boundary key inside their window
        empty = np.empty(0, dtype=np.int64)
        self._cand = (empty, empty, np.empty(0, dtype=np.uint64))
        self._ties = (empty, empty, np.empty(0, dtype=np.uint64))
        self._tie_groups = self._ties  # the same, never narrowed (take needs the whole group)
        self._refined = np.zeros(0, dtype=bool)  # (G,) groups whose window was narrowed
        self._tie_key = np.zeros(0, dtype=np.uint64)  # (G,) boundary key per tie group

    def _ensure_keys(self) -> np.ndarray:
        if self._keys is None:
            self._keys = score_keys(self.stage_scores())
        return self._keys

    @property
    def _num_groups(self) -> int:
        return 1 if self._quotas is None else len(self._quotas)

    def _grouped_keys(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
        """(keys in group order (n,), order (n,) or None = identity, group of each (n,),
        starts (G + 1,)) of the open stage (cached); samples whose label is >= G are left out."""
        if self._gk is None:
            keys = self._ensure_keys()
            size = self._num_groups
            if self._quotas is None:
                starts = np.array([0, self.data.n], dtype=np.int64)
                self._gk = (keys, None, np.zeros(self.data.n, dtype=np.int64), starts)
            else:
                layout = self.data.derived.label_layout()
                starts = layout.starts[: size + 1]
                if starts.shape[0] < size + 1:
                    pad = np.full(size + 1 - starts.shape[0], starts[-1], dtype=np.int64)
                    starts = np.concatenate([starts, pad])
                order = layout.order[: starts[-1]]
                gid = np.repeat(np.arange(size, dtype=np.int64), np.diff(starts))
                self._gk = (keys[order], order, gid, starts)
        return self._gk

    def stage_summary(self) -> GroupSummary:
        """Per group: eligible count, smallest and largest eligible key (cached per stage)."""
        if self._summary is None:
            gk, _, _, starts = self._grouped_keys()
            size = self._num_groups
            eligible = np.zeros(size, dtype=np.int64)
            kmin = np.zeros(size, dtype=np.uint64)
            kmax = np.zeros(size, dtype=np.uint64)
            present = np.flatnonzero(np.diff(starts) > 0)  # groups with samples here
            if present.shape[0]:
                at = starts[present]  # segments tile gk, so reduceat ends at the next start
                eligible[present] = np.add.reduceat((gk != 0).view(np.uint8), at, dtype=np.int64)
                low = np.minimum.reduceat(gk - np.uint64(1), at) + np.uint64(1)  # 0 wraps up
                high = np.maximum.reduceat(gk, at)
                some = eligible[present] > 0
                kmin[present[some]] = low[some]
                kmax[present[some]] = high[some]
            self._summary = GroupSummary(eligible, kmin, kmax)
        return self._summary

    def _key_entries(
        self, groups: np.ndarray, lo: np.ndarray, hi: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Eligible samples of ``groups`` with key in their window [lo[a], hi[a]]:
        (local positions, group, key, row a), all (c,). The windows of successive calls nest,
        so the result is kept and the next call filters it."""
        size = self._num_groups
        row_of = np.full(size, -1, dtype=np.int64)
        row_of[groups] = np.arange(groups.shape[0])
        pos, grp, key = self._cand
        row = row_of[grp]  # (c,)
        mine = row >= 0
        r = row[mine]
        inside = (key[mine] >= lo[r]) & (key[mine] <= hi[r])
        keep = ~mine
        keep[np.flatnonzero(mine)[inside]] = True
        pos, grp, key, row = pos[keep], grp[keep], key[keep], row[keep]
        fresh = groups[~self._refined[groups]]
        if fresh.shape[0]:  # first narrowing of these groups: one pass over the stage
            gk, order, gid, _ = self._grouped_keys()
            new_row = np.full(size, -1, dtype=np.int64)
            new_row[fresh] = row_of[fresh]
            fr = new_row[gid]  # (n,)
            take = fr >= 0
            idx = np.flatnonzero(take)
            fr = fr[idx]
            k = gk[idx]
            inside = (k >= np.maximum(lo[fr], np.uint64(1))) & (k <= hi[fr])
            idx, fr, k = idx[inside], fr[inside], k[inside]
            pos = np.concatenate([pos, idx if order is None else order[idx]])
            grp = np.concatenate([grp, groups[fr]])
            key = np.concatenate([key, k])
            row = np.concatenate([row, fr])
            self._refined[fresh] = True
        self._cand = (pos, grp, key)
        mine = row >= 0
        return pos[mine], grp[mine], key[mine], row[mine]

    def _ensure_ties(self, groups: np.ndarray, keys: np.ndarray) -> None:
        """Collect the samples of key ``keys[a]`` in group ``groups[a]`` with their tie-breaks,
        for the groups not collected yet (or collected for another key)."""
        new = np.flatnonzero(self._tie_key[groups] != keys)
        if not new.shape[0]:
            return
        nk = keys[new]
        pos, grp, _, _ = self._key_entries(groups[new], nk, nk)
        tb = self.tiebreak_local(pos)
        for name in ("_ties", "_tie_groups"):  # narrowed windows; whole tie groups
            kept = getattr(self, name)
            old = np.isin(kept[1], groups[new], invert=True)
            joined = [
                np.concatenate([a[old], b]) for a, b in zip(kept, (pos, grp, tb), strict=True)
            ]
            setattr(self, name, tuple(joined))
        self._tie_key[groups[new]] = nk

    def _tie_entries(
        self, groups: np.ndarray, keys: np.ndarray, lo: np.ndarray, hi: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Eligible samples of ``groups`` whose key is ``keys[a]`` and whose tie-break lies in
        [lo[a], hi[a]]: (local positions, group, tie-break, row a). Kept and narrowed like
        :meth:`_key_entries`."""
        self._ensure_ties(groups, keys)
        row_of = np.full(self._num_groups, -1, dtype=np.int64)
        row_of[groups] = np.arange(groups.shape[0])
        pos, grp, tb = self._ties
        row = row_of[grp]
        mine = row >= 0
        r = row[mine]
        inside = (tb[mine] >= lo[r]) & (tb[mine] <= hi[r])
        keep = ~mine
        keep[np.flatnonzero(mine)[inside]] = True
        pos, grp, tb, row = pos[keep], grp[keep], tb[keep], row[keep]
        self._ties = (pos, grp, tb)
        mine = row >= 0
        return pos[mine], grp[mine], tb[mine], row[mine]

    def group_histogram(
        self,
        groups: np.ndarray,
        tie: np.ndarray,
        lo: np.ndarray,
        hi: np.ndarray,
        shift: np.ndarray,
        key: np.ndarray,
        bins: int,
    ) -> np.ndarray:
        """int64 (A, bins) counts, one row per requested group.

        Row a counts group ``groups[a]``'s eligible samples whose value lies in
        [lo[a], hi[a]], by bin ``(value - lo[a]) >> shift[a]``. The value is the score key, or,
        where ``tie[a]``, the tie-break of the samples whose key is ``key[a]``.
        """
        groups = np.asarray(groups, dtype=np.int64)
        tie = np.asarray(tie, dtype=bool)
        lo, hi = np.asarray(lo, dtype=np.uint64), np.asarray(hi, dtype=np.uint64)
        shift, key = np.asarray(shift, dtype=np.uint64), np.asarray(key, dtype=np.uint64)
        size = groups.shape[0]
        out = np.zeros(size * bins, dtype=np.int64)
        summary = self.stage_summary()
        whole = (
            ~tie
            & ~self._refined[groups]
            & (lo <= summary.min_key[groups])
            & (summary.max_key[groups] <= hi)
        )
        if whole.any():  # windows holding every eligible key of the group: no positions kept
            gk, _, gid, _ = self._grouped_keys()
            row_of = np.full(self._num_groups, -1, dtype=np.int64)
            row_of[groups[whole]] = np.flatnonzero(whole)
            r = row_of[gid]  # (n,)
            if bool(whole.all()) and size == self._num_groups:
                v = gk
            else:
                sub = np.flatnonzero(r >= 0)
                r, v = r[sub], gk[sub]
            low = lo[r]
            d = np.maximum(v, low)  # ineligible (key 0) lands in bin 0, taken back below
            d -= low
            d >>= shift[r]
            d += r.astype(np.uint64) * np.uint64(bins)
            out += np.bincount(d.view(np.int64), minlength=size * bins)
            ineligible = np.bincount(r, minlength=size) - np.where(
                whole, summary.eligible[groups], 0
            )
            out[np.flatnonzero(whole) * bins] -= ineligible[whole]
        rest = ~whole & ~tie
        if rest.any():
            a = np.flatnonzero(rest)
            _, _, v, r = self._key_entries(groups[a], lo[a], hi[a])
            r = a[r]
            out += _cell_counts(v, r, lo, shift, bins, size)
        if tie.any():
            a = np.flatnonzero(tie)
            _, _, v, r = self._tie_entries(groups[a], key[a], lo[a], hi[a])
            r = a[r]
            out += _cell_counts(v, r, lo, shift, bins, size)
        return out.reshape(size, bins)

    def group_candidates(
        self,
        groups: np.ndarray,
        tie: np.ndarray,
        lo: np.ndarray,
        hi: np.ndarray,
        key: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Boundary candidates of the requested groups: (group int64, score float64,
        tie-break uint64, global index int64), one entry per sample.

        Group ``groups[a]``'s candidates are its eligible samples with key in [lo[a], hi[a]],
        or, where ``tie[a]``, its samples of key ``key[a]`` whose tie-break is in
        [lo[a], hi[a]].
        """
        groups = np.asarray(groups, dtype=np.int64)
        tie = np.asarray(tie, dtype=bool)
        lo, hi = np.asarray(lo, dtype=np.uint64), np.asarray(hi, dtype=np.uint64)
        key = np.asarray(key, dtype=np.uint64)
        a, t = np.flatnonzero(~tie), np.flatnonzero(tie)
        pos_k, grp_k, _, _ = self._key_entries(groups[a], lo[a], hi[a])
        pos_t, grp_t, tb_t, _ = self._tie_entries(groups[t], key[t], lo[t], hi[t])
        pos = np.concatenate([pos_k, pos_t])
        tb = np.concatenate([self.tiebreak_local(pos_k), tb_t]).astype(np.uint64, copy=False)
        return np.concatenate([grp_k, grp_t]), self.stage_scores()[pos], tb, pos + self.data.lo

    def group_take(
        self,
        min_key: np.ndarray,
        tie_groups: np.ndarray,
        tie_keys: np.ndarray,
        tie_min: np.ndarray,
        exact: np.ndarray,
    ) -> int:
        """Select, in this stage: in every group g, the eligible samples with key >=
        ``min_key[g]`` (:data:`NO_KEY`: none); in group ``tie_groups[a]`` the samples of key
        ``tie_keys[a]`` with tie-break >= ``tie_min[a]``; and the global indices ``exact`` that
        fall in this shard. Returns how many this shard took."""
        keys = self._ensure_keys()
        min_key = np.asarray(min_key, dtype=np.uint64)
        if self._quotas is None:
            chosen = keys >= min_key[0]
        else:
            labels = self.data.labels
            assert labels is not None
            table = np.full(max(min_key.shape[0], int(labels.max(initial=-1)) + 1), NO_KEY)
            table = table.astype(np.uint64)
            table[: min_key.shape[0]] = min_key
            chosen = keys >= table[labels]
        chosen &= keys > 0
        tie_groups = np.asarray(tie_groups, dtype=np.int64)
        if tie_groups.shape[0]:
            self._ensure_ties(tie_groups, np.asarray(tie_keys, dtype=np.uint64))
            row_of = np.full(self._num_groups, -1, dtype=np.int64)
            row_of[tie_groups] = np.arange(tie_groups.shape[0])
            pos, grp, tb = self._tie_groups  # every sample of each group's boundary key
            row = row_of[grp]
            mine = np.flatnonzero(row >= 0)
            above = tb[mine] >= np.asarray(tie_min, dtype=np.uint64)[row[mine]]
            chosen[pos[mine[above]]] = True
        exact = np.asarray(exact, dtype=np.int64)
        local = exact[(exact >= self.data.lo) & (exact < self.data.hi)] - self.data.lo
        chosen[local] = True
        return self.take_local(np.flatnonzero(chosen))
