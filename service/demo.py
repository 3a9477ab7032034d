"""`saelect demo`: the whole main job on an embedded local Ray (README.md, Command line).

Prepares Fashion-MNIST as Parquet, starts local Ray and the service, scores the data (pixels-PCA
features, TopK SAE, R and D), then trains a small CNN with Ray Train workers that pull their
per-epoch subsets over HTTP: once with ``factor`` at ratio r and once with ``full`` data, for the
same epochs. Prints accuracy, samples processed and wall time side by side and writes a plot.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saelect.service.server import init_ray, start_service
from saelect.service.settings import Settings


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs."""

    epochs: int = 6
    """Training epochs of each run."""
    ratio: float = 0.5
    """Keep ratio r of the ``factor`` run."""
    out_dir: Path = Path(".saelect/demo")
    """Data, store, results and the plot go here."""
    train_limit: int | None = None
    """Use only the first N training rows (None: all 60k)."""
    test_limit: int | None = None
    """Evaluate on only the first N test rows (None: all 10k)."""
    workers: int = 2
    """Ray Train workers (CPU)."""
    batch_size: int = 128
    """Per-worker batch size."""
    lr: float = 0.05
    """Peak SGD learning rate (one-cycle over the run's actual steps)."""
    seed: int = 0
    """Seed of the policy, the model init and the data order."""
    feature_dim: int = 64
    """Pixels-PCA feature dimension d."""
    sae_units: int = 512
    """SAE width M."""
    sae_k: int = 16
    """SAE active units per sample."""
    policies: tuple[str, ...] = field(default=("factor", "full"))
    """Runs, in order."""
    record_indices: bool = False
    """Write the sample indices each rank trained on, per epoch, to
    ``out_dir/indices_{policy}_rank{r}.json`` (``{"0": [...], "1": [...]}``), for checks."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.train_limit is not None and self.train_limit < 100:
            raise ValueError(f"train_limit must be >= 100, got {self.train_limit}")
        if self.test_limit is not None and self.test_limit < 100:
            raise ValueError(f"test_limit must be >= 100, got {self.test_limit}")
        if not self.policies:
            raise ValueError("policies must name at least one policy")


def _job_spec(cfg: DemoConfig, policy: str, train_uri: str) -> dict[str, Any]:
    return {
        "name": f"demo-{policy}",
        "dataset": {
            "uri": train_uri,
            "label_column": "label",
            "feature": {"kind": "pixels", "column": "image", "dim": cfg.feature_dim},
        },
        "policy": {
            "name": policy,
            "ratio": cfg.ratio if policy != "full" else 1.0,
            "epochs": cfg.epochs,
            "seed": cfg.seed,
            "params": {},
        },
        "sae": {"units": cfg.sae_units, "k": cfg.sae_k, "seed": cfg.seed},
    }


def prepare_data(cfg: DemoConfig) -> tuple[Path, Path]:
    """Fashion-MNIST (optionally the first ``train_limit`` rows) as Parquet under out_dir/data."""
    import pyarrow.parquet as pq
    from saelect.workers.datasets import write_image_parquet

    data_dir = cfg.out_dir / "data"
    train, test = data_dir / "train.parquet", data_dir / "test.parquet"
    if not (train.exists() and test.exists()):
        train, test = (Path(p) for p in write_image_parquet(data_dir, "fashion-mnist"))
    if cfg.train_limit is None:
        return train, test
    limited = data_dir / f"train_{cfg.train_limit}.parquet"
    if not limited.exists():
        table = pq.read_table(train).slice(0, cfg.train_limit)
        tmp = limited.with_suffix(".tmp")
        pq.write_table(table, tmp, row_group_size=8192)
        os.replace(tmp, limited)
    return limited, test


def _train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: seeded model init and dropout, scoped so the global RNG is restored."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(config["seed"])
        _train(config)


def _train(config: dict[str, Any]) -> None:
    """A small CNN on this rank's subset, pulled over HTTP each epoch."""
    import numpy as np
    import ray.train
    import torch
    import torch.nn.functional as F
    from ray.train.torch import prepare_model
    from saelect.client import SelectionClient
    from saelect.client.ray_train import sampler_from_context
    from saelect.service.logs import quiet_http_logs
    from saelect.workers.datasets import load_image_parquet
    from torch.utils.data import DataLoader, TensorDataset

    quiet_http_logs()  # Ray Train set up this process's logging: no INFO line per request
    torch.set_num_threads(1)
    x_tr, y_tr = load_image_parquet(config["train"])
    x_te, y_te = load_image_parquet(config["test"])
    x_te, y_te = x_te[: config["test_limit"]], y_te[: config["test_limit"]]
    to_t = lambda x: torch.from_numpy(x.astype(np.float32) / 255.0).view(-1, 1, 28, 28)  # noqa: E731
    # labels copied: the Parquet reader's arrays are read-only, which torch warns about;
    # the third tensor is each row's index, so a rank can record what it trained on
    train_set = TensorDataset(
        to_t(x_tr), torch.from_numpy(y_tr.copy()), torch.arange(len(y_tr), dtype=torch.int64)
    )
    xt, yt = to_t(x_te), torch.from_numpy(y_te.copy())

    model = prepare_model(_cnn())
    client = SelectionClient(config["url"])
    sampler = sampler_from_context(client, config["job_id"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    plan = client.plan(config["job_id"], world)
    steps = sum(-(-e["per_rank"] // config["batch_size"]) for e in plan["epochs"])
    opt = torch.optim.SGD(
        model.parameters(), lr=config["lr"], momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config["lr"], total_steps=max(steps, 1))
    history = []
    used: dict[str, list[int]] = {}
    seen = 0
    t_start = time.perf_counter()
    for epoch in range(len(plan["epochs"])):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        fetch_s = time.perf_counter() - t0
        model.train()
        loader = DataLoader(train_set, batch_size=config["batch_size"], sampler=sampler)
        used[str(epoch)] = []
        for xb, yb, ib in loader:
            if config["record"]:
                used[str(epoch)].extend(ib.tolist())
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            sched.step()
        seen += len(sampler) * world
        model.eval()
        with torch.no_grad():  # each rank scores its slice of the test set; the counts add up
            correct = (model(xt[rank::world]).argmax(1) == yt[rank::world]).sum()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(correct)
        acc = float(correct) / len(yt)
        history.append(
            {
                "epoch": epoch,
                "test_acc": acc,
                "samples": seen,
                "epoch_s": time.perf_counter() - t0,
                "fetch_s": fetch_s,
            }
        )
        if rank == 0:
            print(f"[{config['policy']}] epoch {epoch}: test acc {acc:.4f}, samples {seen}")
    if config["record"]:
        name = f"indices_{config['policy']}_rank{rank}.json"
        Path(config["result"]).with_name(name).write_text(json.dumps(used))
    if rank == 0:
        out = {"history": history, "train_s": time.perf_counter() - t_start}
        Path(config["result"]).write_text(json.dumps(out))
    with tempfile.TemporaryDirectory() as d:
        Path(d, "done").write_text("1")
        ray.train.report(
            {"epochs": len(history)}, checkpoint=ray.train.Checkpoint.from_directory(d)
        )


def _cnn() -> Any:
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Dropout(0.25),
        nn.Linear(128, 10),
    )


def train_with_service(
    cfg: DemoConfig, url: str, job_id: str, policy: str, train: Path, test: Path
) -> dict[str, Any]:
    """One Ray Train run pulling its subsets over HTTP; returns rank 0's history."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    result_path = cfg.out_dir / f"result_{policy}.json"
    name = f"saelect-demo-{policy}"
    storage = (cfg.out_dir / "ray").resolve()
    shutil.rmtree(storage / name, ignore_errors=True)  # a fresh run, not a resumed snapshot
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "url": url,
            "job_id": job_id,
            "policy": policy,
            "seed": cfg.seed,
            "train": str(train.resolve()),
            "test": str(test.resolve()),
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "result": str(result_path.resolve()),
            "record": cfg.record_indices,
            "test_limit": cfg.test_limit,
        },
        scaling_config=ScalingConfig(num_workers=cfg.workers, resources_per_worker={"CPU": 0.9}),
        run_config=RunConfig(name=name, storage_path=str(storage)),
    )
    trainer.fit()
    return json.loads(result_path.read_text())


def plot_demo(results: dict[str, dict[str, Any]], num_samples: int, path: Path) -> None:
    """Test accuracy against epochs and against samples processed, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for policy, res in results.items():
        h = res["history"]
        axes[0].plot(
            [e["epoch"] + 1 for e in h], [e["test_acc"] for e in h], marker="o", label=policy
        )
        axes[1].plot(
            [e["samples"] / num_samples for e in h],
            [e["test_acc"] for e in h],
            marker="o",
            label=policy,
        )
    axes[0].set_xlabel("epoch")
    axes[1].set_xlabel("samples processed (dataset passes)")
    for ax in axes:
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("saelect demo: Fashion-MNIST, small CNN, 2 Ray Train workers")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(cfg: DemoConfig) -> dict[str, dict[str, Any]]:
    """Run the demo end to end; returns per-policy results (history, times)."""
    from saelect.client import SelectionClient
    from saelect.service.cli_progress import PhaseProgress

    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train, test = prepare_data(cfg)
    print(f"data: {train} ({time.perf_counter() - t0:.1f}s)")
    # Ray Train's print patch would log each worker print a second time: print once, as is
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # a local Ray has no node that a cloud provider drains: no preemption watcher actor (whose
    # constructor arguments in the object store make Ray log an error line at each run)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # the workers' per-epoch lines show up here; Ray Train's controller queries actor states
    # through the state API, which the dashboard serves
    init_ray(log_to_driver=True, include_dashboard=True)
    store = cfg.out_dir / "store"
    if store.exists():  # a fresh store, so that the scoring time below is a real one
        shutil.rmtree(store)
    settings = Settings(
        host="127.0.0.1",
        port=0,
        store=str(store.resolve()),
        allowed_roots=[str(cfg.out_dir.resolve())],
    )
    # scoring reserves the CPUs only while it runs, so the Ray Train workers find them free
    service = start_service(settings, name=None)
    print(f"service: {service.url}  (API docs at {service.url}/docs)")
    client = SelectionClient(service.url)
    results: dict[str, dict[str, Any]] = {}
    num_samples = 0
    try:
        for policy in cfg.policies:
            t_score = time.perf_counter()
            job = client.create_job(_job_spec(cfg, policy, str(train.resolve())))
            bars = PhaseProgress(job["id"])  # what `saelect jobs wait` shows
            status = client.wait_ready(job["id"], timeout=1800, poll=1.0, on_progress=bars)
            bars.close()
            score_s = time.perf_counter() - t_score
            num_samples = int(status["num_samples"])
            plan = client.plan(job["id"], cfg.workers)
            how = "scored" if not results else "loaded the shared scoring of"
            print(
                f"[{policy}] {how} {num_samples} samples in {score_s:.1f}s; "
                f"sample fraction {plan['sample_fraction']:.3f}",
                flush=True,
            )
            res = train_with_service(cfg, service.url, job["id"], policy, train, test)
            res.update(score_s=score_s, sample_fraction=plan["sample_fraction"], job_id=job["id"])
            stats = [client.stats(job["id"], t) for t in range(cfg.epochs)]
            res["selection_per_epoch"] = [float(s.get("selection_seconds", 0.0)) for s in stats]
            res["selection_s"] = sum(res["selection_per_epoch"])
            res["fetch_s"] = sum(e["fetch_s"] for e in res["history"])
            res["coverage"] = stats[-1]["coverage"]
            results[policy] = res
    finally:
        service.stop()
    plot_path = cfg.out_dir / "demo.png"
    plot_demo(results, num_samples, plot_path)
    (cfg.out_dir / "demo_results.json").write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"plot: {plot_path.resolve()}")
    print(f"total wall time: {time.perf_counter() - t0:.1f}s")
    return results


def print_table(results: dict[str, dict[str, Any]]) -> None:
    """Side-by-side table: accuracy, samples processed, wall times."""
    header = (
        f"{'policy':<10}{'final acc':>10}{'best acc':>10}{'samples':>10}"
        f"{'train s':>10}{'score s':>10}{'select+serve s':>16}"
    )
    print(header)
    print("-" * len(header))
    for policy, r in results.items():
        accs = [e["test_acc"] for e in r["history"]]
        print(
            f"{policy:<10}{accs[-1]:>10.4f}{max(accs):>10.4f}{r['sample_fraction']:>10.3f}"
            f"{r['train_s']:>10.1f}{r['score_s']:>10.1f}{r['fetch_s']:>16.3f}"
        )
