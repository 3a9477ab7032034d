"""Training benchmark: accuracy against samples processed for every selection policy.

Trains a model per (task, policy, variant, ratio, seed) with a plain PyTorch loop whose indices
come from the selection service, and appends one JSON line per run to a results file keyed by the
run's key, so an interrupted sweep resumes where it stopped.

    # through a running service (the numbers in docs/benchmarks_train.md):
    saelect serve --port 8000 --store results/store &
    python benchmarks/train_bench.py --task fmnist --via http --url http://127.0.0.1:8000
    # in-process engine (no Ray, no HTTP; the same policies and engine):
    python benchmarks/train_bench.py --task digits --via inprocess --quick

Protocol (issue 5): every run has the task's epochs E and the same LR schedule shape (warm-up +
cosine over the steps the run takes, computed from the plan). ``full_fewer`` at ratio r is full
data for round(r E) epochs with its own complete schedule: the same sample budget as a selection
policy at ratio r. Samples processed are reported as a share of full data, sum of epoch sizes /
(N E). Scoring is one-time per (data, features, SAE, score forms) and has its own line.

Records (``kind``): ``run`` (one training run), ``scoring`` (one-time scoring cost and the
Spearman correlation of R and D), ``env`` (machine, threads, torch version).

The pieces live in modules of their own: tasks (``benchmarks/train_tasks.py``), bench policies
and ``factor`` variants (``benchmarks/train_variants.py``), runs and the results file
(``benchmarks/train_runs.py``), selectors (``benchmarks/train_selectors.py``) and one run
(``benchmarks/train_runner.py``); this file is the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.train_data import load_task
from benchmarks.train_runner import run_one, scoring_record
from benchmarks.train_runs import append_record, done_keys, plan_runs, read_results
from benchmarks.train_selectors import HttpSelector, InProcessSelector, start_service
from benchmarks.train_tasks import TASKS
from benchmarks.train_variants import POLICIES, VARIANT_GROUPS, VARIANTS, expand_variants

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "results" / "train.jsonl"


def _csv(kind: type) -> Any:
    def parse(s: str) -> list:
        return [kind(x) for x in s.split(",") if x.strip()]

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=sorted(TASKS), default="fmnist")
    ap.add_argument("--policies", type=_csv(str), default=list(POLICIES))
    ap.add_argument("--ratios", type=_csv(float), default=[0.1, 0.2, 0.3, 0.5, 0.7])
    ap.add_argument("--seeds", type=_csv(int), default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="override the task's E")
    ap.add_argument(
        "--variants",
        type=_csv(str),
        default=["default"],
        help=f"factor variants or groups {sorted(VARIANT_GROUPS)}; presets: {sorted(VARIANTS)}",
    )
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 epochs, 1 seed, r=0.3")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--data-root", type=Path, default=REPO / "results" / "data")
    ap.add_argument("--via", choices=["http", "inprocess"], default="http")
    ap.add_argument(
        "--url",
        default=None,
        help="service URL; with --via http and no URL, "
        "the bench starts `saelect serve` on --port with --store",
    )
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--store", type=Path, default=REPO / "results" / "store")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--limit", type=int, default=None, help="stop after this many new runs")
    ap.add_argument("--dry-run", action="store_true", help="print the run list and exit")
    return ap


QUICK: dict[str, Any] = {
    "epochs": 2,
    "seeds": [0],
    "ratios": [0.3],
    "policies": ["full", "full_fewer", "rs2", "infobatch", "factor"],
    "sae": {"units": 128, "k": 8, "epochs": 5},
}
"""``--quick``: a smoke test of every code path (a small SAE, 2 epochs, one ratio and seed)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep; returns 0 when every planned run is recorded."""
    args = build_parser().parse_args(argv)
    task = TASKS[args.task]
    if args.quick:
        args.epochs = args.epochs or QUICK["epochs"]
        args.seeds, args.ratios = QUICK["seeds"], QUICK["ratios"]
        if args.policies == list(POLICIES):
            args.policies = QUICK["policies"]
        task = dataclasses.replace(task, sae={**task.sae, **QUICK["sae"]})
        if args.out == DEFAULT_OUT:  # never mix smoke-test rows into the real results
            args.out = DEFAULT_OUT.with_name("train_quick.jsonl")
    epochs = args.epochs or task.epochs
    if args.epochs:
        task = dataclasses.replace(task, epochs=epochs)
    for p in args.policies:
        if p not in POLICIES:
            raise SystemExit(f"unknown policy {p!r}; known: {', '.join(POLICIES)}")
    variants = expand_variants(args.variants)
    runs = plan_runs(
        task.name,
        policies=args.policies,
        ratios=args.ratios,
        seeds=args.seeds,
        epochs=epochs,
        variants=variants,
    )
    done = done_keys(args.out)
    todo = [r for r in runs if r.key not in done]
    print(f"{len(runs)} runs planned, {len(runs) - len(todo)} already in {args.out}", flush=True)
    if args.dry_run:
        for r in todo:
            print(r.key)
        return 0
    if not todo:
        return 0
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = load_task(task.data, args.data_root, **task.data_args)
    server = None
    if args.via == "inprocess":
        selector: Any = InProcessSelector(args.data_root / "cache")
    else:
        url = args.url
        if url is None:
            server = start_service(args.store, args.port, args.data_root.resolve())
            url = f"http://127.0.0.1:{args.port}"
        selector = HttpSelector(url, token=os.environ.get("SAELECT_API_TOKEN"))
    append_record(
        args.out,
        {
            "kind": "env",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "task": task.name,
            "via": args.via,
            "machine": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "argv": list(argv) if argv is not None else sys.argv[1:],
        },
    )
    scored_keys = {r["key"] for r in read_results(args.out) if r.get("kind") == "scoring"}
    anchor = None
    if args.via == "http":
        # The service drops a shared scoring when its last job is deleted; one idle job with the
        # sweep's default data, feature and SAE spec keeps it for every run that deletes its own.
        spec = todo[0].job_spec(task, data)
        spec["name"] = f"{task.name}-scoring-anchor"
        spec["policy"] = {"name": "full", "ratio": 1.0, "epochs": 1, "seed": 0, "params": {}}
        spec.pop("scores", None)
        anchor = selector.create_job(spec)["id"]
    try:
        for i, run in enumerate(todo):
            if args.limit is not None and i >= args.limit:
                break
            rec = run_one(run, task, data, selector, via=args.via, threads=args.threads)
            if rec["scoring_key"] and "scoring|" + rec["scoring_key"] not in scored_keys:
                spec = run.job_spec(task, data)
                append_record(
                    args.out,
                    scoring_record(
                        selector, spec, args.via, rec["job_s"], args.data_root / "cache"
                    ),
                )
                scored_keys.add("scoring|" + rec["scoring_key"])
            append_record(args.out, rec)
            print(
                f"[{i + 1}/{len(todo)}] {run.key}: final {rec['final_acc']:.4f} "
                f"best {rec['best_acc']:.4f} samples {rec['sample_fraction']:.3f} "
                f"train {rec['train_s']:.1f}s select {rec['select_s']:.3f}s",
                flush=True,
            )
    finally:
        if anchor is not None:
            selector.delete(anchor)
        selector.close()
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
