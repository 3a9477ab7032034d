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

The samples' data and the policy's interface live in :mod:`workers.shard_data`
(:class:`ShardData`, :class:`ShardPolicy`); the threshold protocol's methods (score keys,
per-group histograms, candidates, take) in :mod:`workers.shard_threshold`
(:class:`GroupedThreshold`, mixed in here).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from saelect.workers.shard_data import ShardData, ShardPolicy
from saelect.workers.shard_threshold import NO_KEY, GroupedThreshold, GroupSummary

__all__ = ["SelectionShard"]


class SelectionShard(GroupedThreshold):
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
        self._quotas: tuple[int, ...] | None = None  # the open stage's per-class counts
        self._reset_threshold()

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
