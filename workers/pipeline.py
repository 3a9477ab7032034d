"""The scoring pipeline on Ray: shard plan, shard actors, features, SAE, codes, p, R and D.

`run_scoring` drives one job's scoring over `ShardActor`s (DESIGN section 3):

1. **plan**: `plan_shards` cuts the Parquet dataset into S contiguous ranges (S from the
   cluster's resources unless given); one actor per shard, spread over the nodes;
2. **featurizing**: the extractor is fitted once on a global sample gathered from the shards
   (the rows with the smallest counter-based keys, so the sample does not depend on S), then
   every shard extracts its features with the shipped state;
3. **training_sae**: the SAE is trained on a sample of at most ``sae.max_train_samples`` rows
   (one worker, or Ray Train data-parallel, see `workers.sae_train`);
4. **encoding**: every shard encodes its rows and counts factor activations, in parallel; the
   counts are summed into the global frequencies p;
5. **scoring**: every shard computes raw R and D and its sorted copies; global rank
   normalization merges them exactly, so the result equals `score_single_process`.

Each phase reports ``on_progress(phase, done, total)`` (samples done, or SAE steps) and shows a
tqdm bar. Outputs persist below the job storage (docs/architecture.md, "Scoring pipeline
outputs"); a rerun skips every output that exists, so a crashed run resumes. A failure that
cannot be retried raises `ScoringError` (and ``pipeline.json`` records it).

Example
-------
>>> result = run_scoring(Storage("/tmp/job"), "/data/train.parquet",           # doctest: +SKIP
...                      FeatureSpec("pixels", "image", dim=64), "label",
...                      SAEConfig(units=512, k=16), ScoreConfig())
>>> r, d = result.scores()                                                       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from workers.codes import SparseCodes
from workers.factors import factor_counts, factor_frequencies
from workers.features import FeatureSpec, make_extractor
from workers.sae import SAEConfig, encode, save_sae
from workers.sae_train import train_sae_distributed
from workers.scores import ScoreConfig, rank_normalize, score_codes
from workers.selection_shard import ShardData
from workers.shard_actor import (
    EXTRACTOR_FILE,
    FACTORS_FILE,
    SAE_DIR,
    SAE_FILES,
    ShardConfig,
    actor_broadcast,
    column_values,
    concat_values,
    remote_shard_actor,
    sae_from_files,
)
from workers.shard_plan import ShardPlan, plan_shards, read_shard, row_keys
from workers.storage import Storage

__all__ = [
    "PHASES",
    "PipelineOptions",
    "ScoringError",
    "ScoringResult",
    "SingleProcessScores",
    "run_scoring",
    "score_single_process",
]

PHASES = ("featurizing", "training_sae", "encoding", "scoring", "ready")
"""The pipeline's phases in order (the job status adds ``pending`` and ``failed``)."""
STATE_FILE = "pipeline.json"
"""Pipeline state below the job storage: fingerprint, shard boundaries, phases done, error."""

ProgressFn = Callable[[str, int, int], None]
"""on_progress(phase, done, total)."""

_FIT_STREAM = 1  # sample stream of the extractor fit
_SAE_STREAM = 2  # sample stream of the SAE training set


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
    """SAE training workers: 1 trains in the driver, more use Ray Train data-parallel."""
    sae_cpus_per_worker: float = 1.0
    """CPUs each Ray Train worker reserves (CPU clusters)."""
    use_gpu: bool | None = None
    """Shard actors and SAE workers on GPUs; None: when the cluster has GPUs."""
    cpus_per_shard: float = 0.25
    """CPUs a shard actor reserves on a CPU cluster."""
    max_restarts: int = 3
    """How often Ray restarts a shard actor that died."""
    max_task_retries: int = 3
    """How often a task on a restarted actor is retried."""
    encode_batch_size: int = 8192
    """Rows per SAE encode batch on the shards."""
    encode_pause_s: float = 0.0
    """Pause after each encode batch (tests interrupt encoding with it)."""
    actor_name_prefix: str | None = None
    """Name the shard actors ``{prefix}-{s:05d}`` (found again with ``ray.get_actor``)."""

    def __post_init__(self) -> None:
        if self.extractor_fit_samples < 1:
            raise ValueError(
                f"extractor_fit_samples must be >= 1, got {self.extractor_fit_samples}"
            )
        if self.sae_workers < 1:
            raise ValueError(f"sae_workers must be >= 1, got {self.sae_workers}")
        if self.sae_cpus_per_worker <= 0:
            raise ValueError(f"sae_cpus_per_worker must be > 0, got {self.sae_cpus_per_worker}")
        if self.cpus_per_shard <= 0:
            raise ValueError(f"cpus_per_shard must be > 0, got {self.cpus_per_shard}")
        if self.max_restarts < -1 or self.max_task_retries < -1:
            raise ValueError(
                f"max_restarts={self.max_restarts}, max_task_retries={self.max_task_retries}: "
                "each must be >= -1 (-1 = unlimited)"
            )
        if self.encode_batch_size < 1:
            raise ValueError(f"encode_batch_size must be >= 1, got {self.encode_batch_size}")
        if self.encode_pause_s < 0:
            raise ValueError(f"encode_pause_s must be >= 0, got {self.encode_pause_s}")


