"""The scoring pipeline's types: its phases, options, result and error.

`workers.pipeline.run_scoring` takes `PipelineOptions`, returns a `ScoringResult` and raises
`ScoringError`; its run state lives in :mod:`workers.pipeline_state`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from saelect.workers import shard_scoring
from saelect.workers.codes import SparseCodes
from saelect.workers.shard_plan import ShardPlan
from saelect.workers.shard_scoring import ENCODING_RECORD, shard_dir
from saelect.workers.storage import Storage

__all__ = [
    "PHASES",
    "PipelineOptions",
    "ProgressFn",
    "ScoringError",
    "ScoringResult",
    "WaitFn",
]

PHASES = ("queued", "featurizing", "training_sae", "encoding", "scoring", "ready")
"""The pipeline's phases in order (the job status adds ``pending`` and ``failed``)."""
ProgressFn = Callable[[str, int, int], None]
"""on_progress(phase, done, total)."""
WaitFn = Callable[[str | None], None]
"""on_wait(reason): what the run waits for, None once it runs."""


class ScoringError(RuntimeError):
    """Scoring failed in a way a retry cannot fix; ``phase`` is where it failed.

    Survives pickling (it crosses Ray process boundaries intact).
    """

    def __init__(self, message: str, phase: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.phase = phase

    def __reduce__(self) -> tuple[Any, ...]:
        return (ScoringError, (self.message, self.phase))

    def __str__(self) -> str:
        return self.message if self.phase is None else f"{self.phase}: {self.message}"


@dataclass(frozen=True)
class PipelineOptions:
    """Knobs of the scoring pipeline beyond the job spec."""

    extractor_fit_samples: int = 20_000
    """Rows of the global sample the extractor is fitted on (pixels: standardize + PCA)."""
    sae_workers: int = 1
    """SAE training workers: 1 trains in one scoring task, more use Ray Train data-parallel
    (its workers reserve their own resources, outside the scoring reservation)."""
    sae_cpus_per_worker: float = 1.0
    """CPUs each Ray Train worker reserves (CPU clusters)."""
    max_task_retries: int = 3
    """How often Ray retries a scoring task whose worker died."""
    encode_batch_size: int = 8192
    """Rows featurized and encoded at a time on a shard."""
    encode_pause_s: float = 0.0
    """Pause after each encode batch (tests interrupt encoding with it)."""
    poll_s: float = 0.5
    """How often a waiting run re-checks its placement and reports why it waits."""

    def __post_init__(self) -> None:
        if self.extractor_fit_samples < 1:
            raise ValueError(
                f"extractor_fit_samples must be >= 1, got {self.extractor_fit_samples}"
            )
        if self.sae_workers < 1:
            raise ValueError(f"sae_workers must be >= 1, got {self.sae_workers}")
        if self.sae_cpus_per_worker <= 0:
            raise ValueError(f"sae_cpus_per_worker must be > 0, got {self.sae_cpus_per_worker}")
        if self.max_task_retries < -1:
            raise ValueError(f"max_task_retries must be >= -1, got {self.max_task_retries}")
        if self.encode_batch_size < 1:
            raise ValueError(f"encode_batch_size must be >= 1, got {self.encode_batch_size}")
        if self.encode_pause_s < 0:
            raise ValueError(f"encode_pause_s must be >= 0, got {self.encode_pause_s}")
        if self.poll_s <= 0:
            raise ValueError(f"poll_s must be > 0, got {self.poll_s}")


@dataclass
class ScoringResult:
    """A scored dataset: the plan, the global quantities, and where the per-shard outputs are.

    Holds no Ray resource: the outputs are in the storage, read back on demand.
    """

    plan: ShardPlan
    """The shard plan (S shards over N rows)."""
    storage: Storage
    """The scoring storage (``shards/{s:05d}/scores.npz``, ``codes.npz``...)."""
    num_samples: int
    """N."""
    p: np.ndarray
    """float64 (M,) global factor frequencies."""
    counts: np.ndarray
    """int64 (M,) global factor counts."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per phase (``queued`` is the wait for resources)."""
    resources: dict[str, float] = field(default_factory=dict)
    """What the run reserved while it scored (empty when it re-attached to stored outputs)."""

    def scores(self) -> tuple[np.ndarray, np.ndarray]:
        """Rank-normalized R and D over [0, N), float64 (N,) each."""
        ids = [s.shard_id for s in self.plan.shards]
        parts = [shard_scoring.load_shard_scores(self.storage, i) for i in ids]
        return np.concatenate([r for r, _ in parts]), np.concatenate([d for _, d in parts])

    def labels(self) -> np.ndarray | None:
        """int64 (N,) labels, or None without a label column."""
        ids = [s.shard_id for s in self.plan.shards]
        parts = [shard_scoring.load_shard_labels(self.storage, i) for i in ids]
        return None if parts[0] is None else np.concatenate(parts)  # type: ignore[arg-type]

    def codes(self) -> SparseCodes:
        """Sparse codes of all rows (ids int32 (N, k), values float16 (N, k))."""
        return SparseCodes.concat(
            [shard_scoring.load_shard_codes(self.storage, s.shard_id) for s in self.plan.shards]
        )

    def encoding_records(self) -> list[dict[str, Any]]:
        """Per shard, the last encode attempt's record (attempt, interrupted, pid, node, device)."""
        out = []
        for s in self.plan.shards:
            sd = self.storage.child(shard_dir(s.shard_id))
            out.append(sd.read_json(ENCODING_RECORD) if sd.exists(ENCODING_RECORD) else {})
        return out
