"""The scoring run's bookkeeping: ``pipeline.json``, progress, errors, stored outputs.

`PipelineState` is the run's record below the job storage (fingerprint, shard boundaries, phases
done, failure, attempts); `RunProgress` reports (phase, done, total); `wait_all` waits on Ray
tasks while reporting; `error_message` unwraps Ray's task errors; the rest read or drop the
stored outputs. `workers.pipeline.run_scoring` drives them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from saelect.workers.admission import PlacementTimeoutError
from saelect.workers.pipeline_types import ProgressFn, ScoringError
from saelect.workers.shard_plan import ShardPlan
from saelect.workers.shard_scoring import FACTORS_FILE, SAE_DIR, shard_dir
from saelect.workers.storage import Storage

__all__ = [
    "STATE_FILE",
    "PipelineState",
    "RunProgress",
    "all_scored",
    "default_reservation_name",
    "error_message",
    "global_counts",
    "reset_outputs",
    "split_by_shard",
    "wait_all",
]

STATE_FILE = "pipeline.json"
"""Pipeline state below the job storage: fingerprint, shard boundaries, phases done, error."""


class PipelineState:
    """``pipeline.json``: fingerprint, shard boundaries, phases done, failure, attempts."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.doc: dict[str, Any] = (
            storage.read_json(STATE_FILE) if storage.exists(STATE_FILE) else {}
        )

    def save(self) -> None:
        self.storage.write_json(STATE_FILE, self.doc)

    def done(self, phase: str) -> None:
        phases = self.doc.setdefault("phases_done", [])
        if phase not in phases:
            phases.append(phase)
        self.doc["failed"] = None
        self.save()

    def is_done(self, phase: str) -> bool:
        return phase in self.doc.get("phases_done", [])


class RunProgress:
    """Reports (phase, done, total) to the callback and a tqdm bar per phase."""

    def __init__(self, on_progress: ProgressFn | None, bar: bool) -> None:
        self.on_progress = on_progress
        self.bar_enabled = bar
        self._bar: Any = None
        self._phase: str | None = None

    def __call__(self, phase: str, done: int, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress(phase, done, total)
        if not self.bar_enabled or phase in ("ready", "queued"):
            return
        from tqdm.auto import tqdm

        if phase != self._phase:
            self.close()
            self._phase = phase
            unit = "fit" if phase == "training_sae" else "rows"
            self._bar = tqdm(total=total, desc=phase, unit=unit)
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def wait_all(refs: Sequence[Any], weights: Sequence[int], report: Callable[[int], None]) -> list:
    """ray.get of all refs, reporting the summed weight of finished ones as they complete."""
    import ray

    pending = list(refs)
    weight = {r: w for r, w in zip(refs, weights, strict=True)}
    done = 0
    report(0)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)  # raise early when a task failed
        done += sum(weight[r] for r in ready)
        report(done)
    return ray.get(list(refs))


def error_message(exc: BaseException) -> str:
    """The user-facing message of an exception, unwrapping Ray's task errors."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        return error_message(cause)
    if isinstance(exc, ScoringError | PlacementTimeoutError):
        return exc.message
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, ValueError) else text


def reset_outputs(storage: Storage) -> None:
    for rel in ("features", SAE_DIR, "shards", FACTORS_FILE):
        storage.delete(rel)


def split_by_shard(global_idx: np.ndarray, plan: ShardPlan) -> list[np.ndarray]:
    """Sorted global indices split by shard (one array per shard, in shard order)."""
    cuts = np.searchsorted(global_idx, plan.boundaries()[1:-1])
    return np.split(global_idx, cuts)


def default_reservation_name(storage: Storage) -> str:
    digest = hashlib.sha256(storage.path().encode()).hexdigest()[:16]
    return f"saelect-scoring-{digest}"


def all_scored(storage: Storage, plan: ShardPlan) -> bool:
    return storage.exists(FACTORS_FILE) and all(
        storage.child(shard_dir(s.shard_id)).exists("scores.npz") for s in plan.shards
    )


def global_counts(storage: Storage, plan: ShardPlan) -> np.ndarray:
    counts = [storage.child(shard_dir(s.shard_id)).read_npy("counts.npy") for s in plan.shards]
    return np.sum(np.stack(counts), axis=0).astype(np.int64)
