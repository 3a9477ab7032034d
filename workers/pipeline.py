"""The scoring pipeline on Ray: dataset -> features -> SAE -> codes -> p -> R and D.

`run_scoring` scores one dataset with Ray tasks that reserve GPUs or CPUs only while they run
(docs/architecture.md, "Ray scoring"):

0. **queued**: the run's workers (`workers.admission.ScoringResources`: a GPU each, or CPUs) are
   reserved as one placement group; while the cluster cannot place it, ``on_wait(reason)`` says
   what the run waits for, and past ``placement_timeout_s`` the run fails naming the resource;
1. **featurizing**: `plan_shards` cuts the Parquet data into S contiguous ranges; the extractor
   is fitted once on a global sample (rows with the smallest counter-based keys, the same for
   any S), in a task;
2. **training_sae**: the shards featurize the SAE's training sample, one task trains the SAE;
3. **encoding**: one task per shard reads its rows, featurizes and encodes them batch by batch
   (features are never stored), and stores codes, labels and factor counts; the counts are
   summed into p;
4. **scoring**: per shard raw R and D; exact global ranks by a sample sort
   (`workers.ranks`: O(N / S) values per task), stored as ``scores.npz``.

When the run ends, the placement group is removed: a scored job holds no CPU or GPU. The
selection state of a ready job lives in `workers.selection_state` actors, which reserve none.

Outputs persist below the job storage; a rerun skips every output that exists (a killed task is
retried by Ray and redoes only its unfinished shard), and a fully scored storage is re-attached
without reserving anything. A failure that retries do not fix raises `ScoringError` and
``pipeline.json`` records it.

The phases, options, result and error are in :mod:`workers.pipeline_types`; the run's
``pipeline.json``, progress reporting and error messages in :mod:`workers.pipeline_state`.

Example
-------
>>> result = run_scoring(Storage("/tmp/job"), "/data/train.parquet",           # doctest: +SKIP
...                      FeatureSpec("pixels", "image", dim=64), "label",
...                      SAEConfig(units=512, k=16), ScoreConfig())
>>> r, d = result.scores()                                                       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from saelect.workers import ranks, scoring_steps
from saelect.workers import scoring_tasks as tasks
from saelect.workers.admission import Reservation, ScoringResources, plan_request, reserve
from saelect.workers.factors import factor_frequencies
from saelect.workers.features import FeatureSpec
from saelect.workers.pipeline_state import (
    PipelineState,
    RunProgress,
    all_scored,
    default_reservation_name,
    error_message,
    global_counts,
    reset_outputs,
    split_by_shard,
    wait_all,
)
from saelect.workers.pipeline_types import (
    PipelineOptions,
    ProgressFn,
    ScoringError,
    ScoringResult,
    WaitFn,
)
from saelect.workers.sae import SAEConfig
from saelect.workers.scores import ScoreConfig
from saelect.workers.shard_plan import plan_shards
from saelect.workers.shard_scoring import (
    EXTRACTOR_FILE,
    FACTORS_FILE,
    SAE_DIR,
    SAE_FILES,
    ShardConfig,
)
from saelect.workers.storage import Storage

__all__ = ["run_scoring"]


def run_scoring(
    job_storage: Storage,
    dataset_uri: str,
    feature_spec: FeatureSpec,
    label_column: str | None,
    sae_config: SAEConfig,
    score_config: ScoreConfig,
    *,
    num_shards: int | None = None,
    resources: ScoringResources | None = None,
    on_progress: ProgressFn | None = None,
    on_wait: WaitFn | None = None,
    progress_bar: bool = True,
    allowed_roots: Sequence[str] | None = None,
    options: PipelineOptions | None = None,
    reservation_name: str | None = None,
) -> ScoringResult:
    """Score a Parquet dataset on the connected Ray cluster (``ray.init`` done by the caller).

    Parameters
    ----------
    job_storage: the scoring's storage root; outputs go below it and make reruns resume.
    dataset_uri: Parquet file or directory (local path or pyarrow filesystem URI).
    feature_spec, label_column: how rows become features; the class-label column or None.
    sae_config, score_config: the SAE and the R/D forms.
    num_shards: S; None: the stored plan's S on a rerun, else two per scoring GPU (or CPU).
    resources: what the scoring may reserve and how long it may wait for it.
    on_progress: called as ``on_progress(phase, done, total)``.
    on_wait: called with the reason while the run waits for resources, None once placed.
    progress_bar: show a tqdm bar per phase.
    allowed_roots: when given, the URI must lie under one of them.
    options: `PipelineOptions`.
    reservation_name: the placement group's name (default from the storage path).

    Returns
    -------
    `ScoringResult`: plan, N, p and the stored outputs; no Ray resource stays held.

    Raises
    ------
    ScoringError: bad input (missing path, non-Parquet file, missing/ragged column, empty
        dataset, URI outside the allowed roots), resources not placed in time (phase
        ``queued``, the message names the resource), or any failure that retries did not fix;
        ``pipeline.json`` then records ``{"failed": {"phase", "error"}}``.
    """
    import ray

    opts = options or PipelineOptions()
    res = resources or ScoringResources()
    state = PipelineState(job_storage)
    progress = RunProgress(on_progress, progress_bar)
    phase = "pending"
    reservation: Reservation | None = None
    timings: dict[str, float] = {}
    try:
        if not ray.is_initialized():
            raise ValueError("Ray is not initialized: call ray.init() before run_scoring")
        cluster = ray.cluster_resources()
        gpus = float(cluster.get("GPU", 0.0)) if res.gpus is None else float(res.gpus)
        if num_shards is None and state.doc.get("num_shards"):
            num_shards = int(state.doc["num_shards"])
        columns = [feature_spec.column] + ([label_column] if label_column else [])
        plan = plan_shards(
            dataset_uri,
            num_shards,
            columns=columns,
            allowed_roots=allowed_roots,
            num_cpus=float(cluster.get("CPU", 1.0)),
            num_gpus=gpus,
        )
        n = plan.num_rows
        fp = scoring_steps.fingerprint(
            plan, feature_spec, label_column, sae_config, score_config, opts.extractor_fit_samples
        )
        if state.doc.get("fingerprint") != fp or state.doc.get("boundaries") != plan.boundaries():
            reset_outputs(job_storage)
            state.doc = {"fingerprint": fp, "boundaries": plan.boundaries(), "phases_done": []}
        state.doc.update(num_shards=plan.num_shards, num_samples=n, failed=None)
        state.save()

        if state.is_done("ready") and all_scored(job_storage, plan):  # re-attach, reserve nothing
            counts = global_counts(job_storage, plan)
            p = job_storage.read_npy(FACTORS_FILE)
            progress("ready", n, n)
            return ScoringResult(plan, job_storage, n, p, counts, timings)

        # --- queued: reserve the run's workers --------------------------------------------
        phase = "queued"
        t0 = time.perf_counter()
        request = plan_request(res, cluster, plan.num_shards)
        progress("queued", 0, request.workers)
        reservation = reserve(
            request,
            name=reservation_name or default_reservation_name(job_storage),
            timeout_s=res.placement_timeout_s,
            on_wait=on_wait,
            poll_s=opts.poll_s,
        )
        timings["queued"] = time.perf_counter() - t0
        state.doc["resources"] = request.total()
        retries = opts.max_task_retries
        use_gpu = request.gpus > 0

        def task(fn: Callable[..., Any], *, gpu: bool = False, **kw: Any) -> Any:
            """``fn`` as a task in the reservation; ``bundle=i`` pins shard i's tasks."""
            assert reservation is not None
            return tasks.remote(fn, reservation, retries, gpu=gpu and use_gpu, **kw)

        sizes = [s.num_rows for s in plan.shards]

        # --- featurizing: fit the extractor on a global sample -----------------------------
        phase = "featurizing"
        t0 = time.perf_counter()
        fit_count = min(opts.extractor_fit_samples, n)
        progress("featurizing", 0, fit_count)
        if job_storage.exists(EXTRACTOR_FILE):
            extractor_state = job_storage.read_npz(EXTRACTOR_FILE)
        else:
            seed = scoring_steps.sample_seed(sae_config.seed, scoring_steps.FIT_STREAM)
            fit_idx = scoring_steps.sample_indices(n, fit_count, seed)
            raw = [
                task(tasks.take_raw, bundle=spec.shard_id).remote(spec, feature_spec, ix)
                for spec, ix in zip(plan.shards, split_by_shard(fit_idx, plan), strict=True)
            ]
            extractor_state = ray.get(
                task(tasks.fit_extractor, gpu=True).remote(feature_spec, *raw)
            )
            job_storage.write_npz(EXTRACTOR_FILE, **extractor_state)
        progress("featurizing", fit_count, fit_count)
        timings["featurizing"] = time.perf_counter() - t0
        state.done(phase)

        # --- training_sae -----------------------------------------------------------------
        phase = "training_sae"
        t0 = time.perf_counter()
        progress("training_sae", 0, 1)
        if all(job_storage.exists(f"{SAE_DIR}/{name}") for name in SAE_FILES):
            sae_files = {name: job_storage.read_bytes(f"{SAE_DIR}/{name}") for name in SAE_FILES}
        else:
            state_ref = ray.put(extractor_state)
            seed = scoring_steps.sample_seed(sae_config.seed, scoring_steps.SAE_STREAM)
            sae_idx = scoring_steps.sample_indices(
                n, scoring_steps.sae_train_count(sae_config, n), seed
            )
            feats = [
                task(tasks.sample_features, gpu=True, bundle=spec.shard_id).remote(
                    spec, feature_spec, state_ref, ix
                )
                for spec, ix in zip(plan.shards, split_by_shard(sae_idx, plan), strict=True)
            ]
            if opts.sae_workers > 1:
                from saelect.workers.sae_train import train_sae_distributed

                parts = [f for f in ray.get(feats) if f.shape[0]]
                model = train_sae_distributed(
                    np.concatenate(parts),
                    sae_config,
                    num_workers=opts.sae_workers,
                    use_gpu=use_gpu,
                    cpus_per_worker=opts.sae_cpus_per_worker,
                    progress=False,
                )
                sae_files = scoring_steps.sae_to_files(model, sae_config)
            else:
                # every CPU the run reserved: the SAE trains alone (the samples are in, encoding
                # has not started), so the other bundles' CPUs are idle; never more than reserved
                # (OpenMP threads beyond them spin against other work: 10-80x slower measured on 2
                # busy cores)
                threads = max(1, int(request.cpus * request.workers))
                sae_files = ray.get(
                    task(tasks.train_sae, gpu=True, bundle=0).remote(sae_config, threads, *feats)
                )
            # the weights first, the config last: sae.json existing means the SAE is complete
            for name in SAE_FILES:
                job_storage.write_bytes(f"{SAE_DIR}/{name}", sae_files[name])
        progress("training_sae", 1, 1)
        timings["training_sae"] = time.perf_counter() - t0
        state.done(phase)

        # --- encoding: featurize + encode every shard, batch by batch ----------------------
        phase = "encoding"
        t0 = time.perf_counter()
        shard_config = ShardConfig(
            feature=feature_spec,
            label_column=label_column,
            encode_batch_size=opts.encode_batch_size,
            encode_pause_s=opts.encode_pause_s,
        )
        state_ref, sae_ref = ray.put(extractor_state), ray.put(sae_files)
        shard_counts = wait_all(
            [
                task(tasks.encode, gpu=True, bundle=spec.shard_id).remote(
                    spec, job_storage, shard_config, state_ref, sae_ref
                )
                for spec in plan.shards
            ],
            sizes,
            lambda done: progress("encoding", done, n),
        )
        counts = np.sum(np.stack(shard_counts), axis=0).astype(np.int64)  # (M,)
        p = np.asarray(factor_frequencies(counts, n), dtype=np.float64)
        job_storage.write_npy(FACTORS_FILE, p)
        records = ScoringResult(plan, job_storage, n, p, counts).encoding_records()
        state.doc["encoding"] = {
            "attempts": [int(r.get("attempt", 0)) for r in records],
            "interrupted_at": [list(r.get("interrupted", [])) for r in records],
            "nodes": sorted({str(r["node_id"]) for r in records if r.get("node_id")}),
            "devices": sorted({str(r["device"]) for r in records if r.get("device")}),
        }
        timings["encoding"] = time.perf_counter() - t0
        state.done(phase)

        # --- scoring: raw R, D, then exact global ranks by a sample sort --------------------
        phase = "scoring"
        t0 = time.perf_counter()
        progress("scoring", 0, n)
        p_ref = ray.put(p)
        S = plan.num_shards
        samples = ray.get(
            [
                task(tasks.raw_scores, bundle=s.shard_id).remote(
                    job_storage, s.shard_id, p_ref, score_config
                )
                for s in plan.shards
            ]
        )
        split_r = ranks.choose_splitters([r for r, _ in samples], S)
        split_d = ranks.choose_splitters([d for _, d in samples], S)
        br, bd = split_r.shape[0] + 1, split_d.shape[0] + 1
        cut = [
            task(tasks.split, num_returns=2 + br + bd, bundle=s.shard_id).remote(
                job_storage, s.shard_id, score_config, split_r, split_d
            )
            for s in plan.shards
        ]
        size_r = ray.get([c[0] for c in cut])
        size_d = ray.get([c[1] for c in cut])
        off_r, off_d = ranks.bucket_offsets(size_r), ranks.bucket_offsets(size_d)

        def ranked(first: int, num: int, offsets: np.ndarray) -> list[list[Any]]:
            """Per bucket: the S refs of its ranked parts (one per shard)."""
            out = []
            for b in range(num):
                refs = task(tasks.bucket, num_returns=S).remote(
                    int(offsets[b]), n, *[c[first + b] for c in cut]
                )
                out.append([refs] if S == 1 else list(refs))
            return out

        rank_r, rank_d = ranked(2, br, off_r), ranked(2 + br, bd, off_d)
        wait_all(
            [
                task(tasks.write_scores, bundle=s.shard_id).remote(
                    job_storage,
                    s.shard_id,
                    score_config,
                    br,
                    *[rank_r[b][i] for b in range(br)],
                    *[rank_d[b][i] for b in range(bd)],
                )
                for i, s in enumerate(plan.shards)
            ],
            sizes,
            lambda done: progress("scoring", done, n),
        )
        timings["scoring"] = time.perf_counter() - t0
        state.done(phase)
        progress("ready", n, n)
        state.done("ready")
        return ScoringResult(plan, job_storage, n, p, counts, timings, request.total())
    except Exception as exc:
        message = error_message(exc)
        state.doc["failed"] = {"phase": phase, "error": message}
        with contextlib.suppress(Exception):  # the original error matters more
            state.save()
        raise ScoringError(message, phase) from exc
    finally:
        if reservation is not None:
            reservation.release()
        progress.close()
