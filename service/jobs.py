"""The job manager: the `Backend` the HTTP routes call, implemented over Ray shard actors.

One `JobManager` owns every job of a store. A new job is stored, then, when its policy reads
scores, scored on the cluster by ``workers.pipeline.run_scoring`` (in a thread, so the event loop
keeps serving; the scoring reserves GPUs or CPUs only while it runs, and a job whose scoring
cannot be placed yet is ``queued`` with the reason). A policy that reads no scores skips the
scoring: its job is ready once the row count (and labels) are known. A ready job's selection
state lives in ``workers.selection_state`` actors that reserve no CPU or GPU, and a
`SelectionEngine` drives the job's policy over them. Epochs are computed in order, stored
(docs/reliability.md, Persistence) and then committed (``service.job_epochs``).

Restart: the manager rebuilds every stored job. Scoring outputs are on the store, so the pipeline
re-attaches to them without recomputing; the engine then replays the stored epochs (and the
feedback log, in arrival order) and checks each replayed epoch against the stored one. The next
epoch is therefore what an uninterrupted run would have produced.

Modules: the in-memory `Job` and its phase changes are in ``service.job``, the scoring (shared per
`scoring_key`) in ``service.job_scoring``, the stored epochs, feedback log, job state and their
replay in ``service.job_history``, the epoch queries and feedback in ``service.job_epochs``
(`JobEpochs`, mixed into the manager); this module holds the manager, the `Backend` the routes
call: job lifecycle, lookups, delete, resume.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from saelect.service.backend import JobStatus
from saelect.service.errors import JobNotReady, UnknownJob
from saelect.service.job import JOBS_LOGGER, Job
from saelect.service.job_epochs import JobEpochs
from saelect.service.job_history import build_engine, write_state
from saelect.service.job_scoring import JobScoring, needs_scores, scoring_key
from saelect.service.specs import JobSpec
from saelect.service.store import JobStore, check_job_id, new_job_id
from saelect.workers.storage import Storage

log = logging.getLogger(JOBS_LOGGER)


class JobManager(JobEpochs):
    """Jobs of one store, scored and served on the connected Ray cluster.

    Parameters
    ----------
    store:
        The job store (docs/reliability.md, Persistence).
    allowed_roots:
        Dataset roots a job's URI must lie under (checked again by the pipeline).
    pipeline_options:
        ``workers.pipeline_types.PipelineOptions`` for every job (None: defaults).
    progress_bar:
        Show tqdm bars while scoring (the command line); off inside services.
    """

    def __init__(
        self,
        store: JobStore,
        *,
        allowed_roots: list[str] | None = None,
        pipeline_options: Any = None,
        progress_bar: bool = False,
    ) -> None:
        self.store = store
        self.scoring = JobScoring(
            store.storage,
            allowed_roots=allowed_roots,
            pipeline_options=pipeline_options,
            progress_bar=progress_bar,
        )
        self._jobs: dict[str, Job] = {}
        self._broken: dict[str, str] = {}
        """Stored jobs that could not be resumed: id -> why (listed as failed)."""
        self._epoch_listeners: list[Callable[[str, str, int, float], None]] = []
        self._feedback_listeners: list[Callable[[str, str, int, int], None]] = []

    def add_feedback_listener(self, fn: Callable[[str, str, int, int], None]) -> None:
        """Call ``fn(job_id, policy, lag, samples)`` after each feedback applied; ``lag`` is how
        many epochs were committed after the one the losses are for (0: none yet)."""
        self._feedback_listeners.append(fn)

    def add_epoch_listener(self, fn: Callable[[str, str, int, float], None]) -> None:
        """Call ``fn(job_id, policy, epoch, selection_seconds)`` after each epoch computed
        (the app's metrics use it; replayed epochs are not computed again)."""
        self._epoch_listeners.append(fn)

    def scoring_storage(self, key: str) -> Storage:
        """Where the scoring outputs of every job with `scoring_key` ``key`` live.

        Jobs that differ only in their policy (the A/B case) share one scoring: the second job
        waits for the first and then loads its outputs instead of recomputing them.
        """
        return self.scoring.storage(key)

    # -- lifecycle ---------------------------------------------------------------------------
    async def resume(self) -> list[str]:
        """Rebuild every stored job (scoring resumes from the store). Returns their ids.

        A job whose stored spec or state cannot be read (a truncated or corrupted file) is
        listed as ``failed`` with the reason; the other jobs resume.
        """
        ids = self.store.list_jobs()
        for job_id in ids:
            try:
                spec = self.store.read_spec(job_id)
                state = self.store.read_state(job_id)
                self.store.verify_job(job_id)  # every committed file against its checksum
            except Exception as exc:  # one bad file fails one job, never the service
                log.error("job %s: cannot resume, its stored files are unreadable: %s", job_id, exc)
                self._broken[job_id] = f"stored job files unreadable: {type(exc).__name__}: {exc}"
                continue
            job = Job(id=job_id, spec=spec)
            job.num_samples = state.num_samples
            self._jobs[job_id] = job
            log.info(
                "job %s: re-attaching (policy %s, %d epochs committed)",
                job_id,
                spec.policy.name,
                state.last_committed_epoch + 1,
            )
            job.task = asyncio.get_running_loop().create_task(self._score(job))
        return ids

    async def create_job(self, spec: JobSpec) -> JobStatus:
        """Store the job and start scoring it in the background; phase ``pending``."""
        job_id = new_job_id(spec.name)
        self.store.create_job(job_id, spec)
        job = Job(id=job_id, spec=spec)
        self._jobs[job_id] = job
        log.info(
            "job %s: created (policy %s, ratio %g, %d epochs, %s, dataset %s)",
            job_id,
            spec.policy.name,
            spec.policy.ratio,
            spec.policy.epochs,
            "scored" if needs_scores(spec) else "no scoring",
            spec.dataset.uri,
        )
        job.task = asyncio.get_running_loop().create_task(self._score(job))
        return job.status()

    async def wait_ready(self, job_id: str, timeout: float = 600.0) -> JobStatus:
        """Wait until the job is ready or failed (tests and the demo use it)."""
        job = self._job(job_id)
        if job.task is not None:
            await asyncio.wait_for(asyncio.shield(job.task), timeout)
        return job.status()

    async def close(self) -> None:
        """Stop every job's state actors (the store keeps everything)."""
        for job in list(self._jobs.values()):
            if job.task is not None and not job.task.done():
                job.task.cancel()
            if job.shards is not None:
                await asyncio.to_thread(job.shards.shutdown)

    # -- scoring, then start -----------------------------------------------------------------
    async def _score(self, job: Job) -> None:
        """Score the job (if its policy reads scores), start its state actors, replay."""
        from saelect.workers.selection_state import SelectionShards

        spec = job.spec
        try:
            plan, storage = await self.scoring.plan(job, self._jobs)
            if job.deleted:
                return
            job.num_samples = int(plan.num_rows)
            k = spec.sae.k if storage is not None else None
            job.shards = await asyncio.to_thread(
                SelectionShards.start, plan, storage, spec.dataset.label_column, k=k
            )
            if job.deleted:
                await asyncio.to_thread(job.shards.shutdown)
                return
            engine = await asyncio.to_thread(build_engine, self.store, job)
            job.engine = engine
            job.on_progress("ready", 1, 1)
            log.info(
                "job %s: ready (%d samples, %d shards, %d epochs replayed)",
                job.id,
                job.num_samples,
                len(job.shards.actors),
                engine.last_committed + 1,
            )
            write_state(self.store, job)
            self._start_first_epoch(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the job fails with the error; the service keeps serving
            log.exception("job %s failed", job.id)
            job.error = f"{type(exc).__name__}: {exc}"
            job.on_progress("failed", 0, 0)
            if not job.deleted:
                write_state(self.store, job)

    def _start_first_epoch(self, job: Job) -> None:
        """Compute epoch 0 of a new job in the background as soon as it is ready, so that the
        trainers' first fetch finds it in memory (the first selection on the shards also builds
        their derived structures: it was the demo's slowest fetch, docs/benchmarks_overhead.md).

        Only for a job with nothing committed yet, and only when its policy takes no feedback:
        epoch 0 is then the same whenever it is computed, and a feedback policy keeps the
        order of losses and selections its trainers make. A failure is logged; the first
        request computes the epoch again and answers with the error.
        """
        engine = job.engine
        if engine is None or engine.last_committed >= 0 or engine.policy.needs_feedback:
            return

        async def first() -> None:
            try:
                await self._epoch(job, 0)
            except Exception:  # the request path computes it again and reports the error
                log.exception("job %s: computing epoch 0 ahead of the first request failed", job.id)

        job.first_epoch = asyncio.get_running_loop().create_task(first())

    # -- queries -----------------------------------------------------------------------------
    def _broken_status(self, job_id: str) -> JobStatus:
        return JobStatus(id=job_id, name=job_id, phase="failed", error=self._broken[job_id])

    def _job(self, job_id: str) -> Job:
        check_job_id(job_id)
        if job_id in self._broken:
            raise JobNotReady(f"job {job_id!r} failed: {self._broken[job_id]}")
        job = self._jobs.get(job_id)
        if job is None or job.deleted:
            raise UnknownJob(f"no job {job_id!r}")
        return job

    def _ready(self, job_id: str) -> Job:
        job = self._job(job_id)
        if job.phase == "failed":
            raise JobNotReady(f"job {job_id!r} failed: {job.error}")
        if job.engine is None:
            raise JobNotReady(f"job {job_id!r} is not ready (phase {job.phase})")
        return job

    async def shard_info(self, job_id: str) -> list[dict[str, Any]]:
        """Per shard of a ready job: shard id, index range, Ray node and process id."""

        job = self._ready(job_id)
        return await asyncio.to_thread(job.shards.info)

    async def list_jobs(self) -> list[JobStatus]:
        live = [j.status() for j in self._jobs.values() if not j.deleted]
        return live + [self._broken_status(j) for j in self._broken]

    async def job_metrics(self) -> list[Any]:
        """Per live job, its policy and the cluster resources its scoring reserves now, as
        ``service.metrics.JobMetrics`` (the ``/metrics`` route reads them at scrape time).

        A scoring records its reservation in its state file once its first phase is done, so a
        job in ``featurizing`` may still report none; a job that is not scoring reserves none.
        """
        from saelect.service.metrics import JobMetrics

        jobs = [j for j in self._jobs.values() if not j.deleted]
        held = await asyncio.to_thread(lambda: [self.scoring.resources(j) for j in jobs])
        return [JobMetrics(j.id, j.spec.policy.name, r) for j, r in zip(jobs, held, strict=True)]

    async def store_bytes_written(self) -> dict[str, int]:
        """Bytes written to the store, by kind: ``jobs`` (what this process wrote under
        ``jobs/``: epochs, their stats and weights, feedback, job state) and ``scoring`` (the
        outputs each scoring run stored, counted when it completes; a scoring loaded from the
        store adds nothing). The ``/metrics`` route reads them at scrape time."""
        return {"jobs": self.store.bytes_written, "scoring": self.scoring.bytes_written}

    async def get_job(self, job_id: str) -> JobStatus:
        if check_job_id(job_id) in self._broken:
            return self._broken_status(job_id)
        return self._job(job_id).status()

    async def delete_job(self, job_id: str) -> None:
        if check_job_id(job_id) in self._broken:  # unreadable files: drop what is stored
            self.store.delete_job(job_id)
            del self._broken[job_id]
            log.info("job %s: deleted (it could not be resumed)", job_id)
            return
        job = self._job(job_id)
        job.deleted = True
        async with job.lock:
            if job.task is not None and not job.task.done():
                job.task.cancel()
            if job.shards is not None:
                await asyncio.to_thread(job.shards.shutdown)
            self.store.delete_job(job_id)
            self._jobs.pop(job_id, None)
            key = scoring_key(job.spec)
            if not any(scoring_key(j.spec) == key for j in self._jobs.values()):
                self.scoring.delete(key)  # no other job uses this scoring
        log.info("job %s: deleted", job_id)
