"""The selection engine: one epoch = context, stages, threshold protocol, shuffle, commit.

:class:`SelectionEngine` coordinates a policy over shards that hold the per-sample state, either
in-process :class:`workers.selection_shard.SelectionShard` objects or anything reachable through
a ``broadcast(method, *args) -> [result per shard]`` callable (Ray actor handles). One epoch:

1. ``begin_epoch`` on every shard, then ``policy.stat_rounds`` rounds of (shard partials ->
   ``policy.context``) give the epoch's global context;
2. for every stage of ``policy.stages``: shards score locally, and the exact global top ``count``
   (per class, for a stage with class quotas: every class in the same calls) is found by
   :func:`service.selection.threshold.grouped_top_m_protocol` (a single in-process shard uses
   :func:`service.selection.topk.top_m` per class directly; both give the same result);
3. shards return their picks (sorted global indices, weights, stats partials); the epoch order is
   the sorted selection permuted by ``np.random.default_rng([seed, epoch])`` (a function of the
   epoch's size only, so it is drawn on the thread pool of ``service.selection.pool`` while
   the shards score, select and finish);
4. :meth:`SelectionEngine.commit` counts the epoch in the shards' counters and the policy's global
   state, once per epoch however often it is called.

Example:
    >>> import numpy as np
    >>> from service.policies import PolicyConfig, make_policy
    >>> from workers.shard_data import ShardData
    >>> rng = np.random.default_rng(0)
    >>> data = ShardData(0, 100, R=rng.random(100), D=rng.random(100))
    >>> sel = SingleProcessSelector(make_policy(PolicyConfig("factor", 0.3, 5)), data)
    >>> r = sel.step()
    >>> r.epoch, r.indices.shape
    (0, (30,))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from saelect.service.policies.base import Policy, Stage, add_counts, check_losses
from saelect.service.selection.pool import submit
from saelect.service.selection.shuffle import epoch_permutation
from saelect.service.selection.threshold import (
    Broadcast,
    grouped_top_m_protocol,
    local_broadcast,
)
from saelect.service.selection.topk import grouped_top_m, top_m
from saelect.workers.selection_shard import SelectionShard
from saelect.workers.shard_data import ShardData

__all__ = ["EpochResult", "SelectionEngine", "SingleProcessSelector"]


class EpochResult(NamedTuple):
    """One selected epoch."""

    epoch: int
    """The epoch t."""
    indices: np.ndarray
    """int64 (m,) global indices in the epoch's shuffled order."""
    weights: np.ndarray | None
    """float64 (m,) loss weights aligned with ``indices``, or None (all 1)."""
    stats: dict[str, Any]
    """epoch, size, lambda, coverage, usage {min, max, mean}, class_counts, protocol_rounds and
    the policy's own entries (factor: mean_R, mean_D, penalty_share, factor_coverage)."""


