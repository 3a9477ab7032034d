"""Training tables on a GPU: Fashion-MNIST and its data regimes, a ResNet, policies against budget.

One prepared script for one device call (each preset fits a 10-minute limit on an H200):

- ``--preset main`` (default): the clean 60k table: full data, then for r = 0.1, 0.2, 0.3
  ``factor``, ``rs2`` and full data for round(r E) epochs; E = 30, width 64, one seed.
- ``--preset regimes``: the data regimes of issue 15 at full scale (``benchmarks/gpu_regimes.py``:
  60k rows with 30% label noise, the long tail with 6000 head images, 60k rows half of them
  near-duplicates), each with the policies its conclusion rests on, r = 0.2 and 0.3, E = 20,
  width 32, seeds 0 to 4 one after the other until ``--budget-s`` (450 s) is spent.

Per task: the rows built deterministically (seed 15) and loaded to the device once as uint8;
scoring once with the service's pure functions (pixels standardized and PCA'd to ``--pca-dim``,
TopK SAE fitted on the device, R and D: ``workers.scoring_local.score_single_process``); every
run's indices come epoch by epoch from the service's selection engine
(``service.selection.engine.SingleProcessSelector``) with the CPU bench's policy params
(``benchmarks.train_runs.RunSpec``); loss-based policies get each epoch's per-sample losses back.
Warm-up + cosine LR over the run's steps; ``full_fewer`` is the service's ``full`` for round(r E)
epochs. Augmentation (4-pixel crop, flip) runs on the device (``benchmarks/gpu_train_loop.py``).

Writes every run to JSON (``--out``, default ``$OUT/gpu_train.json``) as soon as it ends, and the
tables with the regime sweep's target check (``benchmarks/train_regimes_report.py``) to the same
name with ``.md``. ``--budget-s`` starts no scoring or run whose time, estimated from the runs so
far, would end past it. Checks its own results (``benchmarks/gpu_train_checks.py``, under
``"checks"``; exit 1 when one fails): each regime's shape, the scores, every run's epoch sizes,
samples and indices against the plan, finite figures, a replayed selection that matches, and
the full-data accuracy (``--min-full-acc``).

    python benchmarks/gpu_train.py --data-dir data/fashion-mnist                 # on the H200
    python benchmarks/gpu_train.py --data-dir data/fashion-mnist --preset regimes
    python benchmarks/gpu_train.py --device cpu --smoke --preset regimes          # CPU smoke
    python benchmarks/gpu_train.py --render gpu_train.json --write               # into docs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from saelect.service.policies import PolicyConfig, make_policy  # noqa: E402
from saelect.service.selection.engine import SingleProcessSelector  # noqa: E402
from saelect.workers.datasets import FMNIST_DIR, image_table, load_fashion_mnist  # noqa: E402
from saelect.workers.features import FeatureSpec  # noqa: E402
from saelect.workers.sae import SAEConfig  # noqa: E402
from saelect.workers.scores import ScoreConfig  # noqa: E402
from saelect.workers.shard_data import ShardData  # noqa: E402

from benchmarks import gpu_regimes as G  # noqa: E402
from benchmarks.gpu_checks import Checks  # noqa: E402
from benchmarks.gpu_train_checks import (  # noqa: E402
    check_regime,
    check_run,
    check_scores,
    expected_sizes,
    replay,
)
from benchmarks.gpu_train_loop import LoopConfig, train_run  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    "main": {
        "tasks": "fmnist", "epochs": 30, "ratios": "0.1,0.2,0.3", "seeds": "0", "width": 64,
        "label_smoothing": 0.1, "eval_every": 1, "budget_s": 500.0, "min_full_acc": 0.85,
    },
    "regimes": {
        "tasks": "fmnist-noisy,fmnist-lt,fmnist-dup", "epochs": 20, "ratios": "0.2,0.3",
        "seeds": "0,1,2,3,4", "width": 32, "label_smoothing": 0.0, "eval_every": 5,
        "budget_s": 450.0, "min_full_acc": 0.5,
    },
}  # fmt: skip
"""Settings per preset; an option given on the command line wins."""
BASE: dict[str, Any] = {
    "batch_size": 512, "lr": 0.2, "pca_dim": 256, "units": 2048, "k": 32, "sae_epochs": 10,
    "base_size": 60000, "head_size": 6000, "n_test": 10000,
}  # fmt: skip
"""Settings of every preset."""
SMOKE: dict[str, Any] = {
    "epochs": 2, "width": 8, "units": 64, "k": 4, "pca_dim": 16, "sae_epochs": 2,
    "batch_size": 128, "min_full_acc": 0.0, "base_size": 600, "head_size": 120,
    "eval_every": 1, "n_test": 200, "ratios": "0.5", "seeds": "0", "budget_s": 600.0,
}  # fmt: skip
"""``--smoke``: tiny sizes for a CPU check (600 rows, a 120-image head, 200 test rows, E = 2,
r = 0.5, one seed); an option given on the command line still wins."""


def score(train_images: np.ndarray, labels: np.ndarray, args: argparse.Namespace) -> ShardData:
    """R, D (and codes) with the service's pure scoring functions, the SAE on ``args.device``."""
    import pyarrow.parquet as pq
    from saelect.workers.scoring_local import score_single_process

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.parquet"
        pq.write_table(image_table(train_images, labels), path, row_group_size=8192)
        sc = score_single_process(
            str(path),
            FeatureSpec(kind="pixels", column="image", dim=args.pca_dim),
            "label",
            SAEConfig(
                units=args.units, k=args.k, epochs=args.sae_epochs, device=args.device, seed=0
            ),
            ScoreConfig(),
        )
    return sc.shard_data()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with the preset's and ``--smoke``'s settings filled in."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("FMNIST_DIR", str(FMNIST_DIR)))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", choices=sorted(PRESETS), default="main")
    p.add_argument("--tasks", help=f"comma-separated, of {', '.join(G.TASKS)}")
    p.add_argument("--epochs", type=int)
    p.add_argument("--ratios")
    p.add_argument("--policies", help="for every task (default: each task's own list)")
    p.add_argument("--seeds")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--width", type=int)
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--pca-dim", type=int)
    p.add_argument("--units", type=int)
    p.add_argument("--k", type=int)
    p.add_argument("--sae-epochs", type=int)
    p.add_argument("--base-size", type=int, help="rows of fmnist, -ref/dup/noisy")
    p.add_argument("--head-size", type=int, help="head class size of fmnist-lt")
    p.add_argument("--n-test", type=int)
    p.add_argument("--budget-s", type=float, help="start nothing estimated to end after this")
    p.add_argument("--smoke", action="store_true", help="tiny CPU check (see SMOKE)")
    p.add_argument("--min-full-acc", type=float, help="a full-data run's final accuracy floor")
    p.add_argument("--threads", type=int, help="torch threads (default: 1 on the CPU)")
    p.add_argument("--dry-run", action="store_true", help="print the runs and their samples")
    p.add_argument("--render", type=Path, help="print the markdown of this JSON and exit")
    p.add_argument("--write", action="store_true", help="with --render: into docs/")
    out_default = Path(os.environ["OUT"]) / "gpu_train.json" if "OUT" in os.environ else None
    p.add_argument("--out", default=str(out_default or "gpu_train.json"))
    args = p.parse_args(argv)
    layers = [SMOKE] if args.smoke else []
    for layer in [*layers, PRESETS[args.preset], BASE]:  # the command line wins, then these
        for key, value in layer.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    unknown = set(args.tasks.split(",")) - set(G.TASKS)
    if unknown:
        p.error(f"unknown tasks {sorted(unknown)}; known: {', '.join(G.TASKS)}")
    return args


