"""An in-memory Backend for route and client tests (no Ray, no scoring).

Epoch t of a job is the first m = round(ratio * N) entries of a permutation of [0, N) drawn from
``np.random.default_rng([seed, t])``: deterministic, different per epoch, a pure function of
(seed, epoch). Ranks get ``service.selection.partition.rank_indices`` of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from saelect.service.backend import EpochPlan, JobStatus, Plan, Progress
from saelect.service.errors import (
    EpochOutOfRange,
    FeedbackNotAccepted,
    InvalidRequest,
    JobNotReady,
    UnknownJob,
)
from saelect.service.selection.partition import per_rank_length, rank_indices
from saelect.service.specs import JobSpec

FEEDBACK_POLICIES = frozenset({"infobatch", "ucb", "epsilon_greedy"})


@dataclass
class FakeJob:
    spec: JobSpec
    status: JobStatus
    feedback: dict[int, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    feedback_keys: set[tuple[int, int, int]] = field(default_factory=set)
    """(epoch, rank, seq) of the keyed posts applied."""


class FakeBackend:
    """Implements ``service.backend.Backend`` over dicts; jobs have ``num_samples`` rows."""

    def __init__(self, num_samples: int = 1000, *, ready: bool = True) -> None:
        self.num_samples = num_samples
        self.ready = ready
        self.jobs: dict[str, FakeJob] = {}
        self.calls: dict[str, int] = {}
        self._next = 0

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def _job(self, job_id: str) -> FakeJob:
        if job_id not in self.jobs:
            raise UnknownJob(f"no job {job_id!r}")
        return self.jobs[job_id]

    def _ready(self, job_id: str) -> FakeJob:
        job = self._job(job_id)
        if job.status.phase != "ready":
            raise JobNotReady(f"job {job_id!r} is {job.status.phase}, not ready")
        return job

    def _epoch(self, job: FakeJob, epoch: int) -> None:
        epochs = job.spec.policy.epochs
        if not 0 <= epoch < epochs:
            raise EpochOutOfRange(f"epoch {epoch} outside [0, {epochs})")

    def set_phase(
        self, job_id: str, phase: str, error: str | None = None, *, reason: str | None = None
    ) -> None:
        """Move a job to ``phase`` (tests drive the lifecycle by hand)."""
        job = self._job(job_id)
        job.status = JobStatus(
            id=job_id,
            name=job.status.name,
            phase=phase,
            progress=Progress(1, 1) if phase == "ready" else Progress(0, 1),
            num_samples=self.num_samples,
            epochs_committed=job.status.epochs_committed,
            error=error,
            reason=reason,
        )

    def size(self, spec: JobSpec) -> int:
        """Samples per epoch: round(ratio * N), at least 1."""
        return max(1, round(spec.policy.ratio * self.num_samples))

    def epoch_order(self, spec: JobSpec, epoch: int) -> np.ndarray:
        """int64 (m,): the epoch's indices in serving order."""
        rng = np.random.default_rng([spec.policy.seed, epoch])
        return rng.permutation(self.num_samples)[: self.size(spec)].astype(np.int64)

    async def create_job(self, spec: JobSpec) -> JobStatus:
        self._count("create_job")
        job_id = f"job-{self._next}"
        self._next += 1
        status = JobStatus(id=job_id, name=spec.name, phase="pending", num_samples=None)
        self.jobs[job_id] = FakeJob(spec=spec, status=status)
        if self.ready:
            self.set_phase(job_id, "ready")
        return status

    async def list_jobs(self) -> list[JobStatus]:
        self._count("list_jobs")
        return [j.status for j in self.jobs.values()]

    async def get_job(self, job_id: str) -> JobStatus:
        self._count("get_job")
        return self._job(job_id).status

    async def plan(self, job_id: str, world_size: int) -> Plan:
        self._count("plan")
        job = self._ready(job_id)
        m = self.size(job.spec)
        epochs = job.spec.policy.epochs
        rows = [EpochPlan(t, m, per_rank_length(m, world_size)) for t in range(epochs)]
        return Plan(epochs=rows, sample_fraction=m / self.num_samples)

    async def epoch_indices(
        self, job_id: str, epoch: int, rank: int, world_size: int
    ) -> np.ndarray:
        self._count("epoch_indices")
        job = self._ready(job_id)
        self._epoch(job, epoch)
        if not 0 <= rank < world_size:
            raise InvalidRequest(f"rank {rank} outside [0, {world_size})")
        committed = max(job.status.epochs_committed, epoch + 1)
        job.status = JobStatus(**{**job.status.__dict__, "epochs_committed": committed})
        return rank_indices(self.epoch_order(job.spec, epoch), rank, world_size)

    async def epoch_weights(
        self, job_id: str, epoch: int, rank: int, world_size: int
    ) -> np.ndarray:
        """Weights aligned with the indices: 2.0 where the index is a multiple of 3 for
        ``infobatch`` jobs (a stand-in for its rescaling), 1.0 otherwise."""
        idx = await self.epoch_indices(job_id, epoch, rank, world_size)
        if self.jobs[job_id].spec.policy.name != "infobatch":
            return np.ones(idx.shape[0], dtype=np.float32)
        return np.where(idx % 3 == 0, 2.0, 1.0).astype(np.float32)

    async def feedback(
        self,
        job_id: str,
        epoch: int,
        indices: np.ndarray,
        losses: np.ndarray,
        key: tuple[int, int] | None = None,
    ) -> bool:
        self._count("feedback")
        job = self._ready(job_id)
        self._epoch(job, epoch)
        if job.spec.policy.name not in FEEDBACK_POLICIES:
            raise FeedbackNotAccepted(f"policy {job.spec.policy.name!r} takes no feedback")
        if indices.size and int(indices.max()) >= self.num_samples:
            raise InvalidRequest(f"index {int(indices.max())} >= num_samples {self.num_samples}")
        if key is not None:
            if (epoch, *key) in job.feedback_keys:
                return False
            job.feedback_keys.add((epoch, *key))
        job.feedback.setdefault(epoch, []).append((indices.copy(), losses.copy()))
        return True

    async def epoch_stats(self, job_id: str, epoch: int) -> dict[str, Any]:
        self._count("epoch_stats")
        job = self._ready(job_id)
        self._epoch(job, epoch)
        usage = np.zeros(self.num_samples, dtype=np.int64)
        for t in range(epoch + 1):
            usage[self.epoch_order(job.spec, t)] += 1
        epochs = job.spec.policy.epochs
        return {
            "epoch": epoch,
            "lambda": epoch / max(epochs - 1, 1),
            "size": self.size(job.spec),
            "coverage": float(np.mean(usage > 0)),
            "usage": {
                "min": float(usage.min()),
                "max": float(usage.max()),
                "mean": float(usage.mean()),
            },
            "factor_coverage": None,
        }

    async def delete_job(self, job_id: str) -> None:
        self._count("delete_job")
        self._job(job_id)
        del self.jobs[job_id]
