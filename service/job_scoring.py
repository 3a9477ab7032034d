"""The scoring of a job: its shard plan and, when its policy reads scores, its scoring outputs.

A job whose policy reads scores (`needs_scores`) is scored on the cluster by
``workers.pipeline.run_scoring`` (in a thread, so the event loop keeps serving; the scoring
reserves GPUs or CPUs only while it runs, and a job whose scoring cannot be placed yet is
``queued`` with the reason). Jobs with the same `scoring_key` (same data, features and SAE; the
A/B case) share one scoring: the second waits for the first and then loads its outputs. A policy
that reads no scores skips the scoring: only the row count (and labels) are planned.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
from typing import Any

from saelect.service.job import JOBS_LOGGER, Job
from saelect.service.specs import JobSpec
from saelect.workers.storage import Storage, tree_digests, verify_tree, write_manifest

log = logging.getLogger(JOBS_LOGGER)

SCORING_MANIFEST = "manifest.json"
"""Digests of a scoring's outputs, written each time `run_scoring` returns (`seal_scoring`)."""

LATE_FEATURE_FIELDS = ("image_shape", "model", "weights", "library", "image_size")
"""FeatureSpec fields added after stores existed: `scoring_key` leaves them out while None."""

SCORING_PHASES = frozenset({"featurizing", "training_sae", "encoding", "scoring"})
"""Phases in which a job's scoring holds its reservation."""

SCORED_POLICIES = frozenset({"factor", "factor_loss"})
"""Policies that read R, D or codes: only their jobs are scored."""


class JobScoring:
    """Scores the jobs of one store on the connected Ray cluster, one run per `scoring_key`.

    Parameters
    ----------
    storage:
        The store's root storage; the outputs of scoring ``key`` live under ``scoring/{key}``.
    allowed_roots:
        Dataset roots a job's URI must lie under (checked again by the pipeline).
    pipeline_options:
        ``workers.pipeline_types.PipelineOptions`` for every job (None: defaults).
    progress_bar:
        Show tqdm bars while scoring (the command line); off inside services.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        allowed_roots: list[str] | None = None,
        pipeline_options: Any = None,
        progress_bar: bool = False,
    ) -> None:
        self.root = storage
        self.allowed_roots = allowed_roots
        self.pipeline_options = pipeline_options
        self.progress_bar = progress_bar
        self._locks: dict[str, asyncio.Lock] = {}
        self.bytes_written = 0
        """Bytes stored by the scoring runs completed here."""

    def storage(self, key: str) -> Storage:
        """Where the scoring outputs of every job with `scoring_key` ``key`` live."""
        return self.root.child(f"scoring/{key}")

    async def plan(self, job: Job, jobs: dict[str, Job]) -> tuple[Any, Storage | None]:
        """Score ``job`` if its policy reads scores; return its shard plan and scoring storage.

        ``jobs`` (every job of the store, by id) names the jobs a shared scoring waits for. The
        plan is a ``workers.shard_plan.ShardPlan``; the storage is None (and nothing is scored)
        for a policy that reads no scores. Sets ``job.scoring`` and the job's phases.
        """
        from saelect.workers.pipeline import run_scoring
        from saelect.workers.shard_plan import plan_shards

        spec = job.spec
        storage = None
        if needs_scores(spec):
            key = scoring_key(spec)
            lock = self._locks.setdefault(key, asyncio.Lock())
            if lock.locked():
                others = [
                    j.id
                    for j in jobs.values()
                    if j is not job
                    and j.phase not in ("ready", "failed")
                    and scoring_key(j.spec) == key
                ]
                job.on_wait(
                    f"waits for the scoring it shares with {others or 'another job'}"
                    " (same data, features and SAE)",
                )
            async with lock:
                job.on_wait(None)
                await asyncio.to_thread(self.check, job, key)
                result = await asyncio.to_thread(
                    run_scoring,
                    self.storage(key),
                    spec.dataset.uri,
                    spec.dataset.feature,
                    spec.dataset.label_column,
                    spec.sae,
                    spec.scores,
                    resources=spec.scoring,
                    on_progress=lambda ph, d, t: job.on_progress(_scoring_phase(ph), d, t),
                    on_wait=job.on_wait,
                    progress_bar=self.progress_bar,
                    allowed_roots=self.allowed_roots,
                    options=self.pipeline_options,
                    reservation_name=f"saelect-scoring-{key}",
                )
                await asyncio.to_thread(seal_scoring, self.storage(key))
            job.scoring = result
            plan, storage = result.plan, result.storage
            scored_s = sum(v for k, v in result.timings.items() if k != "queued")
            if scored_s > 0:  # scored now, not loaded: its outputs were written now
                self.bytes_written += await asyncio.to_thread(result.storage.size)
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
        return plan, storage

    def check(self, job: Job, key: str) -> None:
        """Drop a stored scoring that fails its checksums: it is derived, so it is recomputed."""
        problem = verify_tree(self.storage(key), SCORING_MANIFEST)
        if problem is not None:
            log.warning("job %s: %s; recomputing the scoring %s", job.id, problem, key)
            self.root.delete(f"scoring/{key}")

    def resources(self, job: Job) -> dict[str, float]:
        """Cluster resources the job's scoring reserves now (resource name -> amount; empty
        when it is not scoring or its scoring has not recorded them yet)."""
        from saelect.workers.pipeline_state import STATE_FILE

        if job.phase not in SCORING_PHASES or not needs_scores(job.spec):
            return {}
        try:
            doc = self.storage(scoring_key(job.spec)).read_json(STATE_FILE)
        except Exception:  # not written yet, or being replaced: nothing known to be held
            return {}
        return {str(k): float(v) for k, v in (doc.get("resources") or {}).items()}

    def delete(self, key: str) -> None:
        """Delete the stored outputs of scoring ``key``."""
        self.root.delete(f"scoring/{key}")


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
