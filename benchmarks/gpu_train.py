"""The main training table on a GPU: Fashion-MNIST, a ResNet-style CNN, policies against budget.

One prepared script for one device call (fits a 10-minute limit on an H200 with the defaults):

1. Fashion-MNIST from the IDX files (``--data-dir``; carry them to the device machine), loaded to
   the GPU once as uint8; augmentation (random crop after 4-pixel padding, horizontal flip) runs
   on the GPU from a generator seeded by (seed, epoch).
2. Scoring once, with the same pure functions as the service: pixels standardized and PCA'd to
   ``--pca-dim``, TopK SAE fitted on the GPU, R and D
   (`workers.scoring_local.score_single_process`).
3. For each ratio r and policy, a run of ``--epochs`` epochs whose indices come from the
   selection engine (`service.selection.engine.SingleProcessSelector`, the code the service runs),
   with a warm-up + cosine learning rate over the run's actual steps (from the plan); the
   ``full_fewer`` baseline trains on full data for round(r E) epochs with its own complete
   schedule (the same number of samples as the selection policies).
4. Writes every run (final and best test accuracy, samples processed, seconds, a sha256 of each
   epoch's indices) to JSON (``--out``, default ``$OUT/gpu_train.json``) as soon as it ends, so a
   run cut by the time limit still returns what finished; ``--budget-s`` stops starting new runs
   in time.
5. Checks its own results (`benchmarks.gpu_checks`, under ``"checks"`` in the JSON; exit 1 when
   one fails): the scores cover all N rows with their labels, finite and in [0, 1]; every run
   trained on exactly the samples its plan counts (each epoch's size from the policy, indices
   distinct and in range), with a finite, positive throughput and finite losses and accuracies;
   a second draw of each selection is identical; the full-data run reaches ``--min-full-acc``.

    python benchmarks/gpu_train.py --data-dir data/fashion-mnist            # on the H200
    python benchmarks/gpu_train.py --device cpu --smoke                     # a CPU smoke check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_checks import Checks, digest, finite_positive  # noqa: E402
from service.policies import PolicyConfig, make_policy  # noqa: E402
from service.selection.engine import SingleProcessSelector  # noqa: E402
from workers.datasets import FMNIST_DIR, image_table, load_fashion_mnist  # noqa: E402
from workers.features import FeatureSpec  # noqa: E402
from workers.sae import SAEConfig  # noqa: E402
from workers.scores import ScoreConfig  # noqa: E402
from workers.selection_shard import ShardData  # noqa: E402


def lr_at(step: int, total: int, *, peak: float, warmup_frac: float = 0.05) -> float:
    """Linear warm-up over ceil(warmup_frac * total) steps, then a half cosine to 0."""
    warm = max(1, math.ceil(warmup_frac * total))
    if step < warm:
        return peak * (step + 1) / warm
    progress = min((step - warm + 1) / max(total - warm, 1), 1.0)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


class Block(nn.Module):
    """Pre-activation residual block (B, C_in, H, W) -> (B, C_out, H/stride, W/stride)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = (
            nn.BatchNorm2d(c_in),
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
        )
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.skip = (
            nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = x if self.skip is None else self.skip(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


def resnet(width: int = 64, num_classes: int = 10) -> nn.Module:
    """A ResNet-10-style network for 28x28 grey images: (B, 1, 28, 28) -> (B, classes)."""
    w = width
    return nn.Sequential(
        nn.Conv2d(1, w, 3, 1, 1, bias=False),
        Block(w, w, 1),
        Block(w, 2 * w, 2),
        Block(2 * w, 4 * w, 2),
        Block(4 * w, 4 * w, 1),
        nn.BatchNorm2d(4 * w),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * w, num_classes),
    )


def augment(x_B1HW: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after zero padding and a random horizontal flip, on x's device."""
    B, _, H, W = x_B1HW.shape
    dev = x_B1HW.device
    padded = F.pad(x_B1HW, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=gen, device=dev)
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=gen, device=dev)
    rows_BH1 = (dy[:, None] + torch.arange(H, device=dev)[None, :])[:, :, None]
    cols_B1W = (dx[:, None] + torch.arange(W, device=dev)[None, :])[:, None, :]
    batch_B11 = torch.arange(B, device=dev)[:, None, None]
    out = padded[:, 0][batch_B11, rows_BH1, cols_B1W].unsqueeze(1)  # (B, 1, H, W)
    flip = torch.rand(B, generator=gen, device=dev) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def train_run(
    data: dict[str, torch.Tensor],
    epochs_idx: list[np.ndarray],
    *,
    seed: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Train one model on the given per-epoch index lists; returns accuracies and timings.

    ``samples_seen`` counts the samples the batches really held, ``epoch_sha256`` digests the
    index lists trained on, so the report shows what was trained and not what was planned.
    """
    dev = data["x_train"].device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)  # scoped: the model init only
        model = resnet(args.width).to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(
        model.parameters(), lr=0.0, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    steps = sum(-(-len(e) // args.batch_size) for e in epochs_idx)
    gen = torch.Generator(device=dev)
    use_amp = dev.type == "cuda"
    step, accs, seen, digests = 0, [], 0, []
    last_loss = float("nan")
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for epoch, idx_np in enumerate(epochs_idx):
        gen.manual_seed(seed * 1_000_003 + epoch)
        digests.append(digest(idx_np))
        idx = torch.from_numpy(idx_np).to(dev)
        model.train()
        for start in range(0, idx.shape[0], args.batch_size):
            b = idx[start : start + args.batch_size]
            seen += b.shape[0]
            x = augment(data["x_train"][b], gen).contiguous(memory_format=torch.channels_last)
            y = data["y_train"][b]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, peak=args.lr)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        last_loss = float(loss.detach())  # one sync per epoch: the epoch's last batch
        accs.append(evaluate(model, data, args.batch_size * 4, use_amp))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    return {
        "final_acc": accs[-1],
        "best_acc": max(accs),
        "acc_per_epoch": accs,
        "last_loss": last_loss,
        "train_s": train_s,
        "steps": steps,
        "samples_seen": seen,
        "train_samples_per_s": seen / train_s,
        "epoch_sha256": digests,
    }


@torch.no_grad()
def evaluate(model: nn.Module, data: dict[str, torch.Tensor], bs: int, amp: bool) -> float:
    """Test accuracy."""
    model.eval()
    x, y = data["x_test"], data["y_test"]
    correct = 0
    for s in range(0, x.shape[0], bs):
        xb = x[s : s + bs].contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            correct += int((model(xb).argmax(1) == y[s : s + bs]).sum())
    return correct / x.shape[0]


def score(train_images: np.ndarray, labels: np.ndarray, args: argparse.Namespace) -> ShardData:
    """R, D (and codes) with the service's pure scoring functions, the SAE on ``args.device``."""
    import pyarrow.parquet as pq

    from workers.scoring_local import score_single_process

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


def plan_epochs(policy: str, ratio: float, seed: int, shard: ShardData, epochs: int) -> list:
    """The per-epoch index lists of one run (``full_fewer``: full data for round(r E) epochs)."""
    n = shard.n
    if policy == "full_fewer":
        e = max(1, round(ratio * epochs))
        rng = np.random.default_rng([seed, 7])
        return [rng.permutation(n) for _ in range(e)]
    cfg = PolicyConfig(
        name=policy, ratio=1.0 if policy == "full" else ratio, epochs=epochs, seed=seed, params={}
    )
    sel = SingleProcessSelector(make_policy(cfg), shard)
    return [sel.step().indices for _ in range(epochs)]


def expected_sizes(policy: str, ratio: float, n: int, epochs: int) -> list[int]:
    """Each epoch's size as the plan counts it (``full_fewer``: n for round(r E) epochs)."""
    if policy == "full_fewer":
        return [n] * max(1, round(ratio * epochs))
    cfg = PolicyConfig(
        name=policy, ratio=1.0 if policy == "full" else ratio, epochs=epochs, seed=0, params={}
    )
    return make_policy(cfg).plan(n)


def check_scores(checks: Checks, shard: ShardData, labels: np.ndarray, units: int) -> None:
    """The scoring covers every row with its label; R, D finite in [0, 1]; codes valid."""
    n = int(labels.shape[0])
    checks.add("scored_rows", shard.n == n, value=shard.n, expect=f"== N = {n}")
    same_labels = shard.labels is not None and np.array_equal(shard.labels, labels)
    checks.add(
        "scored_labels", same_labels, value=same_labels, expect="the loaded labels, in order"
    )
    rd = np.concatenate([shard.R, shard.D])
    rd_ok = bool(np.isfinite(rd).all() and rd.min() >= 0.0 and rd.max() <= 1.0)
    checks.add("scores_in_unit_interval", rd_ok, value=rd_ok, expect="R, D finite in [0, 1]")
    ids = np.asarray(shard.code_ids)
    alive = int(np.unique(ids[np.asarray(shard.code_values) > 0]).size)
    codes_ok = bool(ids.shape[0] == n and ids.min() >= 0 and ids.max() < units and alive > 0)
    checks.add(
        "codes_valid",
        codes_ok,
        value={"rows": int(ids.shape[0]), "alive_units": alive},
        expect=f"N rows of ids in [0, {units}), some unit active",
    )


def check_run(
    checks: Checks,
    row: dict[str, Any],
    epochs_idx: list[np.ndarray],
    again: list[np.ndarray],
    *,
    n: int,
    epochs: int,
) -> None:
    """One run's checks: sizes per the plan, distinct in-range indices, samples counted, finite
    figures, the selection drawn twice the same."""
    name = f"{row['policy']}_r{row['ratio']:g}_s{row['seed']}"
    want = expected_sizes(row["policy"], row["ratio"], n, epochs)
    sizes = [len(e) for e in epochs_idx]
    checks.add(f"{name}_epoch_sizes", sizes == want, value=sizes, expect=f"the plan's {want}")
    valid = all(
        e.size == np.unique(e).size and (e.size == 0 or (e.min() >= 0 and e.max() < n))
        for e in epochs_idx
    )
    checks.add(f"{name}_indices_valid", valid, value=valid, expect=f"distinct, in [0, {n})")
    checks.add(
        f"{name}_samples_counted",
        row["samples_seen"] == sum(want),
        value=row["samples_seen"],
        expect=f"== sum of the plan's sizes = {sum(want)}",
    )
    checks.add(
        f"{name}_throughput",
        finite_positive(row["train_samples_per_s"], row["train_s"]),
        value=row["train_samples_per_s"],
        expect="finite and > 0",
    )
    accs = [*row["acc_per_epoch"], row["last_loss"]]
    finite = all(math.isfinite(a) for a in accs) and all(0 <= a <= 1 for a in row["acc_per_epoch"])
    checks.add(f"{name}_finite", finite, value=accs, expect="accuracies in [0, 1], a finite loss")
    same = [digest(e) for e in again] == row["epoch_sha256"]
    checks.add(f"{name}_reproducible", same, value=same, expect="a second draw gives the same")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("FMNIST_DIR", str(FMNIST_DIR)))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--ratios", default="0.1,0.2,0.3")
    p.add_argument("--policies", default="factor,rs2,full_fewer")
    p.add_argument("--seeds", default="0")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--pca-dim", type=int, default=256)
    p.add_argument("--units", type=int, default=2048)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--sae-epochs", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=500.0, help="start no run after this")
    p.add_argument("--smoke", action="store_true", help="tiny CPU check: 600 rows, 2 epochs")
    p.add_argument(
        "--min-full-acc",
        type=float,
        default=0.85,
        help="the full-data run's final test accuracy must reach this (0 with --smoke)",
    )
    out_default = Path(os.environ["OUT"]) / "gpu_train.json" if "OUT" in os.environ else None
    p.add_argument("--out", default=str(out_default or "gpu_train.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs, args.width, args.units, args.k, args.pca_dim = 2, 8, 64, 4, 16
        args.sae_epochs, args.batch_size, args.min_full_acc = 2, 128, 0.0
    t_start = time.perf_counter()
    dev = torch.device(args.device)
    tr = load_fashion_mnist(args.data_dir, "train")
    te = load_fashion_mnist(args.data_dir, "test")
    x_tr, y_tr, x_te, y_te = tr.images, tr.labels, te.images, te.labels
    if args.smoke:
        x_tr, y_tr, x_te, y_te = x_tr[:600], y_tr[:600], x_te[:200], y_te[:200]

    def to_dev(x: np.ndarray) -> torch.Tensor:  # uint8 (N, 784) -> float (N, 1, 28, 28)
        t = torch.from_numpy(x.reshape(-1, 1, 28, 28)).to(dev).float().div_(255.0)
        return (t - 0.2860) / 0.3530

    data = {
        "x_train": to_dev(x_tr),
        "y_train": torch.from_numpy(y_tr).to(dev),
        "x_test": to_dev(x_te),
        "y_test": torch.from_numpy(y_te).to(dev),
    }
    t0 = time.perf_counter()
    shard = score(x_tr, y_tr, args)
    scoring_s = time.perf_counter() - t0
    checks = Checks()
    check_scores(checks, shard, np.asarray(y_tr, dtype=np.int64), args.units)
    report: dict[str, Any] = {
        "machine": {
            "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else platform.machine(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "args": vars(args),
        "n_train": int(x_tr.shape[0]),
        "n_test": int(x_te.shape[0]),
        "scoring_s": scoring_s,
        "runs": [],
    }
    out = Path(args.out)
    runs = [("full", 1.0)]
    for r in (float(x) for x in args.ratios.split(",")):
        runs += [(pol, r) for pol in args.policies.split(",")]
    for seed in (int(s) for s in args.seeds.split(",")):
        for policy, ratio in runs:
            if time.perf_counter() - t_start > args.budget_s:
                report["stopped"] = f"budget of {args.budget_s}s reached before {policy} r={ratio}"
                break
            t_sel = time.perf_counter()
            epochs_idx = plan_epochs(policy, ratio, seed, shard, args.epochs)
            sel_s = time.perf_counter() - t_sel
            res = train_run(data, epochs_idx, seed=seed, args=args)
            samples = res["samples_seen"] / (shard.n * args.epochs)
            row = {
                "policy": policy,
                "ratio": ratio,
                "seed": seed,
                "samples": samples,
                "selection_s": sel_s,
                **res,
            }
            report["runs"].append(row)
            again = plan_epochs(policy, ratio, seed, shard, args.epochs)
            check_run(checks, row, epochs_idx, again, n=shard.n, epochs=args.epochs)
            if policy == "full":
                acc = res["final_acc"]
                checks.add(
                    f"full_s{seed}_accuracy",
                    acc >= args.min_full_acc,
                    value=acc,
                    expect=f">= {args.min_full_acc:g}",
                )
            report["checks"] = checks.to_json()
            print(
                f"{policy:>11} r={ratio:.1f} seed={seed}: final {res['final_acc']:.4f} "
                f"best {res['best_acc']:.4f} samples {samples:.3f} {res['train_s']:.1f}s",
                flush=True,
            )
            out.write_text(json.dumps(report, indent=1))
    report["total_s"] = time.perf_counter() - t_start
    report["checks"] = checks.to_json()
    out.write_text(json.dumps(report, indent=1))
    print(f"scoring {scoring_s:.1f}s; total {report['total_s']:.1f}s; wrote {out}")
    print(checks.summary(), flush=True)
    return 0 if checks.to_json()["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
