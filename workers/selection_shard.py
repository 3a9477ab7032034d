"""One shard's per-sample selection state and its side of the threshold protocol.

A :class:`SelectionShard` holds the samples of one contiguous global index range [lo, hi): their
scores (:class:`ShardData`) and the policy's per-sample counters. The coordinator (the selection
engine in ``service.selection``) drives it through a few small methods; the policy object is
passed in, so this module stays pure numpy (plus ``scipy.sparse`` for the codes) and never
imports ``service``.

Per epoch the engine calls ``begin_epoch`` (and ``local_stats`` for further reduction rounds),
then for every stage ``open_stage`` and the grouped threshold protocol (``group_histogram``
rounds, ``group_candidates``, ``group_take``), or, for one in-process shard, ``begin_stage``,
``stage_scores`` and ``take_local``; then ``finish`` (selected indices, weights, stats
partials) and ``commit`` (idempotent per epoch).

A stage with ``quotas`` (class quotas) groups the samples by ``data.labels`` and takes the top
``quotas[c]`` of every class c in one protocol run: every message carries one entry per class,
so the number of calls per stage does not grow with the number of classes. A stage without
quotas is a single group holding every sample.

Scores are compared through order-preserving uint64 keys: ``key(a) < key(b)`` iff ``a < b`` for
non-NaN floats (``-0.0`` is normalized to ``+0.0`` first). Ineligible samples (score ``-inf``)
get key 0, below every eligible key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
from saelect.workers.shard_derived import LabelLayout, ShardDerived

__all__ = [
    "GroupSummary",
    "LabelLayout",
    "SelectionShard",
    "ShardData",
    "ShardDerived",
    "ShardPolicy",
    "score_keys",
]

_SIGN = np.uint64(1 << 63)
NO_KEY = (1 << 64) - 1
"""Take threshold meaning "take nothing by key" (above every score key)."""


@dataclass(frozen=True, eq=False)
class ShardData:
    """What one shard knows about its samples [lo, hi) (arrays are indexed by local position).

    Read-only structures derived from these arrays (the label layout, the codes as a sparse
    matrix) are built on first use by :attr:`derived` and never travel with a pickled copy.
    """

    lo: int
    """First global index of the shard."""
    hi: int
    """One past the last global index (hi >= lo)."""
    R: np.ndarray | None = None
    """float64 (n,) representativeness in [0, 1], or None."""
    D: np.ndarray | None = None
    """float64 (n,) rare-factor diversity in [0, 1], or None."""
    labels: np.ndarray | None = None
    """int64 (n,) class labels >= 0, or None."""
    code_ids: np.ndarray | None = None
    """int32 (n, k) active SAE unit ids per sample, or None."""
    code_values: np.ndarray | None = None
    """float (n, k) activations of those units (float16 as stored), or None."""
    p: np.ndarray | None = None
    """float64 (M,) global factor frequencies p_j (the same on every shard), or None."""

    def __post_init__(self) -> None:
        if self.lo < 0 or self.hi < self.lo:
            raise ValueError(f"shard range [lo={self.lo}, hi={self.hi}) is invalid")
        n = self.hi - self.lo
        for name in ("R", "D", "labels", "code_ids", "code_values"):
            arr = getattr(self, name)
            if arr is not None and arr.shape[0] != n:
                raise ValueError(f"{name} has {arr.shape[0]} rows, shard [lo, hi) holds {n}")
        if (self.code_ids is None) != (self.code_values is None):
            raise ValueError("code_ids and code_values come together")
        if self.code_ids is not None and self.code_ids.shape != self.code_values.shape:  # type: ignore[union-attr]
            raise ValueError(
                f"code_ids shape {self.code_ids.shape} != code_values shape "
                f"{self.code_values.shape}"  # type: ignore[union-attr]
            )

    @property
    def n(self) -> int:
        """Number of samples in the shard."""
        return self.hi - self.lo

    @property
    def derived(self) -> ShardDerived:
        """Lazily built read-only structures over this data (see :class:`ShardDerived`)."""
        derived = self.__dict__.get("_derived")
        if derived is None:
            derived = ShardDerived(self)
            object.__setattr__(self, "_derived", derived)
        return derived

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_derived", None)  # rebuilt on demand where the copy lands
        return state


class ShardPolicy(Protocol):
    """The part of a selection policy that runs where the samples live (see service/policies).

    The methods are documented on ``service.policies.base.Policy``, which implements them.
    """

    def init_counters(self, n: int) -> dict[str, np.ndarray]:
        """Per-sample mutable state (arrays with n rows) beyond ``usage``."""
        ...

    def local_stats(
        self, epoch: int, data: ShardData, counters: dict[str, np.ndarray], ctx: dict | None
    ) -> dict:
        """Partial reductions for the coordinator's per-epoch context."""
        ...

    def local_scores(
        self, stage: Any, epoch: int, ctx: dict, data: ShardData, counters: dict[str, np.ndarray]
    ) -> np.ndarray:
        """float64 (n,) stage scores; -inf = ineligible.

        A policy may also define ``local_scores_into(stage, epoch, ctx, data, counters, out)``
        returning the same scores, written into ``out`` (float64 (n,), a buffer the shard
        reuses for every stage) where it can: the shard then calls that instead.
        """
        ...

    def tiebreak(self, epoch: int, global_idx: np.ndarray) -> np.ndarray:
        """uint64 tie-breaks of global indices."""
        ...

    def weights(
        self,
        epoch: int,
        ctx: dict,
        data: ShardData,
        counters: dict[str, np.ndarray],
        selected_local: np.ndarray,
    ) -> np.ndarray | None:
        """float64 (m_s,) loss weights of the selected samples, or None (all 1)."""
        ...

    def selection_partials(
        self,
        epoch: int,
        ctx: dict,
        data: ShardData,
        counters: dict[str, np.ndarray],
        selected_local: np.ndarray,
    ) -> dict:
        """Partial reductions over the shard's selection, for the epoch's stats."""
        ...

    def commit(
        self,
        epoch: int,
        ctx: dict,
        data: ShardData,
        counters: dict[str, np.ndarray],
        selected_local: np.ndarray,
    ) -> dict:
        """Update the policy's counters for a committed selection."""
        ...

    def feedback(
        self,
        data: ShardData,
        counters: dict[str, np.ndarray],
        local_idx: np.ndarray,
        losses: np.ndarray,
    ) -> None:
        """Record per-sample losses (ValueError for a policy that takes none)."""
        ...


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