class SelectionEngine:
    """Drives a policy over shards; epochs are selected in order and committed once each.

    Parameters
    ----------
    policy:
        The coordinator's policy object (holds the global policy state).
    shards:
        In-process shard objects in global index order, or a :data:`Broadcast` over them.
    bins, cap:
        Threshold-protocol histogram bins per round and boundary-candidate cap.
    """

    def __init__(
        self,
        policy: Policy,
        shards: Sequence[SelectionShard] | Broadcast,
        *,
        bins: int = 1024,
        cap: int = 65536,
    ) -> None:
        self.policy = policy
        if callable(shards):
            inner: Broadcast = shards
            self._local: SelectionShard | None = None
        else:
            shards = list(shards)
            inner = local_broadcast(shards)
            self._local = shards[0] if len(shards) == 1 else None
        self.broadcasts = 0
        """Broadcasts made so far (each is one call per shard; over Ray one round trip)."""

        def counted(method: str, *args: Any) -> list[Any]:
            self.broadcasts += 1
            return inner(method, *args)

        self._broadcast: Broadcast = counted
        self.bins = bins
        self.cap = cap
        ranges = [tuple(r) for r in self._broadcast("info")]
        if not ranges:
            raise ValueError("an engine needs at least one shard")
        expect = 0
        for lo, hi in ranges:
            if lo != expect:
                raise ValueError(f"shards must cover [0, N) in order; got ranges {ranges}")
            expect = hi
        self.num_samples = expect
        self.last_committed = -1
        self._pending: tuple[int, dict] | None = None  # (epoch, ctx) selected, not committed

    def plan(self) -> list[int]:
        """Every epoch's size (see the policy's ``plan``)."""
        return self.policy.plan(self.num_samples)

    def _stage(self, stage: Stage, epoch: int, ctx: dict) -> int:
        """Open ``stage`` on the shards and take its exact top; returns the histogram rounds."""
        quotas = stage.quotas if stage.quotas is not None else (stage.count,)
        if self._local is not None:  # one in-process shard: partition, no protocol
            shard = self._local
            shard.begin_stage(stage, epoch, ctx)
            scores = shard.stage_scores()
            if stage.quotas is None:
                pos = top_m(scores, shard.tiebreak_local, stage.count)
            else:
                layout = shard.data.derived.label_layout()
                pos = grouped_top_m(scores, shard.tiebreak_local, layout, quotas)
            shard.take_local(pos)
            return 0
        summaries = self._broadcast("open_stage", stage, epoch, ctx)
        trace = grouped_top_m_protocol(
            self._broadcast, quotas, summaries, bins=self.bins, cap=self.cap
        )
        return trace.rounds

    def select(self, epoch: int) -> EpochResult:
        """Select ``epoch`` (must be the one after the last committed; may be repeated).

        Raises ValueError for any other epoch or one past the policy's epochs.
        """
        if epoch != self.last_committed + 1:
            raise ValueError(
                f"epoch {epoch} cannot be selected: the next epoch is {self.last_committed + 1}"
            )
        if epoch >= self.policy.config.epochs:
            raise ValueError(f"epoch {epoch} outside [0, {self.policy.config.epochs})")
        b = self._broadcast
        ctx = self.policy.context(epoch, b("begin_epoch", epoch), None)
        for _ in range(self.policy.stat_rounds - 1):
            ctx = self.policy.context(epoch, b("local_stats", epoch, ctx), ctx)
        stages = [stage for stage in self.policy.stages(epoch, ctx) if stage.count > 0]
        size, seed = sum(stage.count for stage in stages), self.policy.config.seed
        # the epoch order depends on the size only: drawn on the pool while the shards select
        shuffle = submit(lambda: epoch_permutation(size, seed, epoch))
        rounds = 0
        for stage in stages:
            rounds += self._stage(stage, epoch, ctx)
        parts = b("finish", epoch, ctx)
        selected = np.concatenate([p["indices"] for p in parts]).astype(np.int64, copy=False)
        perm = shuffle.result()
        if perm.shape[0] != selected.shape[0]:  # a stage took another count: draw it again
            perm = epoch_permutation(selected.shape[0], seed, epoch)
        weights = None
        if parts[0]["weights"] is not None:
            weights = np.concatenate([p["weights"] for p in parts])[perm]
        stats = self._stats(epoch, ctx, [p["stats"] for p in parts])
        stats["protocol_rounds"] = rounds
        self._pending = (epoch, ctx)
        return EpochResult(epoch, selected[perm], weights, stats)

    def _stats(self, epoch: int, ctx: dict, parts: list[dict]) -> dict[str, Any]:
        n = self.num_samples
        mins = [p["usage_min"] for p in parts if p["usage_min"] is not None]
        maxs = [p["usage_max"] for p in parts if p["usage_max"] is not None]
        stats: dict[str, Any] = {
            "epoch": epoch,
            "size": int(sum(p["size"] for p in parts)),
            "coverage": sum(p["covered"] for p in parts) / n if n else 0.0,
            "usage": {
                "min": min(mins) if mins else 0,
                "max": max(maxs) if maxs else 0,
                "mean": sum(p["usage_sum"] for p in parts) / n if n else 0.0,
            },
            "class_counts": None,
        }
        hists = [p["class_counts"] for p in parts if p["class_counts"] is not None]
        if hists:
            stats["class_counts"] = add_counts(hists).tolist()
        stats.update(self.policy.epoch_stats(epoch, ctx, [p["policy"] for p in parts]))
        return stats

    def commit(self, epoch: int) -> None:
        """Count the selected ``epoch`` in usage and the policy state; a repeat is a no-op.

        Raises ValueError when ``epoch`` is neither committed nor the pending selection.
        """
        if epoch <= self.last_committed:
            return
        if self._pending is None or self._pending[0] != epoch:
            raise ValueError(f"epoch {epoch} was not selected, so it cannot be committed")
        partials = [p for p in self._broadcast("commit", epoch, self._pending[1]) if p is not None]
        self.policy.absorb(epoch, partials)
        self.last_committed = epoch
        self._pending = None

    def step(self) -> EpochResult:
        """Select and commit the next epoch."""
        result = self.select(self.last_committed + 1)
        self.commit(result.epoch)
        return result

    def feedback(self, indices: np.ndarray, losses: np.ndarray) -> int:
        """Per-sample losses for loss-based policies; returns how many were applied.

        Raises ValueError when the policy takes no feedback, for misaligned arrays, indices
        outside [0, N) or non-finite losses.
        """
        if not self.policy.needs_feedback:
            raise ValueError(f"policy {self.policy.name!r} takes no feedback")
        indices = np.asarray(indices, dtype=np.int64).ravel()
        losses = np.asarray(losses, dtype=np.float64).ravel()
        check_losses(indices, losses)
        if indices.shape[0] and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise ValueError(f"feedback indices outside [0, {self.num_samples})")
        return int(sum(self._broadcast("feedback", indices, losses)))

    def state_dict(self) -> dict[str, Any]:
        """Policy global state, every shard's counters, and the last committed epoch."""
        return {
            "last_committed": self.last_committed,
            "policy": self.policy.state_dict(),
            "shards": self._broadcast("state_dict"),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (taken from an engine over any sharding of the data)."""
        self.policy.load_state_dict(state["policy"])
        self._broadcast("load_state_dict", state["shards"])
        self.last_committed = int(state["last_committed"])
        self._pending = None


class SingleProcessSelector(SelectionEngine):
    """A :class:`SelectionEngine` over one in-process shard covering [0, N)."""

    def __init__(self, policy: Policy, data: ShardData) -> None:
        if data.lo != 0:
            raise ValueError(f"a single-process selector needs data from index 0, got lo={data.lo}")
        super().__init__(policy, [SelectionShard(data, policy)])
        self.shard = self._local
