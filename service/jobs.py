"""The job manager: the `Backend` the HTTP routes call, implemented over Ray shard actors.

One `JobManager` owns every job of a store. A new job is stored, then, when its policy reads
scores, scored on the cluster by ``workers.pipeline.run_scoring`` (in a thread, so the event loop
keeps serving; the scoring reserves GPUs or CPUs only while it runs, and a job whose scoring
cannot be placed yet is ``queued`` with the reason). A policy that reads no scores skips the
scoring: its job is ready once the row count (and labels) are known. A ready job's selection
state lives in ``workers.selection_state`` actors that reserve no CPU or GPU, and a
`SelectionEngine` drives the job's policy over them. Epochs are computed in order, stored
(docs/reliability.md, Persistence) and then committed; a served epoch is read back from memory or
the store, so the same request always gets the same answer.

Restart: the manager rebuilds every stored job. Scoring outputs are on the store, so the pipeline
re-attaches to them without recomputing; the engine then replays the stored epochs (and the
feedback log, in arrival order) and checks each replayed epoch against the stored one. The next
epoch is therefore what an uninterrupted run would have produced.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from saelect.service.backend import EpochPlan, JobStatus, Plan, Progress
from saelect.service.errors import (
    EpochOutOfRange,
    FeedbackNotAccepted,
    InvalidRequest,
    JobNotReady,
    UnknownJob,
)
from saelect.service.policies import make_policy
from saelect.service.selection.engine import SelectionEngine
from saelect.service.selection.partition import per_rank_length, rank_indices, rank_slice
from saelect.service.specs import JobSpec
from saelect.service.store import JobState, JobStore, check_job_id, new_job_id
from saelect.workers.storage import Storage, tree_digests, verify_tree, write_manifest

log = logging.getLogger(__name__)

FEEDBACK_LOG = "feedback_log"
SCORING_MANIFEST = "manifest.json"
"""Digests of a scoring's outputs, written each time `run_scoring` returns (`seal_scoring`)."""
T = TypeVar("T")


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
    """`workers.pipeline.ScoringResult` once scored (None for a policy that reads no scores)."""
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


