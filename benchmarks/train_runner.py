"""One training run of the benchmark: create the job, train through it, build the record.

``run_one`` is what ``benchmarks/train_bench.py`` calls per ``RunSpec``; ``scoring_record`` is the
one-time scoring line of a scoring key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.train_data import TaskData
from benchmarks.train_loop import derive_seed, train
from benchmarks.train_models import make_model
from benchmarks.train_runs import RunSpec
from benchmarks.train_selectors import (
    InProcessSelector,
    score_in_process,
    scoring_key,
    spearman,
)
from benchmarks.train_tasks import TaskSpec
from benchmarks.train_variants import FACTOR_POLICIES, FEEDBACK_POLICIES, SCORED_POLICIES


def _diagnostics(
    stats: list[dict[str, Any]], served: list[np.ndarray], labels: np.ndarray, n: int
) -> dict[str, Any]:
    """Per-epoch diagnostics of a run from the service's stats and the served indices."""
    usage = np.zeros(n, dtype=np.int64)
    per_epoch = []
    num_classes = int(labels.max()) + 1
    for st, idx in zip(stats, served, strict=True):
        np.add.at(usage, idx, 1)
        cls = np.bincount(labels[idx], minlength=num_classes)
        per_epoch.append(
            {
                "epoch": st.get("epoch"),
                "lambda": st.get("lambda"),
                "mean_R": st.get("mean_R"),
                "mean_D": st.get("mean_D"),
                "penalty_share": st.get("penalty_share"),
                "factor_coverage": st.get("factor_coverage"),
                "coverage": float(np.mean(usage > 0)),
                "usage_std": float(usage.std()),
                "usage_max": int(usage.max()),
                "class_share": (cls / max(int(cls.sum()), 1)).round(4).tolist(),
            }
        )
    return {"epochs": per_epoch}


def run_one(
    run: RunSpec,
    task: TaskSpec,
    data: TaskData,
    selector: Any,
    *,
    via: str,
    threads: int,
) -> dict[str, Any]:
    """Create the run's job, train through it, and return the run record."""
    spec = run.job_spec(task, data)
    t0 = time.perf_counter()
    job_id = selector.create_job(spec)["id"]
    selector.wait_ready(job_id, timeout=3600.0)
    job_s = time.perf_counter() - t0
    x_train = data.x_train
    input_shape = tuple(x_train.shape[1:])
    model = make_model(
        task.model, input_shape, data.num_classes, seed=derive_seed(run.seed, "init")
    )
    if task.model.kind == "cnn":
        model = model.to(memory_format=torch.channels_last)
    stats: list[dict[str, Any]] = []
    want_stats = run.policy in FACTOR_POLICIES or run.policy.startswith("rs2")

    def on_epoch(epoch: int, idx: np.ndarray) -> None:
        if want_stats:
            stats.append(selector.stats(job_id, epoch))

    t_run = time.perf_counter()
    res = train(
        model=model,
        x_train=x_train,
        y_train=data.y_train,
        x_test=data.x_test,
        y_test=data.y_test,
        selector=selector,
        job=job_id,
        epochs=run.job_epochs,
        optim=task.optim,
        augment=task.augment,
        seed=run.seed,
        send_feedback=run.policy in FEEDBACK_POLICIES,
        on_epoch=on_epoch,
        eval_every=task.eval_every,
    )
    wall_s = time.perf_counter() - t_run
    if run.policy not in FEEDBACK_POLICIES and res.total_steps != res.planned_steps:
        raise RuntimeError(
            f"{run.key}: took {res.total_steps} steps, plan said {res.planned_steps}"
        )
    selector.delete(job_id)
    n = data.num_samples
    samples = int(sum(res.epoch_sizes))
    record: dict[str, Any] = {
        "kind": "run",
        "key": run.key,
        **dataclasses.asdict(run),
        "job_epochs": run.job_epochs,
        "params": spec["policy"]["params"],
        "spec_sae": spec["sae"],
        "spec_feature": spec["dataset"]["feature"],
        "spec_scores": spec.get("scores", {}),
        # The service scores every job (jobs with equal data, feature, SAE and score specs share
        # one scoring); in-process only factor policies score.
        "scoring_key": scoring_key(spec)
        if via == "http" or run.policy in SCORED_POLICIES
        else None,
        "via": via,
        "loss_weights": run.policy in FEEDBACK_POLICIES,
        "final_acc": res.acc_curve[-1],
        "best_acc": max(res.acc_curve),
        "acc_curve": res.acc_curve,
        "eval_epochs": res.eval_epochs,
        "epoch_sizes": res.epoch_sizes,
        "served_digest": [
            hashlib.blake2b(
                np.ascontiguousarray(i, dtype="<i8").tobytes(), digest_size=6
            ).hexdigest()
            for i in res.served
        ],
        "samples": samples,
        "sample_fraction": samples / (n * run.epochs),
        "steps": res.total_steps,
        "planned_steps": res.planned_steps,
        "train_s": round(res.train_s, 3),
        "select_s": round(res.select_s, 4),
        "eval_s": round(res.eval_s, 3),
        "wall_s": round(wall_s, 3),
        "job_s": round(job_s, 3),
        "threads": threads,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if data.meta:
        from benchmarks.train_regimes import regime_metrics

        record["regime"] = regime_metrics(model, data, res.served, run.epochs)
    if stats:
        labels = data.y_train.numpy()
        record["diagnostics"] = _diagnostics(stats, res.served, labels, n)
        prior = np.bincount(labels) / n
        record["class_prior"] = prior.round(4).tolist()
    return record


def scoring_record(
    selector: Any, spec: dict[str, Any], via: str, job_s: float, cache_dir: Path | None = None
) -> dict[str, Any]:
    """The one-time scoring line of a scoring key.

    In-process: the measured scoring time and the Spearman correlation of R and D. Via HTTP: the
    first job's create-to-ready time (it paid the shared scoring), and the R-D correlation from
    the in-process scoring cache when one exists (the same scores: both use the pipeline).
    """
    rec: dict[str, Any] = {
        "kind": "scoring",
        "key": "scoring|" + scoring_key(spec),
        "task_uri": spec["dataset"]["uri"],
        "feature": spec["dataset"]["feature"],
        "sae": spec["sae"],
        "scores": spec.get("scores", {}),
        "via": via,
        "job_ready_s": round(job_s, 3),
    }
    if isinstance(selector, InProcessSelector):
        sc = selector.scored(spec)
        rec.update(
            scoring_s=round(sc.scoring_s, 3),
            spearman_RD=spearman(sc.R, sc.D),
            dead_share=sc.dead_share,
            num_samples=int(sc.R.shape[0]),
        )
    else:
        rec["scoring_s"] = round(job_s, 3)
        cached = None if cache_dir is None else cache_dir / f"scores_{scoring_key(spec)}.npz"
        if cached is not None and cached.exists():
            sc = score_in_process(spec, cache_dir)
            rec.update(spearman_RD=spearman(sc.R, sc.D), dead_share=sc.dead_share)
    return rec
