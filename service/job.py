"""`Job`: the in-memory state of one job, and its phase changes (the store holds the durable part).

Every job event is logged under one logger, ``saelect.service.jobs`` (`JOBS_LOGGER`, docs/api.md),
whichever of the job modules (`service.jobs`, `service.job_epochs`, `service.job_scoring`,
`service.job_history`) writes it; each line starts with ``job <id>``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from saelect.service.backend import JobStatus, Progress
from saelect.service.selection.engine import SelectionEngine
from saelect.service.specs import JobSpec

JOBS_LOGGER = "saelect.service.jobs"
"""The logger of every job event (operators and tests filter on this name)."""

log = logging.getLogger(JOBS_LOGGER)


@dataclass
class Job:
    """In-memory state of one job (the store holds the durable part)."""

    id: str
    spec: JobSpec
    phase: str = "pending"
    progress: Progress = field(default_factory=lambda: Progress(0, 0))
    num_samples: int | None = None
    error: str | None = None
    scoring: Any = None
    """`workers.pipeline_types.ScoringResult` once scored (None for a policy reading no scores)."""
    shards: Any = None
    """`workers.selection_state.SelectionShards`: the job's state actors once ready."""
    reason: str | None = None
    """Why the job waits (phase ``queued``)."""
    engine: SelectionEngine | None = None
    epochs: dict[int, np.ndarray] = field(default_factory=dict)
    """Served epochs: int64 (size,) indices in serving order."""
    stats: dict[int, dict[str, Any]] = field(default_factory=dict)
    feedback_seq: int = 0
    feedback_keys: set[tuple[int, int, int]] = field(default_factory=set)
    """(epoch, rank, seq) of every keyed feedback applied: a repeated key is acknowledged, not
    applied again (a client retrying a post whose answer it lost)."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    phase_since: float = field(default_factory=time.monotonic)
    """When the job entered its current phase (monotonic seconds)."""
    task: asyncio.Task | None = None
    first_epoch: asyncio.Task | None = None
    """Epoch 0 computed ahead of the first request (``JobManager._start_first_epoch``); held
    here because the event loop keeps only a weak reference to a running task."""
    deleted: bool = False

    def status(self) -> JobStatus:
        committed = self.engine.last_committed + 1 if self.engine is not None else 0
        return JobStatus(
            id=self.id,
            name=self.spec.name,
            phase=self.phase,
            progress=self.progress,
            num_samples=self.num_samples,
            epochs_committed=committed,
            error=self.error,
            reason=self.reason if self.phase == "queued" else None,
        )

    def on_progress(self, phase: str, done: int, total: int) -> None:
        """Enter ``phase`` with ``done`` of ``total`` steps done (a phase change is logged)."""
        if phase != self.phase:
            now = time.monotonic()
            log.info(
                "job %s: %s -> %s after %.1f s", self.id, self.phase, phase, now - self.phase_since
            )
            self.phase_since = now
        self.phase = phase
        self.progress = Progress(done, total)

    def on_wait(self, reason: str | None) -> None:
        """The job waits for ``reason`` (phase ``queued``), or no longer waits (None).

        Raises RuntimeError once the job is deleted, so that its scoring stops waiting for
        resources on its behalf.
        """
        if self.deleted:  # stop waiting for resources on behalf of a deleted job
            raise RuntimeError(f"job {self.id} was deleted while it waited to be scored")
        if reason is not None:
            if self.reason is None:
                log.info("job %s: queued: %s", self.id, reason)
            self.on_progress("queued", 0, 0)
        self.reason = reason