class JobManager:
    """Jobs of one store, scored and served on the connected Ray cluster.

    Parameters
    ----------
    store:
        The job store (docs/reliability.md, Persistence).
    allowed_roots:
        Dataset roots a job's URI must lie under (checked again by the pipeline).
    pipeline_options:
        ``workers.pipeline.PipelineOptions`` for every job (None: defaults).
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
        self.allowed_roots = allowed_roots
        self.pipeline_options = pipeline_options
        self.progress_bar = progress_bar
        self._jobs: dict[str, Job] = {}
        self._broken: dict[str, str] = {}
        """Stored jobs that could not be resumed: id -> why (listed as failed)."""
        self._scoring_locks: dict[str, asyncio.Lock] = {}
        self._epoch_listeners: list[Callable[[str, str, int, float], None]] = []
        self._feedback_listeners: list[Callable[[str, str, int, int], None]] = []
        self._scoring_bytes = 0
        """Bytes stored by the scoring runs this manager completed."""

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
        return self.store.storage.child(f"scoring/{key}")

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

    # -- scoring -----------------------------------------------------------------------------
    def _on_progress(self, job: Job, phase: str, done: int, total: int) -> None:
        if phase != job.phase:
            now = time.monotonic()
            log.info(
                "job %s: %s -> %s after %.1f s", job.id, job.phase, phase, now - job.phase_since
            )
            job.phase_since = now
        job.phase = phase
        job.progress = Progress(done, total)

    def _on_wait(self, job: Job, reason: str | None) -> None:
        if job.deleted:  # stop waiting for resources on behalf of a deleted job
            raise RuntimeError(f"job {job.id} was deleted while it waited to be scored")
        if reason is not None:
            if job.reason is None:
                log.info("job %s: queued: %s", job.id, reason)
            self._on_progress(job, "queued", 0, 0)
        job.reason = reason

    async def _score(self, job: Job) -> None:
        """Score the job (if its policy reads scores), start its state actors, replay."""
        from saelect.workers.pipeline import run_scoring
        from saelect.workers.selection_state import SelectionShards
        from saelect.workers.shard_plan import plan_shards

        spec = job.spec
        try:
            storage = None
            if needs_scores(spec):
                key = scoring_key(spec)
                lock = self._scoring_locks.setdefault(key, asyncio.Lock())
                if lock.locked():
                    others = [
                        j.id
                        for j in self._jobs.values()
                        if j is not job
                        and j.phase not in ("ready", "failed")
                        and scoring_key(j.spec) == key
                    ]
                    self._on_wait(
                        job,
                        f"waits for the scoring it shares with {others or 'another job'}"
                        " (same data, features and SAE)",
                    )
                async with lock:
                    self._on_wait(job, None)
                    await asyncio.to_thread(self._check_scoring, job, key)
                    result = await asyncio.to_thread(
                        run_scoring,
                        self.scoring_storage(key),
                        spec.dataset.uri,
                        spec.dataset.feature,
                        spec.dataset.label_column,
                        spec.sae,
                        spec.scores,
                        resources=spec.scoring,
                        on_progress=lambda ph, d, t: self._on_progress(
                            job, _scoring_phase(ph), d, t
                        ),
                        on_wait=lambda reason: self._on_wait(job, reason),
                        progress_bar=self.progress_bar,
                        allowed_roots=self.allowed_roots,
                        options=self.pipeline_options,
                        reservation_name=f"saelect-scoring-{key}",
                    )
                    await asyncio.to_thread(seal_scoring, self.scoring_storage(key))
                job.scoring = result
                plan, storage = result.plan, result.storage
                scored_s = sum(v for k, v in result.timings.items() if k != "queued")
                if scored_s > 0:  # scored now, not loaded: its outputs were written now
                    self._scoring_bytes += await asyncio.to_thread(result.storage.size)
                    log.info(
                        "job %s: scored %d samples in %.1f s (%.0f samples/s; %s)",
                        job.id,
                        result.num_samples,
                        scored_s,
                        result.num_samples / scored_s,
                        ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()),
                    )
            else:
                label = spec.dataset.label_column
                plan = await asyncio.to_thread(
                    plan_shards,
                    spec.dataset.uri,
                    None,
                    columns=[label] if label else [],
                    allowed_roots=self.allowed_roots,
                    num_cpus=_cluster_cpus(),
                )
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
            engine = await asyncio.to_thread(self._build_engine, job)
            job.engine = engine
            self._on_progress(job, "ready", 1, 1)
            log.info(
                "job %s: ready (%d samples, %d shards, %d epochs replayed)",
                job.id,
                job.num_samples,
                len(job.shards.actors),
                engine.last_committed + 1,
            )
            self._write_state(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the job fails with the error; the service keeps serving
            log.exception("job %s failed", job.id)
            job.error = f"{type(exc).__name__}: {exc}"
            self._on_progress(job, "failed", 0, 0)
            if not job.deleted:
                self._write_state(job)

    def _check_scoring(self, job: Job, key: str) -> None:
        """Drop a stored scoring that fails its checksums: it is derived, so it is recomputed."""
        problem = verify_tree(self.scoring_storage(key), SCORING_MANIFEST)
        if problem is not None:
            log.warning("job %s: %s; recomputing the scoring %s", job.id, problem, key)
            self.store.storage.delete(f"scoring/{key}")

    def _build_engine(self, job: Job) -> SelectionEngine:
        """Attach the policy to the shards, then replay stored epochs and feedback in order."""
        policy = make_policy(job.spec.policy)
        job.shards.attach(policy)
        engine = SelectionEngine(policy, job.shards.broadcast())
        feedback = self._feedback_log(job.id)
        job.feedback_seq = len(feedback)
        job.feedback_keys = {key for *_, key in feedback if key is not None}
        for epoch in self.store.committed_epochs(job.id):
            for before, idx, losses, _ in feedback:
                if before == epoch:
                    engine.feedback(idx, losses)
            stored = self.store.read_epoch(job.id, epoch)
            if stored is None:  # listed by committed_epochs, so only a concurrent delete
                raise RuntimeError(f"epoch {epoch} of job {job.id} vanished from the store")
            res = engine.select(epoch)
            if not np.array_equal(res.indices, stored):
                raise RuntimeError(
                    f"replay of epoch {epoch} of job {job.id} differs from the stored epoch; "
                    "the store was written by a different configuration or version"
                )
            engine.commit(epoch)
            job.epochs[epoch] = stored
            job.stats[epoch] = self._read_stats(job.id, epoch, res.stats)
        for before, idx, losses, _ in feedback:
            if before > engine.last_committed:
                engine.feedback(idx, losses)
        return engine

    def _write_state(self, job: Job) -> None:
        last = job.engine.last_committed if job.engine is not None else -1
        state = JobState(
            last_committed_epoch=last,
            seed=job.spec.policy.seed,
            phase=job.phase,
            num_samples=job.num_samples,
            error=job.error,
        )
        self.store.write_state(job.id, state)

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

    def _check_epoch(self, job: Job, epoch: int) -> None:
        epochs = job.spec.policy.epochs
        if not 0 <= epoch < epochs:
            raise EpochOutOfRange(f"epoch {epoch} outside [0, {epochs}) of job {job.id!r}")

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
        held = await asyncio.to_thread(lambda: [self._scoring_resources(j) for j in jobs])
        return [JobMetrics(j.id, j.spec.policy.name, r) for j, r in zip(jobs, held, strict=True)]

    async def store_bytes_written(self) -> dict[str, int]:
        """Bytes written to the store, by kind: ``jobs`` (what this process wrote under
        ``jobs/``: epochs, their stats and weights, feedback, job state) and ``scoring`` (the
        outputs each scoring run stored, counted when it completes; a scoring loaded from the
        store adds nothing). The ``/metrics`` route reads them at scrape time."""
        return {"jobs": self.store.bytes_written, "scoring": self._scoring_bytes}

    def _scoring_resources(self, job: Job) -> dict[str, float]:
        from saelect.workers.pipeline import STATE_FILE

        if job.phase not in SCORING_PHASES or not needs_scores(job.spec):
            return {}
        try:
            doc = self.scoring_storage(scoring_key(job.spec)).read_json(STATE_FILE)
        except Exception:  # not written yet, or being replaced: nothing known to be held
            return {}
        return {str(k): float(v) for k, v in (doc.get("resources") or {}).items()}

    async def get_job(self, job_id: str) -> JobStatus:
        if check_job_id(job_id) in self._broken:
            return self._broken_status(job_id)
        return self._job(job_id).status()

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

    def _with_engine(
        self, job: Job, fn: Callable[[SelectionEngine], T], *, retry: bool = True
    ) -> T:
        """Run ``fn(engine)``; if a shard actor died under it, rebuild the engine and retry once.

        Ray restarts a crashed ShardActor from the store, but the restarted process has no
        selection state: re-attaching the policy and replaying the stored epochs and feedback
        (`_build_engine`) restores exactly the state the engine had. With ``retry=False`` the
        rebuild alone completes the call (feedback: the replayed log already holds it).
        """
        import ray

        if job.engine is None:
            raise JobNotReady(f"job {job.id!r} has no selection engine (phase {job.phase})")
        try:
            return fn(job.engine)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            log.warning("job %s: shard actor failure (%s); rebuilding its engine", job.id, exc)
            job.engine = self._build_engine(job)
            return fn(job.engine) if retry else None  # type: ignore[return-value]

    def _next_epoch(self, job: Job) -> None:
        self._with_engine(job, lambda engine: self._select_and_commit(job, engine))

    def _select_and_commit(self, job: Job, engine: SelectionEngine) -> None:
        t = engine.last_committed + 1
        t0 = time.perf_counter()
        res = engine.select(t)
        stats = dict(res.stats)
        stats["selection_seconds"] = time.perf_counter() - t0
        # store first, then commit: a crash in between replays the stored epoch identically
        self.store.write_epoch(job.id, t, res.indices, stats=_jsonable(stats), weights=res.weights)
        engine.commit(t)
        job.stats[t] = stats
        job.epochs[t] = res.indices
        self._write_state(job)
        log.info(
            "job %s: epoch %d selected (%d samples, %.3f s)",
            job.id,
            t,
            res.indices.shape[0],
            stats["selection_seconds"],
        )
        for listener in self._epoch_listeners:
            listener(job.id, job.spec.policy.name, t, stats["selection_seconds"])

    def _read_stats(self, job_id: str, epoch: int, fallback: dict[str, Any]) -> dict[str, Any]:
        stored = self.store.read_epoch_stats(job_id, epoch)
        return stored if stored is not None else dict(fallback)

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
            self.store.write_file(
                job_id,
                f"{FEEDBACK_LOG}/{seq:08d}.npz",
                _npz(before=before, epoch=epoch, idx=idx, loss=val, key=rank_seq),
            )
            job.feedback_seq += 1
            if dedup is not None:
                job.feedback_keys.add(dedup)
            await asyncio.to_thread(
                self._with_engine, job, lambda e: e.feedback(idx, val), retry=False
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

    def _feedback_log(
        self, job_id: str
    ) -> list[tuple[int, np.ndarray, np.ndarray, tuple[int, int, int] | None]]:
        """(before, indices int64 (n,), losses float32 (n,), (epoch, rank, seq) or None) of
        every stored feedback in arrival order; unkeyed posts (and logs from before keys) have
        None."""
        out = []
        for name in self.store.committed_files(job_id, f"{FEEDBACK_LOG}/"):
            data = self.store.read_file(job_id, f"{FEEDBACK_LOG}/{name}")
            if name.endswith(".npz") and data is not None:
                d = _unnpz(data)
                rank, seq = (int(v) for v in d["key"]) if "key" in d else (-1, -1)
                key = (int(d["epoch"]), rank, seq) if rank >= 0 else None
                out.append((int(d["before"]), d["idx"], d["loss"], key))
        return out

    async def epoch_stats(self, job_id: str, epoch: int) -> dict[str, Any]:
        job = self._ready(job_id)
        await self._epoch(job, epoch)
        stats = dict(job.stats[epoch])
        stats.setdefault("lambda", None)
        stats.setdefault("factor_coverage", None)
        stats["epoch"] = epoch
        return stats

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
                self.store.storage.delete(f"scoring/{key}")  # no other job uses this scoring
        log.info("job %s: deleted", job_id)


LATE_FEATURE_FIELDS = ("image_shape", "model", "weights", "library", "image_size")
"""FeatureSpec fields added after stores existed: `scoring_key` leaves them out while None."""


def scoring_key(spec: JobSpec) -> str:
    """Content key of a job's scoring: dataset, features, labels, SAE and score config.

    The policy is not part of it: jobs that A/B policies on the same data share one scoring.
    """
    feature = dataclasses.asdict(spec.dataset.feature)
    # fields added later enter the key only when set, so existing stores keep their keys
    for late in LATE_FEATURE_FIELDS:
        if feature[late] is None:
            del feature[late]
    doc = {
        "uri": spec.dataset.uri,
        "feature": feature,
        "label": spec.dataset.label_column,
        "sae": {k: v for k, v in dataclasses.asdict(spec.sae).items() if k != "device"},
        "scores": dataclasses.asdict(spec.scores),
    }
    blob = json.dumps(doc, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


SCORING_PHASES = frozenset({"featurizing", "training_sae", "encoding", "scoring"})
"""Phases in which a job's scoring holds its reservation."""

SCORED_POLICIES = frozenset({"factor", "factor_loss"})
"""Policies that read R, D or codes: only their jobs are scored."""


def needs_scores(spec: JobSpec) -> bool:
    """Whether the job's policy reads scores (R, D, codes), so the job must be scored first."""
    return spec.policy.name in SCORED_POLICIES


def seal_scoring(storage: Storage) -> None:
    """Record the digests of every output of a finished scoring (read back: one pass of I/O)."""
    files = tree_digests(storage, exclude=(SCORING_MANIFEST,))
    write_manifest(storage, SCORING_MANIFEST, {rel: [d] for rel, d in files.items()})


def _cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def _scoring_phase(phase: str) -> str:
    """The pipeline's phase as the job reports it: a job is ready only once its engine is."""
    return "scoring" if phase == "ready" else phase


def _npz(**arrays: Any) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})  # type: ignore[arg-type]
    return buf.getvalue()


def _unnpz(data: bytes) -> dict[str, np.ndarray]:
    import io

    with np.load(io.BytesIO(data)) as z:
        return {k: z[k] for k in z.files}


def _jsonable(obj: Any) -> Any:
    """Numpy scalars and arrays to JSON types, recursively."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