@dataclass
class ScoringResult:
    """A scored dataset: the live shard actors and the global quantities."""

    plan: ShardPlan
    """The shard plan (S shards over N rows)."""
    actors: list[Any]
    """Ray handles of the `ShardActor`s, in shard order."""
    num_samples: int
    """N."""
    p: np.ndarray
    """float64 (M,) global factor frequencies."""
    counts: np.ndarray
    """int64 (M,) global factor counts."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per phase."""

    def broadcast(self) -> Callable[..., list[Any]]:
        """A `service.selection.threshold` broadcast over the actors' attached selection."""
        return actor_broadcast(self.actors)

    def attach_selection(self, policy: Any, *, with_codes: bool = True) -> None:
        """Give every shard a fresh `SelectionShard` driven by ``policy``."""
        import ray

        policy_ref = ray.put(policy)  # one copy in the object store for every shard
        ray.get([a.attach_selection.remote(policy_ref, with_codes) for a in self.actors])

    def scores(self) -> tuple[np.ndarray, np.ndarray]:
        """Rank-normalized R and D over [0, N), float64 (N,) each (gathered from the shards)."""
        import ray

        parts = ray.get([a.scores.remote() for a in self.actors])
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def labels(self) -> np.ndarray | None:
        """int64 (N,) labels, or None without a label column."""
        import ray

        parts = ray.get([a.labels.remote() for a in self.actors])
        return None if parts[0] is None else np.concatenate(parts)

    def shutdown(self) -> None:
        """Kill the shard actors."""
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []


class SingleProcessScores(NamedTuple):
    """The single-process reference: everything the pipeline computes, in one process."""

    R: np.ndarray
    """float64 (N,) rank-normalized representativeness."""
    D: np.ndarray
    """float64 (N,) rank-normalized diversity."""
    labels: np.ndarray | None
    """int64 (N,) labels or None."""
    codes: SparseCodes
    """Sparse codes of all rows."""
    counts: np.ndarray
    """int64 (M,) factor counts."""
    p: np.ndarray
    """float64 (M,) factor frequencies."""
    timings: dict[str, float]
    """Seconds per phase (featurizing, training_sae, encoding, scoring)."""

    def shard_data(self) -> ShardData:
        """The whole dataset as one selection shard [0, N): R, D, labels, codes and p."""
        return ShardData(
            lo=0,
            hi=int(self.R.shape[0]),
            R=self.R,
            D=self.D,
            labels=self.labels,
            code_ids=self.codes.ids,
            code_values=self.codes.values,
            p=self.p,
        )


def _sample_seed(seed: int, stream: int) -> int:
    return seed * 1_000_003 + stream


def _sample_indices(num_rows: int, count: int, seed: int) -> np.ndarray:
    """Sorted int64 global indices of the ``count`` rows with the smallest keys."""
    keys = row_keys(seed, 0, num_rows)
    if count >= num_rows:
        return np.arange(num_rows, dtype=np.int64)
    return np.sort(np.argpartition(keys, count - 1)[:count]).astype(np.int64)


def _sae_train_count(config: SAEConfig, num_rows: int) -> int:
    limit = getattr(config, "max_train_samples", None)
    return num_rows if limit is None else min(num_rows, int(limit))


def _fit_extractor(spec: FeatureSpec, sample: Any) -> dict[str, np.ndarray]:
    extractor = make_extractor(spec)
    extractor.fit(sample)
    return {k: np.asarray(v) for k, v in extractor.state_dict().items()}