class SelectionShard:
    """Selection state of the samples [lo, hi) and the shard side of the threshold protocol.

    Counters always hold ``usage`` (int32 (n,): times each sample was selected in committed
    epochs) plus whatever ``policy.init_counters(n)`` adds.
    """

    def __init__(self, data: ShardData, policy: ShardPolicy) -> None:
        self.data = data
        self.policy = policy
        self.counters: dict[str, np.ndarray] = {"usage": np.zeros(data.n, dtype=np.int32)}
        self.counters.update(policy.init_counters(data.n))
        self.committed_epoch = -1
        self._epoch = -1
        self._taken = np.zeros(data.n, dtype=bool)  # (n,) selected so far in this epoch
        self._taken_count = 0
        self._pending: tuple[int, np.ndarray] | None = None  # (epoch, selected local positions)
        self._buffer: np.ndarray | None = None  # float64 (n,) stage scores, reused (see below)
        self._reset_stage()

    # ----------------------------------------------------------------- epoch and stage set-up
    def _reset_stage(self) -> None:
        self._stage: tuple[Any, int] | None = None
        self._scores: np.ndarray | None = None  # float64 (n,)
        self._all_eligible = False  # the open stage's scores hold no -inf (none to check)
        self._keys: np.ndarray | None = None  # uint64 (n,)
        self._quotas: tuple[int, ...] | None = None  # the open stage's per-class counts
        self._summary: GroupSummary | None = None
        self._gk: tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray] | None = None
        # the protocol's narrowed windows, kept between rounds (they nest): (positions, group,
        # key) of the refined groups' samples inside their key window, and (positions, group,
        # tie-break) of the tie groups' samples of their boundary key inside their window
        empty = np.empty(0, dtype=np.int64)
        self._cand = (empty, empty, np.empty(0, dtype=np.uint64))
        self._ties = (empty, empty, np.empty(0, dtype=np.uint64))
        self._tie_groups = self._ties  # the same, never narrowed (take needs the whole group)
        self._refined = np.zeros(0, dtype=bool)  # (G,) groups whose window was narrowed
        self._tie_key = np.zeros(0, dtype=np.uint64)  # (G,) boundary key per tie group

    def buffer_nbytes(self) -> int:
        """Bytes of the stage-score buffer the shard reuses (0 before the first stage)."""
        return 0 if self._buffer is None else int(self._buffer.nbytes)

    def info(self) -> tuple[int, int]:
        """The shard's global range (lo, hi)."""
        return self.data.lo, self.data.hi

    def begin_epoch(self, epoch: int) -> dict:
        """Start selecting ``epoch``: clear this epoch's picks, return the first stats round.

        Returns ``{"n": n, **policy.local_stats(epoch, data, counters, None)}``.
        """
        if epoch <= self.committed_epoch:
            raise ValueError(f"epoch {epoch} is already committed on shard {self.info()}")
        self._epoch = epoch
        self._taken[:] = False
        self._taken_count = 0
        self._pending = None
        self._reset_stage()
        return {"n": self.data.n, **self.policy.local_stats(epoch, self.data, self.counters, None)}

    def local_stats(self, epoch: int, ctx: dict) -> dict:
        """A further round of partial reductions, given the context built so far."""
        return {"n": self.data.n, **self.policy.local_stats(epoch, self.data, self.counters, ctx)}

    def begin_stage(self, stage: Any, epoch: int, ctx: dict) -> None:
        """Compute this stage's local scores; samples taken earlier this epoch are ineligible.

        A stage whose ``quotas`` attribute is not None is grouped by ``data.labels``.
        """
        if epoch != self._epoch:
            raise ValueError(f"begin_stage for epoch {epoch}, but epoch {self._epoch} is open")
        self._reset_stage()
        into = getattr(self.policy, "local_scores_into", None)
        if into is not None:  # the policy writes into this shard's buffer, reused every stage
            if self._buffer is None:
                self._buffer = np.empty(self.data.n, dtype=np.float64)
            raw = into(stage, epoch, ctx, self.data, self.counters, self._buffer)
        else:
            raw = self.policy.local_scores(stage, epoch, ctx, self.data, self.counters)
        scores = np.asarray(raw, dtype=np.float64)
        if scores.shape != (self.data.n,):
            raise ValueError(
                f"policy returned scores of shape {scores.shape}, need ({self.data.n},)"
            )
        if not scores.flags.writeable or not scores.flags.c_contiguous:
            scores = np.ascontiguousarray(scores).copy()
        scores += 0.0  # -0.0 -> +0.0, so float ties and key ties agree
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf in the quick sum is fine
            total = scores.sum()
        if np.isnan(total) and np.isnan(scores).any():
            raise ValueError(f"policy produced NaN scores in epoch {epoch}")
        all_eligible = bool(np.isfinite(total))  # a finite sum: no infinite score
        if self._taken_count:
            scores[self._taken] = -np.inf
            all_eligible = False
        quotas = getattr(stage, "quotas", None)
        if quotas is not None:
            if self.data.labels is None:
                raise ValueError(f"stage {getattr(stage, 'key', stage)!r} needs labels")
            self._quotas = tuple(int(q) for q in quotas)
        self._stage = (stage, epoch)
        self._scores = scores
        self._all_eligible = all_eligible
        self._refined = np.zeros(self._num_groups, dtype=bool)
        self._tie_key = np.full(self._num_groups, NO_KEY, dtype=np.uint64)

    def open_stage(self, stage: Any, epoch: int, ctx: dict) -> GroupSummary:
        """:meth:`begin_stage`, then :meth:`stage_summary` (one call instead of two)."""
        self.begin_stage(stage, epoch, ctx)
        return self.stage_summary()

    def stage_scores(self) -> np.ndarray:
        """float64 (n,) scores of the open stage (a view: for the in-process single-shard path)."""
        if self._scores is None:
            raise ValueError("no stage is open")
        return self._scores

    def tiebreak_local(self, pos: np.ndarray) -> np.ndarray:
        """uint64 tie-breaks of local positions in the open epoch."""
        return self.policy.tiebreak(self._epoch, np.asarray(pos, dtype=np.int64) + self.data.lo)

    # ----------------------------------------------------------------- threshold protocol
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

    def take_local(self, pos: np.ndarray) -> int:
        """Select the local positions ``pos`` (all must be eligible in the open stage)."""
        pos = np.asarray(pos, dtype=np.int64)
        scores = self.stage_scores()
        if self._all_eligible:  # every position is eligible: check only the range
            if pos.shape[0] and (int(pos.min()) < 0 or int(pos.max()) >= scores.shape[0]):
                raise ValueError("take_local got a position outside the shard")
        elif pos.shape[0] and not np.all(scores[pos] > -np.inf):
            raise ValueError("take_local got an ineligible position")
        self._taken[pos] = True
        self._taken_count += int(pos.shape[0])
        self._reset_stage()
        return int(pos.shape[0])

    # ----------------------------------------------------------------- end of the epoch
    def finish(self, epoch: int, ctx: dict) -> dict:
        """Close the selection of ``epoch``.

        Returns ``{"indices": int64 sorted global indices, "weights": float64 or None,
        "stats": partial reductions}``; stats hold n, size, covered (samples selected at least
        once counting this epoch), usage_min/max/sum after this epoch, class_counts (or None),
        and ``policy`` (the policy's own partials).
        """
        if epoch != self._epoch:
            raise ValueError(f"finish for epoch {epoch}, but epoch {self._epoch} is open")
        sel = np.flatnonzero(self._taken)  # (m_s,) ascending local positions
        self._pending = (epoch, sel)
        usage = self.counters["usage"]
        after = usage + self._taken  # (n,) usage counting this epoch
        labels = self.data.labels
        stats = {
            "n": self.data.n,
            "size": int(sel.shape[0]),
            "covered": int(np.count_nonzero(after)),
            "usage_min": int(after.min()) if self.data.n else None,
            "usage_max": int(after.max()) if self.data.n else None,
            "usage_sum": int(after.sum(dtype=np.int64)),
            "class_counts": None if labels is None else np.bincount(labels[sel]),
            "policy": self.policy.selection_partials(epoch, ctx, self.data, self.counters, sel),
        }
        weights = self.policy.weights(epoch, ctx, self.data, self.counters, sel)
        return {"indices": sel + self.data.lo, "weights": weights, "stats": stats}

    def commit(self, epoch: int, ctx: dict) -> dict | None:
        """Count the finished selection of ``epoch`` in the counters; idempotent per epoch.

        Returns the policy's commit partials, or None when ``epoch`` was already committed.
        """
        if epoch <= self.committed_epoch:
            return None
        if self._pending is None or self._pending[0] != epoch:
            raise ValueError(f"commit of epoch {epoch} that this shard has not finished")
        sel = self._pending[1]
        self.counters["usage"][sel] += 1
        partials = self.policy.commit(epoch, ctx, self.data, self.counters, sel)
        self.committed_epoch = epoch
        self._pending = None
        return partials

    def feedback(self, global_idx: np.ndarray, losses: np.ndarray) -> int:
        """Apply per-sample losses; entries outside [lo, hi) are ignored. Returns how many."""
        global_idx = np.asarray(global_idx, dtype=np.int64)
        losses = np.asarray(losses, dtype=np.float64)
        mine = (global_idx >= self.data.lo) & (global_idx < self.data.hi)
        local = global_idx[mine] - self.data.lo
        self.policy.feedback(self.data, self.counters, local, losses[mine])
        return int(local.shape[0])

    # ----------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """{"lo", "hi", "committed_epoch", "counters": {name: array (n, ...)}} (copies)."""
        return {
            "lo": self.data.lo,
            "hi": self.data.hi,
            "committed_epoch": self.committed_epoch,
            "counters": {k: v.copy() for k, v in self.counters.items()},
        }

    def load_state_dict(self, states: list[dict]) -> None:
        """Restore this shard's counters from the states of any sharding of the same samples.

        ``states`` are :meth:`state_dict` outputs (of this or another partition into ranges); the
        slices overlapping [lo, hi) are copied in. ValueError when they do not cover the range,
        disagree on the committed epoch, or lack a counter.
        """
        lo, hi = self.data.lo, self.data.hi
        epochs = {int(s["committed_epoch"]) for s in states}
        if len(epochs) != 1:
            raise ValueError(f"shard states disagree on the committed epoch: {sorted(epochs)}")
        covered = np.zeros(self.data.n, dtype=bool)
        fresh = {k: v.copy() for k, v in self.counters.items()}
        for s in states:
            a, b = max(lo, int(s["lo"])), min(hi, int(s["hi"]))
            if a >= b:
                continue
            for name, arr in fresh.items():
                if name not in s["counters"]:
                    raise ValueError(f"shard state lacks counter {name!r}")
                arr[a - lo : b - lo] = s["counters"][name][a - int(s["lo"]) : b - int(s["lo"])]
            covered[a - lo : b - lo] = True
        if not covered.all():
            raise ValueError(f"shard states do not cover [{lo}, {hi})")
        self.counters = fresh
        self.committed_epoch = epochs.pop()
        self._epoch = -1
        self._pending = None
        self._taken[:] = False
        self._taken_count = 0
        self._reset_stage()
