"""A job's stored history (epochs, their stats and weights, the feedback log, the job state) and
its replay.

Epochs are computed in order, stored (docs/reliability.md, Persistence) and then committed
(`select_and_commit`); feedback is logged before it is applied (`write_feedback`). On a restart,
or after a shard actor died, `build_engine` re-attaches the policy and replays the stored epochs
and the feedback log in arrival order, checking each replayed epoch against the stored one, so
the engine holds exactly the state an uninterrupted run would have.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from saelect.service.errors import JobNotReady
from saelect.service.job import JOBS_LOGGER, Job
from saelect.service.policies import make_policy
from saelect.service.selection.engine import SelectionEngine
from saelect.service.store import JobState, JobStore

log = logging.getLogger(JOBS_LOGGER)

FEEDBACK_LOG = "feedback_log"
"""Folder of a job's feedback log: one ``{seq:08d}.npz`` per post, in arrival order."""

FeedbackRecord = tuple[int, np.ndarray, np.ndarray, tuple[int, int, int] | None]
"""(before, indices int64 (n,), losses float32 (n,), (epoch, rank, seq) or None)."""
T = TypeVar("T")


def build_engine(store: JobStore, job: Job) -> SelectionEngine:
    """Attach the policy to the shards, then replay stored epochs and feedback in order."""
    policy = make_policy(job.spec.policy)
    job.shards.attach(policy)
    engine = SelectionEngine(policy, job.shards.broadcast())
    feedback = feedback_log(store, job.id)
    job.feedback_seq = len(feedback)
    job.feedback_keys = {key for *_, key in feedback if key is not None}
    for epoch in store.committed_epochs(job.id):
        for before, idx, losses, _ in feedback:
            if before == epoch:
                engine.feedback(idx, losses)
        stored = store.read_epoch(job.id, epoch)
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
        job.stats[epoch] = _read_stats(store, job.id, epoch, res.stats)
    for before, idx, losses, _ in feedback:
        if before > engine.last_committed:
            engine.feedback(idx, losses)
    return engine


def with_engine(
    store: JobStore, job: Job, fn: Callable[[SelectionEngine], T], *, retry: bool = True
) -> T:
    """Run ``fn(engine)``; if a shard actor died under it, rebuild the engine and retry once.

    Ray restarts a crashed ShardActor from the store, but the restarted process has no
    selection state: re-attaching the policy and replaying the stored epochs and feedback
    (`build_engine`) restores exactly the state the engine had. With ``retry=False`` the
    rebuild alone completes the call (feedback: the replayed log already holds it).
    """
    import ray

    if job.engine is None:
        raise JobNotReady(f"job {job.id!r} has no selection engine (phase {job.phase})")
    try:
        return fn(job.engine)
    except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
        log.warning("job %s: shard actor failure (%s); rebuilding its engine", job.id, exc)
        job.engine = build_engine(store, job)
        return fn(job.engine) if retry else None  # type: ignore[return-value]


def select_and_commit(
    store: JobStore,
    job: Job,
    engine: SelectionEngine,
    listeners: list[Callable[[str, str, int, float], None]],
) -> None:
    """Select the job's next epoch, store it, then commit it; call each of ``listeners`` with
    ``(job_id, policy, epoch, selection_seconds)``."""
    t = engine.last_committed + 1
    t0 = time.perf_counter()
    res = engine.select(t)
    stats = dict(res.stats)
    stats["selection_seconds"] = time.perf_counter() - t0
    # store first, then commit: a crash in between replays the stored epoch identically
    store.write_epoch(job.id, t, res.indices, stats=_jsonable(stats), weights=res.weights)
    engine.commit(t)
    job.stats[t] = stats
    job.epochs[t] = res.indices
    write_state(store, job)
    log.info(
        "job %s: epoch %d selected (%d samples, %.3f s)",
        job.id,
        t,
        res.indices.shape[0],
        stats["selection_seconds"],
    )
    for listener in listeners:
        listener(job.id, job.spec.policy.name, t, stats["selection_seconds"])


def write_state(store: JobStore, job: Job) -> None:
    """Store the job's state: last committed epoch, seed, phase, row count and error."""
    last = job.engine.last_committed if job.engine is not None else -1
    state = JobState(
        last_committed_epoch=last,
        seed=job.spec.policy.seed,
        phase=job.phase,
        num_samples=job.num_samples,
        error=job.error,
    )
    store.write_state(job.id, state)


def write_feedback(
    store: JobStore,
    job_id: str,
    seq: int,
    *,
    before: int,
    epoch: int,
    idx: np.ndarray,
    loss: np.ndarray,
    key: np.ndarray,
) -> None:
    """Log feedback post ``seq``: applied before epoch ``before``, for epoch ``epoch``, indices
    int64 (n,), losses float32 (n,) and key int64 (2,) = (rank, seq), (-1, -1) when unkeyed."""
    store.write_file(
        job_id,
        f"{FEEDBACK_LOG}/{seq:08d}.npz",
        _npz(before=before, epoch=epoch, idx=idx, loss=loss, key=key),
    )


def feedback_log(store: JobStore, job_id: str) -> list[FeedbackRecord]:
    """(before, indices int64 (n,), losses float32 (n,), (epoch, rank, seq) or None) of
    every stored feedback in arrival order; unkeyed posts (and logs from before keys) have
    None."""
    out = []
    for name in store.committed_files(job_id, f"{FEEDBACK_LOG}/"):
        data = store.read_file(job_id, f"{FEEDBACK_LOG}/{name}")
        if name.endswith(".npz") and data is not None:
            d = _unnpz(data)
            rank, seq = (int(v) for v in d["key"]) if "key" in d else (-1, -1)
            key = (int(d["epoch"]), rank, seq) if rank >= 0 else None
            out.append((int(d["before"]), d["idx"], d["loss"], key))
    return out


def _read_stats(
    store: JobStore, job_id: str, epoch: int, fallback: dict[str, Any]
) -> dict[str, Any]:
    stored = store.read_epoch_stats(job_id, epoch)
    return stored if stored is not None else dict(fallback)


def _npz(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})  # type: ignore[arg-type]
    return buf.getvalue()


def _unnpz(data: bytes) -> dict[str, np.ndarray]:
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