def _sae_to_files(model: Any, config: SAEConfig) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory(prefix="saelect-sae-") as tmp:
        save_sae(model, tmp, config)
        out = {}
        for name in SAE_FILES:
            with open(os.path.join(tmp, name), "rb") as f:
                out[name] = f.read()
        return out


def score_single_process(
    dataset_uri: str,
    feature_spec: FeatureSpec,
    label_column: str | None,
    sae_config: SAEConfig,
    score_config: ScoreConfig,
    *,
    options: PipelineOptions | None = None,
) -> SingleProcessScores:
    """Score a dataset in this process with the same pure functions and samples as the pipeline.

    The reference the distributed pipeline is tested against; also the ``S = 1, no Ray`` path
    of the benchmarks.
    """
    opts = options or PipelineOptions()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    columns = [feature_spec.column] + ([label_column] if label_column else [])
    plan = plan_shards(dataset_uri, 1, columns=columns)
    table = read_shard(plan.shards[0], columns)
    values = column_values(table, feature_spec)
    n = plan.num_rows
    fit_idx = _sample_indices(
        n, opts.extractor_fit_samples, _sample_seed(sae_config.seed, _FIT_STREAM)
    )
    state = _fit_extractor(feature_spec, _take(values, fit_idx))
    extractor = make_extractor(feature_spec)
    extractor.load_state_dict(state)
    feats = np.asarray(extractor.transform(values, progress=False), dtype=np.float32)  # (N, d)
    timings["featurizing"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sae_idx = _sample_indices(
        n, _sae_train_count(sae_config, n), _sample_seed(sae_config.seed, _SAE_STREAM)
    )
    model = train_sae_distributed(feats[sae_idx], sae_config, num_workers=1, progress=False)
    model = sae_from_files(_sae_to_files(model, sae_config))  # the same round trip the shards see
    timings["training_sae"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bs = opts.encode_batch_size
    parts = [encode(model, feats[s : s + bs], batch_size=bs) for s in range(0, n, bs)]
    codes = SparseCodes.concat(parts)
    counts = factor_counts(codes, model.units)
    p = factor_frequencies(counts, n)
    timings["encoding"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    raw_r, raw_d = score_codes(codes, p, score_config)
    labels = None
    if label_column:
        labels = np.asarray(table[label_column].to_numpy(), dtype=np.int64)
    r, d = rank_normalize(raw_r), rank_normalize(raw_d)
    timings["scoring"] = time.perf_counter() - t0
    return SingleProcessScores(r, d, labels, codes, counts, p, timings)


def _take(values: Any, idx: np.ndarray) -> Any:
    if isinstance(values, np.ndarray):
        return values[idx]
    return [values[int(i)] for i in idx]


def _fingerprint(
    plan: ShardPlan,
    feature_spec: FeatureSpec,
    label_column: str | None,
    sae_config: SAEConfig,
    score_config: ScoreConfig,
    opts: PipelineOptions,
) -> str:
    doc = {
        "uri": plan.uri,
        "files": list(plan.files),
        "row_groups": [list(r) for r in plan.row_group_rows],
        "feature": dataclasses.asdict(feature_spec),
        "label": label_column,
        "sae": {k: v for k, v in dataclasses.asdict(sae_config).items() if k != "device"},
        "score": dataclasses.asdict(score_config),
        "fit_samples": opts.extractor_fit_samples,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _error_message(exc: BaseException) -> str:
    """The user-facing message of an exception, unwrapping Ray's task errors."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        return _error_message(cause)
    if isinstance(exc, ScoringError):
        return exc.message
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, ValueError) else text


class _Progress:
    """Reports (phase, done, total) to the callback and a tqdm bar per phase."""

    def __init__(self, on_progress: ProgressFn | None, bar: bool) -> None:
        self.on_progress = on_progress
        self.bar_enabled = bar
        self._bar: Any = None
        self._phase: str | None = None

    def __call__(self, phase: str, done: int, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress(phase, done, total)
        if not self.bar_enabled or phase == "ready":
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


def _wait_all(refs: Sequence[Any], weights: Sequence[int], report: Callable[[int], None]) -> list:
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


class _State:
    """``pipeline.json``: fingerprint, shard boundaries, phases done, failure."""

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


def _reset_outputs(storage: Storage) -> None:
    for rel in ("features", SAE_DIR, "shards", FACTORS_FILE):
        storage.delete(rel)


def _cluster_resources() -> tuple[float, float]:
    import ray

    res = ray.cluster_resources()
    return float(res.get("CPU", 1.0)), float(res.get("GPU", 0.0))


def run_scoring(
    job_storage: Storage,
    dataset_uri: str,
    feature_spec: FeatureSpec,
    label_column: str | None,
    sae_config: SAEConfig,
    score_config: ScoreConfig,
    *,
    num_shards: int | None = None,
    on_progress: ProgressFn | None = None,
    progress_bar: bool = True,
    allowed_roots: Sequence[str] | None = None,
    options: PipelineOptions | None = None,
) -> ScoringResult:
    """Score a Parquet dataset on the connected Ray cluster (``ray.init`` done by the caller).

    Parameters
    ----------
    job_storage: the job's storage root; outputs go below it and make reruns resume.
    dataset_uri: Parquet file or directory (local path or pyarrow filesystem URI).
    feature_spec, label_column: how rows become features; the class-label column or None.
    sae_config, score_config: the SAE and the R/D forms.
    num_shards: S; None: the stored plan's S on a rerun, else a few per GPU/CPU of the cluster.
    on_progress: called as ``on_progress(phase, done, total)``.
    progress_bar: show a tqdm bar per phase.
    allowed_roots: when given, the URI must lie under one of them.
    options: `PipelineOptions`.

    Returns
    -------
    `ScoringResult` with the live shard actors (kill them with ``shutdown()``).

    Raises
    ------
    ScoringError: bad input (missing path, non-Parquet file, missing/ragged column, empty
        dataset, URI outside the allowed roots) or any failure that retries did not fix;
        ``pipeline.json`` then records ``{"failed": {"phase", "error"}}``.
    """
    import ray

    opts = options or PipelineOptions()
    state = _State(job_storage)
    progress = _Progress(on_progress, progress_bar)
    phase = "pending"
    actors: list[Any] = []
    timings: dict[str, float] = {}
    try:
        if not ray.is_initialized():
            raise ValueError("Ray is not initialized: call ray.init() before run_scoring")
        cpus, gpus = _cluster_resources()
        use_gpu = gpus > 0 if opts.use_gpu is None else opts.use_gpu
        if num_shards is None and state.doc.get("num_shards"):
            num_shards = int(state.doc["num_shards"])
        columns = [feature_spec.column] + ([label_column] if label_column else [])
        plan = plan_shards(
            dataset_uri,
            num_shards,
            columns=columns,
            allowed_roots=allowed_roots,
            num_cpus=cpus,
            num_gpus=gpus if use_gpu else 0.0,
        )
        n = plan.num_rows
        fp = _fingerprint(plan, feature_spec, label_column, sae_config, score_config, opts)
        if state.doc.get("fingerprint") != fp or state.doc.get("boundaries") != plan.boundaries():
            _reset_outputs(job_storage)
            state.doc = {"fingerprint": fp, "boundaries": plan.boundaries(), "phases_done": []}
        state.doc.update(num_shards=plan.num_shards, num_samples=n, failed=None)
        state.save()

        actor_cls = remote_shard_actor(
            use_gpu=use_gpu,
            num_cpus=opts.cpus_per_shard,
            max_restarts=opts.max_restarts,
            max_task_retries=opts.max_task_retries,
        )
        shard_config = ShardConfig(
            feature=feature_spec,
            label_column=label_column,
            encode_batch_size=opts.encode_batch_size,
            device="cuda" if use_gpu else "cpu",
            encode_pause_s=opts.encode_pause_s,
        )
        actors = [
            actor_cls.options(**_actor_name(opts, spec.shard_id)).remote(
                spec, job_storage, shard_config
            )
            for spec in plan.shards
        ]
        sizes = [s.num_rows for s in plan.shards]

        # --- featurizing --------------------------------------------------------------------
        phase = "featurizing"
        t0 = time.perf_counter()
        if job_storage.exists(EXTRACTOR_FILE):
            extractor_state = job_storage.read_npz(EXTRACTOR_FILE)
        else:
            fit_idx = _gather_indices(
                actors, opts.extractor_fit_samples, _sample_seed(sae_config.seed, _FIT_STREAM)
            )
            per_shard = zip(actors, _split(fit_idx, plan), strict=True)
            sample = concat_values(ray.get([a.take_raw.remote(ix) for a, ix in per_shard]))
            extractor_state = _fit_extractor(feature_spec, sample)
            job_storage.write_npz(EXTRACTOR_FILE, **extractor_state)
        state_ref = ray.put(extractor_state)
        _wait_all(
            [a.featurize.remote(state_ref) for a in actors],
            sizes,
            lambda done: progress("featurizing", done, n),
        )
        timings["featurizing"] = time.perf_counter() - t0
        state.done(phase)

        # --- training_sae -------------------------------------------------------------------
        phase = "training_sae"
        t0 = time.perf_counter()
        progress("training_sae", 0, 1)
        if all(job_storage.exists(f"{SAE_DIR}/{name}") for name in SAE_FILES):
            sae_files = {name: job_storage.read_bytes(f"{SAE_DIR}/{name}") for name in SAE_FILES}
        else:
            sae_idx = _gather_indices(
                actors, _sae_train_count(sae_config, n), _sample_seed(sae_config.seed, _SAE_STREAM)
            )
            per_shard = zip(actors, _split(sae_idx, plan), strict=True)
            feats = np.concatenate(ray.get([a.take_features.remote(ix) for a, ix in per_shard]))
            model = train_sae_distributed(
                feats,
                sae_config,
                num_workers=opts.sae_workers,
                use_gpu=use_gpu,
                cpus_per_worker=opts.sae_cpus_per_worker,
                progress=False,
            )
            sae_files = _sae_to_files(model, sae_config)
            # the weights first, the config last: sae.json existing means the SAE is complete.
            for name in SAE_FILES:
                job_storage.write_bytes(f"{SAE_DIR}/{name}", sae_files[name])
        progress("training_sae", 1, 1)
        timings["training_sae"] = time.perf_counter() - t0
        state.done(phase)

        # --- encoding -----------------------------------------------------------------------
        phase = "encoding"
        t0 = time.perf_counter()
        sae_ref = ray.put(sae_files)
        shard_counts = _wait_all(
            [a.encode.remote(sae_ref) for a in actors],
            sizes,
            lambda done: progress("encoding", done, n),
        )
        counts = np.sum(np.stack(shard_counts), axis=0).astype(np.int64)  # (M,)
        p = np.asarray(factor_frequencies(counts, n), dtype=np.float64)
        job_storage.write_npy(FACTORS_FILE, p)
        timings["encoding"] = time.perf_counter() - t0
        state.done(phase)

        # --- scoring ------------------------------------------------------------------------
        phase = "scoring"
        t0 = time.perf_counter()
        progress("scoring", 0, n)
        p_ref = ray.put(p)
        sorted_refs = [
            a.compute_scores.options(num_returns=2).remote(p_ref, score_config) for a in actors
        ]
        r_refs = [r for r, _ in sorted_refs]
        d_refs = [d for _, d in sorted_refs]
        _wait_all(
            [a.finalize_scores_refs.remote(n, len(actors), *r_refs, *d_refs) for a in actors],
            sizes,
            lambda done: progress("scoring", done, n),
        )
        timings["scoring"] = time.perf_counter() - t0
        state.done(phase)
        progress("ready", n, n)
        state.done("ready")
    except Exception as exc:
        message = _error_message(exc)
        state.doc["failed"] = {"phase": phase, "error": message}
        with contextlib.suppress(Exception):  # the original error matters more
            state.save()
        for a in actors:
            ray.kill(a, no_restart=True)
        raise ScoringError(message, phase) from exc
    finally:
        progress.close()
    return ScoringResult(plan, actors, n, p, counts, timings)


def _actor_name(opts: PipelineOptions, shard_id: int) -> dict[str, str]:
    if opts.actor_name_prefix is None:
        return {}
    return {"name": f"{opts.actor_name_prefix}-{shard_id:05d}"}


def _gather_indices(actors: Sequence[Any], count: int, seed: int) -> np.ndarray:
    """Sorted global indices of the ``count`` rows with the smallest keys over all shards."""
    import ray

    parts = ray.get([a.sample_keys.remote(count, seed) for a in actors])
    keys = np.concatenate([k for k, _ in parts])
    idx = np.concatenate([i for _, i in parts])
    if count < keys.shape[0]:
        keep = np.argpartition(keys, count - 1)[:count]
        idx = idx[keep]
    return np.sort(idx)


def _split(global_idx: np.ndarray, plan: ShardPlan) -> list[np.ndarray]:
    """Sorted global indices split by shard (one array per shard, in shard order)."""
    cuts = np.searchsorted(global_idx, plan.boundaries()[1:-1])
    return np.split(global_idx, cuts)