class Runner:
    """Prepares tasks (rows, device tensors, scoring) once and runs (task, policy, r, seed)."""

    def __init__(self, args: argparse.Namespace, checks: Checks, report: dict[str, Any]) -> None:
        self.args, self.checks, self.report = args, checks, report
        self.dev = torch.device(args.device)
        tr = load_fashion_mnist(args.data_dir, "train")
        te = load_fashion_mnist(args.data_dir, "test")
        self.train_images, self.train_labels = tr.images, tr.labels.astype(np.int64)
        y_te = te.labels[: args.n_test].astype(np.int64)
        self.class_total = np.bincount(y_te, minlength=10)
        self.x_test, self.y_test = self.to_dev(te.images[: args.n_test]), self.tensor(y_te)
        self.tasks: dict[str, dict[str, Any]] = {}
        self.cfg = LoopConfig(
            batch_size=args.batch_size,
            lr=args.lr,
            width=args.width,
            label_smoothing=args.label_smoothing,
            eval_every=args.eval_every,
        )

    def tensor(self, x: np.ndarray) -> torch.Tensor:
        """A numpy array on the device."""
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.dev)

    def to_dev(self, x: np.ndarray) -> torch.Tensor:
        """uint8 (N, 28, 28) -> float (N, 1, 28, 28) on the device, standardized."""
        t = self.tensor(x.reshape(-1, 1, 28, 28)).float().div_(255.0)
        return (t - 0.2860) / 0.3530

    def prepare(self, task: str) -> dict[str, Any]:
        """The task's rows on the device and its scoring (once per task)."""
        if task in self.tasks:
            return self.tasks[task]
        a = self.args
        images, labels, meta = G.task_data(
            task, self.train_images, self.train_labels, base_size=a.base_size,
            head_size=a.head_size,
        )  # fmt: skip
        if meta:
            check_regime(self.checks, task, labels, meta, base_size=a.base_size,
                         head_size=a.head_size)  # fmt: skip
        t0 = time.perf_counter()
        shard = score(images, labels, a)
        scoring_s = time.perf_counter() - t0
        prefix = "" if task == "fmnist" else f"{task}:"
        check_scores(self.checks, shard, labels, a.units, prefix)
        data = {
            "x_train": self.to_dev(images),
            "y_train": self.tensor(labels),
            "x_test": self.x_test,
            "y_test": self.y_test,
        }
        n = int(labels.shape[0])
        self.tasks[task] = {"data": data, "shard": shard, "labels": labels, "meta": meta, "n": n}
        self.report["tasks"][task] = {
            "n_train": n,
            "dedup_n": int(meta.get("dedup_n", n)),
            "noisy_rows": int(meta["noisy"].sum()) if meta else 0,
            "class_counts": np.bincount(labels, minlength=10).tolist(),
            "scoring_s": scoring_s,
        }
        return self.tasks[task]

    def run(self, task: str, policy: str, ratio: float, seed: int) -> dict[str, Any]:
        """One training run, checked; returns its record."""
        t = self.prepare(task)
        a, n = self.args, t["n"]
        spec = G.run_spec(task, policy, ratio, seed, a.epochs)
        section = spec.policy_section()
        feedback = G.needs_feedback(policy)
        sel = SingleProcessSelector(make_policy(PolicyConfig(**section)), t["shard"])
        res, trace = train_run(
            t["data"], sel, epochs=spec.job_epochs, seed=seed, cfg=self.cfg, feedback=feedback
        )
        samples = res["samples_seen"] / (n * a.epochs)
        row = {
            "kind": "run",
            "key": spec.key,
            "via": "gpu",
            "task": task,
            "policy": policy,
            "variant": spec.variant,
            "ratio": spec.ratio,
            "seed": seed,
            "epochs": a.epochs,
            "job_epochs": spec.job_epochs,
            "params": section["params"],
            "samples": samples,
            "sample_fraction": samples,
            **res,
            "regime": G.regime_metrics(
                np.asarray(res["class_correct"]), self.class_total, trace.epochs_idx,
                t["meta"], t["labels"], a.epochs,
            ),
        }  # fmt: skip
        again = replay(section, t["shard"], trace.losses, trace.epochs_idx)
        prefix = "" if task == "fmnist" else f"{task}:"
        check_run(self.checks, row, section, trace.epochs_idx, again, n=n, prefix=prefix)
        if policy == "full":
            self.checks.add(
                f"{prefix}full_s{seed}_accuracy",
                res["final_acc"] >= a.min_full_acc,
                value=res["final_acc"],
                expect=f">= {a.min_full_acc:g}",
            )
        return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        block = G.render(json.loads(args.render.read_text()))
        G.write_doc(block) if args.write else print(block)
        return 0
    tasks = args.tasks.split(",")
    policies = {t: tuple(args.policies.split(",")) if args.policies else G.TASK_POLICIES[t]
                for t in tasks}  # fmt: skip
    plan = G.run_plan(tasks, [float(r) for r in args.ratios.split(",")],
                      [int(s) for s in args.seeds.split(",")], policies, args.epochs)  # fmt: skip
    if args.dry_run:
        total = 0
        for task, policy, ratio, seed in plan:
            n = G.task_rows(task, args.base_size, args.head_size)
            section = G.run_spec(task, policy, ratio, seed, args.epochs).policy_section()
            samples = sum(expected_sizes(section, n))
            total += samples
            print(f"{task} {policy} r={ratio:g} seed={seed}: {samples:,} samples")
        print(f"{len(plan)} runs, {total:,} samples")
        return 0
    t_start = time.perf_counter()
    checks = Checks()
    dev = torch.device(args.device)
    if args.threads or dev.type == "cpu":  # several threads on a shared CPU: 5-10x slower
        torch.set_num_threads(args.threads or 1)
    report: dict[str, Any] = {
        "machine": {
            "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else platform.machine(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "args": vars(args),
        "n_test": args.n_test,
        "tasks": {},
        "runs": [],
        "skipped": [],
    }
    runner = Runner(args, checks, report)
    report["n_test"] = int(runner.y_test.shape[0])
    out = Path(args.out)
    spent_s = spent_samples = 0.0
    for task, policy, ratio, seed in plan:
        what = f"{task} {policy} r={ratio:g} seed={seed}"
        if task not in runner.tasks:  # a new task: its scoring, estimated as the longest so far
            est = max([v["scoring_s"] for v in report["tasks"].values()], default=0.0)
            if time.perf_counter() - t_start + est > args.budget_s:
                report["skipped"].append(f"{what}: scoring ~{est:.0f}s")
                continue
            runner.prepare(task)
        spec = G.run_spec(task, policy, ratio, seed, args.epochs)
        size = sum(expected_sizes(spec.policy_section(), runner.tasks[task]["n"]))
        est = size * spent_s / spent_samples if spent_samples else 0.0
        if time.perf_counter() - t_start + est > args.budget_s:
            report["skipped"].append(f"{what}: ~{est:.0f}s")
            continue
        t_run = time.perf_counter()
        row = runner.run(task, policy, ratio, seed)
        spent_s += time.perf_counter() - t_run  # training, evaluation, selection and its replay
        spent_samples += row["samples_seen"]
        report["runs"].append(row)
        report["checks"] = checks.to_json()
        print(
            f"{task:>12} {policy:>17} r={ratio:.1f} seed={seed}: final {row['final_acc']:.4f} "
            f"balanced {row['regime']['balanced_acc']:.4f} samples {row['samples']:.3f} "
            f"{row['train_s']:.1f}s",
            flush=True,
        )
        out.write_text(json.dumps(report, indent=1))
    done = len(report["runs"])
    checks.add("runs_finished", done > 0, value=done, expect=f"> 0 of {len(plan)} planned")
    report["scoring_s"] = sum(v["scoring_s"] for v in report["tasks"].values())
    report["total_s"] = time.perf_counter() - t_start
    report["checks"] = checks.to_json()
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(G.render(report))
    print(f"scoring {report['scoring_s']:.1f}s; total {report['total_s']:.1f}s; wrote {out}")
    if report["skipped"]:
        print(f"not run (budget): {len(report['skipped'])}", flush=True)
    print(checks.summary(), flush=True)
    return 0 if checks.to_json()["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
