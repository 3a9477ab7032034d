"""One shard's per-sample selection state and its side of the threshold protocol.

A :class:`SelectionShard` holds the samples of one contiguous global index range [lo, hi): their
scores (:class:`ShardData`) and the policy's per-sample counters. The coordinator (the selection
engine in ``service.selection``) drives it through a few small methods; the policy object is
passed in, so this module stays pure numpy and never imports ``service``.

Per epoch the engine calls ``begin_epoch`` (and ``local_stats`` for further reduction rounds),
then for every stage ``begin_stage``, the threshold protocol (``score_summary``, ``histogram``,
``tie_summary``, ``tie_histogram``, ``candidates``, ``take``) or, for one in-process shard,
``stage_scores`` + ``take_local``; then ``finish`` (selected indices, weights, stats partials)
and ``commit`` (idempotent per epoch).

Scores are compared through order-preserving uint64 keys: ``key(a) < key(b)`` iff ``a < b`` for
non-NaN floats (``-0.0`` is normalized to ``+0.0`` first). Ineligible samples (score ``-inf``)
get key 0, below every eligible key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = ["SelectionShard", "ShardData", "ShardPolicy", "score_keys"]

_SIGN = np.uint64(1 << 63)


@dataclass(frozen=True, eq=False)
class ShardData:
    """What one shard knows about its samples [lo, hi) (arrays are indexed by local position)."""

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
        """float64 (n,) stage scores; -inf = ineligible."""
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
        self._reset_stage()

    # ----------------------------------------------------------------- epoch and stage set-up
    def _reset_stage(self) -> None:
        self._stage: tuple[Any, int] | None = None
        self._scores: np.ndarray | None = None  # float64 (n,)
        self._keys: np.ndarray | None = None  # uint64 (n,)
        self._win: tuple[int, int, np.ndarray] | None = None  # (klo, khi, positions)
        self._tie: tuple[int, np.ndarray, np.ndarray] | None = None  # (key, positions, tb)
        self._full_range: tuple[int, int, int] | None = None  # (count, min key, max key)

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
        """Compute this stage's local scores; samples taken earlier this epoch are ineligible."""
        if epoch != self._epoch:
            raise ValueError(f"begin_stage for epoch {epoch}, but epoch {self._epoch} is open")
        self._reset_stage()
        scores = np.asarray(
            self.policy.local_scores(stage, epoch, ctx, self.data, self.counters),
            dtype=np.float64,
        )
        if scores.shape != (self.data.n,):
            raise ValueError(
                f"policy returned scores of shape {scores.shape}, need ({self.data.n},)"
            )
        if not scores.flags.writeable or not scores.flags.c_contiguous:
            scores = np.ascontiguousarray(scores).copy()
        scores += 0.0  # -0.0 -> +0.0, so float ties and key ties agree
        with np.errstate(invalid="ignore"):  # inf - inf in the quick sum is fine
            quick_nan = np.isnan(scores.sum())
        if quick_nan and np.isnan(scores).any():
            raise ValueError(f"policy produced NaN scores in epoch {epoch}")
        if self._taken_count:
            scores[self._taken] = -np.inf
        self._stage = (stage, epoch)
        self._scores = scores

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

    def _range(self) -> tuple[int, int, int]:
        """(count, min key, max key) of the eligible scores, (0, 0, 0) when none (cached)."""
        if self._full_range is None:
            keys = self._ensure_keys()
            count = int(np.count_nonzero(keys))
            if count == 0:
                self._full_range = (0, 0, 0)
            else:
                shifted = keys - np.uint64(1)  # ineligible 0 wraps to the largest value
                self._full_range = (count, int(shifted.min()) + 1, int(keys.max()))
        return self._full_range

    def score_summary(self) -> tuple[int, int | None, int | None]:
        """(count, min key, max key) of the eligible scores; keys None when count is 0."""
        count, kmin, kmax = self._range()
        return (count, kmin, kmax) if count else (0, None, None)

    def _window(self, klo: int, khi: int) -> np.ndarray:
        """int64 positions of eligible samples with key in [klo, khi] (cached, windows nest)."""
        keys = self._ensure_keys()
        if self._win is not None and self._win[0] <= klo and khi <= self._win[1]:
            if (self._win[0], self._win[1]) == (klo, khi):
                return self._win[2]
            pos = self._win[2]
            k = keys[pos]
            pos = pos[(k >= np.uint64(klo)) & (k <= np.uint64(khi))]
        else:
            pos = np.flatnonzero((keys >= np.uint64(max(klo, 1))) & (keys <= np.uint64(khi)))
        self._win = (klo, khi, pos)
        return pos

    def histogram(self, klo: int, khi: int, shift: int, bins: int) -> np.ndarray:
        """int64 (bins,) counts of eligible keys in [klo, khi] by bin ``(key - klo) >> shift``."""
        keys = self._ensure_keys()
        win = self._win
        cached = win is not None and win[0] <= klo and khi <= win[1]
        count, kmin, kmax = self._range()
        if not cached and count and klo <= kmin and kmax <= khi:
            # the window holds every eligible key: one vector pass, no positions
            d = np.maximum(keys, np.uint64(klo))  # ineligible (0) lands in bin 0
            d -= np.uint64(klo)
            d >>= np.uint64(shift)
            counts = np.bincount(d.view(np.int64), minlength=bins)[:bins].astype(np.int64)
            counts[0] -= self.data.n - count
            return counts
        pos = self._window(klo, khi)
        k = keys[pos] - np.uint64(klo)
        k >>= np.uint64(shift)
        return np.bincount(k.view(np.int64), minlength=bins)[:bins].astype(np.int64)

    def _tie_group(self, key: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions with score key == key and their tie-breaks (cached)."""
        if self._tie is None or self._tie[0] != key:
            pos = self._window(key, key)
            self._tie = (key, pos, self.tiebreak_local(pos))
        return self._tie[1], self._tie[2]

    def tie_summary(self, key: int) -> tuple[int, int | None, int | None]:
        """(count, min tie-break, max tie-break) of the eligible samples whose key is ``key``."""
        pos, tb = self._tie_group(key)
        if pos.shape[0] == 0:
            return 0, None, None
        return int(pos.shape[0]), int(tb.min()), int(tb.max())

    def tie_histogram(self, key: int, tlo: int, thi: int, shift: int, bins: int) -> np.ndarray:
        """int64 (bins,) counts of tie-breaks in [tlo, thi] within key's tie group."""
        _, tb = self._tie_group(key)
        tb = tb[(tb >= np.uint64(tlo)) & (tb <= np.uint64(thi))] - np.uint64(tlo)
        tb >>= np.uint64(shift)
        return np.bincount(tb.view(np.int64), minlength=bins)[:bins].astype(np.int64)

    def candidates(
        self, klo: int, khi: int, tie: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boundary candidates: (scores float64, tie-breaks uint64, global indices int64).

        Without ``tie``: eligible samples with key in [klo, khi]. With ``tie = (tlo, thi)``
        (then klo == khi): the samples of that key whose tie-break lies in [tlo, thi].
        """
        if tie is None:
            pos = self._window(klo, khi)
            tb = self.tiebreak_local(pos)
        else:
            pos, tb = self._tie_group(klo)
            keep = (tb >= np.uint64(tie[0])) & (tb <= np.uint64(tie[1]))
            pos, tb = pos[keep], tb[keep]
        return self.stage_scores()[pos], tb, pos.astype(np.int64) + self.data.lo

    def take(
        self, min_key: int | None, exact: np.ndarray, tie: tuple[int, int] | None = None
    ) -> int:
        """Select, in this stage: eligible keys >= min_key (none if None), the global indices
        ``exact`` that fall in this shard, and with ``tie = (key, min_tb)`` the samples of that
        key with tie-break >= min_tb. Returns how many this shard took."""
        keys = self._ensure_keys()
        chosen = (
            np.zeros(self.data.n, dtype=bool) if min_key is None else keys >= np.uint64(min_key)
        )
        if min_key is not None and min_key == 0:
            chosen &= keys > 0
        if tie is not None:
            pos, tb = self._tie_group(tie[0])
            chosen[pos[tb >= np.uint64(tie[1])]] = True
        exact = np.asarray(exact, dtype=np.int64)
        local = exact[(exact >= self.data.lo) & (exact < self.data.hi)] - self.data.lo
        chosen[local] = True
        return self.take_local(np.flatnonzero(chosen))

    def take_local(self, pos: np.ndarray) -> int:
        """Select the local positions ``pos`` (all must be eligible in the open stage)."""
        pos = np.asarray(pos, dtype=np.int64)
        if pos.shape[0] and not np.all(self.stage_scores()[pos] > -np.inf):
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
