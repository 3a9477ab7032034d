"""The async Backend protocol the HTTP routes call, and the plain result types it returns.

``service.actor.SelectionActor`` implements it on Ray; route tests use an in-memory fake. The
methods raise the named errors of ``service.errors`` (``UnknownJob``, ``EpochOutOfRange``,
``InvalidRequest``, ``FeedbackNotAccepted``, ``JobNotReady``), which the app maps to 4xx.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, get_args, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from saelect.service.specs import JobSpec

Phase = Literal[
    "pending",
    "queued",
    "featurizing",
    "training_sae",
    "encoding",
    "scoring",
    "ready",
    "failed",
]
PHASES: tuple[str, ...] = get_args(Phase)
"""Job phases in order; ``failed`` can follow any phase."""


class Progress(NamedTuple):
    """Progress of the current phase: ``done`` out of ``total`` units (shards, steps...)."""

    done: int
    total: int


@dataclass(frozen=True)
class JobStatus:
    """A job's status as the API reports it (docs/api.md, Job status)."""

    id: str
    """Job id (``[A-Za-z0-9_-]``)."""
    name: str
    """User-given name from the spec."""
    phase: str
    """One of ``PHASES``."""
    progress: Progress = field(default_factory=lambda: Progress(0, 0))
    """Progress of the current phase."""
    num_samples: int | None = None
    """Dataset rows; None until the dataset was opened."""
    epochs_committed: int = 0
    """Number of epochs selected and committed so far."""
    error: str | None = None
    """Why the job failed (phase ``failed``), else None."""
    reason: str | None = None
    """Why the job waits (phase ``queued``): what it needs and what the cluster has free."""

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if not isinstance(self.progress, Progress):
            object.__setattr__(self, "progress", Progress(*self.progress))
        if self.progress.done < 0 or self.progress.total < 0:
            raise ValueError(f"progress must be non-negative, got {tuple(self.progress)}")
        if self.num_samples is not None and self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {self.num_samples}")
        if self.epochs_committed < 0:
            raise ValueError(f"epochs_committed must be >= 0, got {self.epochs_committed}")


class EpochPlan(NamedTuple):
    """One epoch of a plan: its subset ``size`` and each rank's padded length ``per_rank``."""

    epoch: int
    size: int
    per_rank: int


@dataclass(frozen=True)
class Plan:
    """Every epoch's size and per-rank length for one world size, known before training."""

    epochs: list[EpochPlan]
    """One entry per epoch, in order."""
    sample_fraction: float
    """Sum of epoch sizes / (epochs * num_samples): the realized sample-step fraction."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "epochs", [EpochPlan(*e) for e in self.epochs])
        if self.sample_fraction < 0.0:
            raise ValueError(f"sample_fraction must be >= 0, got {self.sample_fraction}")


@runtime_checkable
class Backend(Protocol):
    """What the HTTP routes need from the selection system. All methods are coroutines."""

    async def create_job(self, spec: JobSpec) -> JobStatus:
        """Register a job and start scoring it; returns its status (phase ``pending``)."""
        ...

    async def list_jobs(self) -> list[JobStatus]:
        """Status of every known job."""
        ...

    async def get_job(self, job_id: str) -> JobStatus:
        """Status of one job. Raises UnknownJob."""
        ...

    async def plan(self, job_id: str, world_size: int) -> Plan:
        """Every epoch's size and per-rank length. Raises UnknownJob, JobNotReady."""
        ...

    async def epoch_indices(
        self, job_id: str, epoch: int, rank: int, world_size: int
    ) -> np.ndarray:
        """int64 (per_rank,): rank ``rank``'s indices of ``epoch`` (padded partition,
        docs/api.md, Indices).

        Computes the epoch (and earlier ones) when not yet done. Raises UnknownJob,
        JobNotReady, EpochOutOfRange, InvalidRequest.
        """
        ...

    async def epoch_weights(
        self, job_id: str, epoch: int, rank: int, world_size: int
    ) -> np.ndarray:
        """float32 (per_rank,): loss weights aligned with ``epoch_indices`` of the same request
        (all 1 unless the policy reweights, as infobatch does). Same errors as epoch_indices."""
        ...

    async def feedback(
        self,
        job_id: str,
        epoch: int,
        indices: np.ndarray,
        losses: np.ndarray,
        key: tuple[int, int] | None = None,
    ) -> bool:
        """Record per-sample losses: indices int64 (n,), losses float32 (n,).

        ``key`` = (rank, seq) names the post (the sender's rank, its sequence number within
        ``epoch``): a key already recorded for ``epoch`` is acknowledged without applying the
        losses again, and the call returns False. Without a key every call applies (True).
        The routes pass ``key`` only when the client sent one, so a backend written before keys
        existed keeps serving old clients.

        Raises UnknownJob, JobNotReady, EpochOutOfRange, FeedbackNotAccepted, InvalidRequest.
        """
        ...

    async def epoch_stats(self, job_id: str, epoch: int) -> dict[str, Any]:
        """``{"epoch", "lambda", "size", "coverage", "usage": {"min","max","mean"},
        "factor_coverage"}`` (extra keys allowed). Raises UnknownJob, EpochOutOfRange..."""
        ...

    async def delete_job(self, job_id: str) -> None:
        """Drop a job and its stored state. Raises UnknownJob."""
        ...
