"""Serving a ready job's epochs: the plan, each rank's indices, loss weights, stats, feedback.

`JobEpochs` is the part of `service.jobs.JobManager` (mixed in there) that answers the epoch
routes. Epochs are computed in order, stored (docs/reliability.md, Persistence) and then
committed; a served epoch is read back from memory or the store, so the same request always gets
the same answer. Loss feedback is logged before it is applied, so a restart replays it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from saelect.service.backend import EpochPlan, Plan
from saelect.service.errors import EpochOutOfRange, FeedbackNotAccepted, InvalidRequest, JobNotReady
from saelect.service.job import JOBS_LOGGER, Job
from saelect.service.job_history import select_and_commit, with_engine, write_feedback
from saelect.service.selection.partition import per_rank_length, rank_indices, rank_slice
from saelect.service.store import JobStore

__all__ = ["JobEpochs"]

log = logging.getLogger(JOBS_LOGGER)


class JobEpochs:
    """Epoch queries and feedback of the ready jobs, mixed into ``JobManager``.

    The host class provides the job ``store``, ``_jobs`` (id -> `Job`), ``_ready(job_id)`` (the
    ready job, or the error to answer) and the listeners called after each epoch computed and
    each feedback applied.
    """

    store: JobStore
    _jobs: dict[str, Job]
    _ready: Callable[[str], Job]
    _epoch_listeners: list[Callable[[str, str, int, float], None]]
    _feedback_listeners: list[Callable[[str, str, int, int], None]]

    def _check_epoch(self, job: Job, epoch: int) -> None:
        epochs = job.spec.policy.epochs
        if not 0 <= epoch < epochs:
            raise EpochOutOfRange(f"epoch {epoch} outside [0, {epochs}) of job {job.id!r}")

    async def plan(self, job_id: str, world_size: int) -> Plan:
        if world_size < 1:
            raise InvalidRequest(f"world_size must be >= 1, got {world_size}")
        job = self._ready(job_id)
        sizes = job.engine.plan()  # type: ignore[union-attr]
        n = job.num_samples or 1
        epochs = [EpochPlan(t, s, per_rank_length(s, world_size)) for t, s in enumerate(sizes)]
        return Plan(epochs=epochs, sample_fraction=float(sum(sizes)) / (len(sizes) * n))

    async def _epoch(self, job: Job, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s indices, computing (and committing) it and every earlier one."""
        self._check_epoch(job, epoch)
        cached = job.epochs.get(epoch)
        if cached is not None:
            return cached
        async with job.lock:
            while epoch not in job.epochs:
                await asyncio.to_thread(self._next_epoch, job)
        return job.epochs[epoch]

    def _next_epoch(self, job: Job) -> None:
        with_engine(
            self.store,
            job,
            lambda engine: select_and_commit(self.store, job, engine, self._epoch_listeners),
        )

    async def epoch_indices(
        self, job_id: str, epoch: int, rank: int, world_size: int
    ) -> np.ndarray:
        if world_size < 1:
            raise InvalidRequest(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise InvalidRequest(f"rank must be in [0, {world_size}), got {rank}")
        job = self._ready(job_id)
        order = await self._epoch(job, epoch)
        return rank_indices(order, rank, world_size)

    def ready_epoch_indices(
        self, job_id: str, epoch: int, rank: int, world_size: int
    ) -> np.ndarray | None:
        """int64 (per_rank,) as ``epoch_indices`` when the job is ready and the epoch is in
        memory, else None (then ``epoch_indices`` answers, or raises what it must). Never
        blocks and never raises: the serving fast path (``service.fast_indices``) calls it on
        the event loop."""
        job = self._jobs.get(job_id)
        if job is None or job.deleted or job.engine is None or job.phase == "failed":
            return None
        if not 0 <= rank < world_size:
            return None
        order = job.epochs.get(epoch)
        return None if order is None else rank_indices(order, rank, world_size)

    async def epoch_weights(
        self, job_id: str, epoch: int, rank: int, world_size: int
    ) -> np.ndarray:
        """float32 (per_rank,) loss weights aligned with the rank's indices (1 when unweighted)."""
        order = await self.epoch_indices(job_id, epoch, rank, world_size)
        weights = await asyncio.to_thread(self.store.read_epoch_weights, job_id, epoch)
        if weights is None:
            return np.ones(order.shape[0], dtype=np.float32)
        return rank_slice(weights, rank, world_size).astype(np.float32)

    async def feedback(
        self,
        job_id: str,
        epoch: int,
        indices: np.ndarray,
        losses: np.ndarray,
        key: tuple[int, int] | None = None,
    ) -> bool:
        """Log and apply per-sample losses; False (nothing applied) for a ``key`` = (rank, seq)
        already applied in ``epoch`` (the key is logged with the losses, so it survives a
        restart)."""
        job = self._ready(job_id)
        self._check_epoch(job, epoch)
        if not job.engine.policy.needs_feedback:  # type: ignore[union-attr]
            raise FeedbackNotAccepted(
                f"policy {job.spec.policy.name!r} of job {job_id!r} takes no loss feedback"
            )
        idx = np.asarray(indices, dtype=np.int64).ravel()
        val = np.asarray(losses, dtype=np.float32).ravel()
        n = job.num_samples or 0
        if idx.shape != val.shape:
            raise InvalidRequest(f"{idx.shape[0]} indices but {val.shape[0]} losses")
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise InvalidRequest(f"feedback indices must lie in [0, {n})")
        if not np.all(np.isfinite(val)):
            raise InvalidRequest("losses must be finite numbers")
        async with job.lock:
            engine = job.engine
            if engine is None:
                raise JobNotReady(f"job {job_id!r} has no selection engine (phase {job.phase})")
            dedup = None if key is None else (epoch, int(key[0]), int(key[1]))
            if dedup is not None and dedup in job.feedback_keys:
                log.info("job %s: feedback %s already applied; acknowledged again", job_id, dedup)
                return False
            before = engine.last_committed + 1
            seq = job.feedback_seq
            rank_seq = np.asarray(dedup[1:] if dedup is not None else (-1, -1), dtype=np.int64)
            write_feedback(
                self.store, job_id, seq, before=before, epoch=epoch, idx=idx, loss=val, key=rank_seq
            )
            job.feedback_seq += 1
            if dedup is not None:
                job.feedback_keys.add(dedup)
            await asyncio.to_thread(
                with_engine, self.store, job, lambda e: e.feedback(idx, val), retry=False
            )
        log.info(
            "job %s: feedback for epoch %d applied (%d samples, before epoch %d)",
            job_id,
            epoch,
            idx.shape[0],
            before,
        )
        for listener in self._feedback_listeners:
            listener(job_id, job.spec.policy.name, max(0, before - 1 - epoch), int(idx.shape[0]))
        return True

    async def epoch_stats(self, job_id: str, epoch: int) -> dict[str, Any]:
        job = self._ready(job_id)
        await self._epoch(job, epoch)
        stats = dict(job.stats[epoch])
        stats.setdefault("lambda", None)
        stats.setdefault("factor_coverage", None)
        stats["epoch"] = epoch
        return stats
