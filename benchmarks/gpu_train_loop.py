"""The GPU training loop of ``benchmarks/gpu_train.py``: a ResNet-10, augmentation on the device,
and one run whose indices come epoch by epoch from the service's selection engine.

The data live on the device for the whole run (uint8 images converted once); augmentation (random
crop after zero padding, horizontal flip) runs there from a generator seeded by (seed, epoch).
Loss-based policies get the per-sample training losses of each epoch back (one device-to-host
copy per epoch), exactly as a trainer posts them to ``POST /v1/jobs/{id}/feedback``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from saelect.service.selection.engine import SingleProcessSelector

from benchmarks.gpu_checks import digest


def lr_at(step: int, total: int, *, peak: float, warmup_frac: float = 0.05) -> float:
    """Linear warm-up over ceil(warmup_frac * total) steps, then a half cosine to 0."""
    warm = max(1, math.ceil(warmup_frac * total))
    if step < warm:
        return peak * (step + 1) / warm
    progress = min((step - warm + 1) / max(total - warm, 1), 1.0)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def steps_of(sizes: list[int], batch_size: int) -> int:
    """Optimizer steps of epochs of the given sizes (the last batch of an epoch may be short)."""
    return sum(-(-s // batch_size) for s in sizes)


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


def memory_format(dev: torch.device) -> torch.memory_format:
    """Channels-last on CUDA (faster convolutions). Not on the CPU: torch 2.13's CPU backward
    of a channels-last conv crashes (double free) at width 8 for some odd batch sizes (17, 19)."""
    return torch.channels_last if dev.type == "cuda" else torch.contiguous_format


@torch.no_grad()
def evaluate(
    model: nn.Module, data: dict[str, torch.Tensor], bs: int, amp: bool, num_classes: int = 10
) -> np.ndarray:
    """int64 (C,) correct test predictions per class (the accuracy is their sum / n_test)."""
    model.eval()
    x, y = data["x_test"], data["y_test"]
    fmt = memory_format(x.device)
    correct_C = torch.zeros(num_classes, dtype=torch.int64, device=x.device)
    for s in range(0, x.shape[0], bs):
        xb = x[s : s + bs].contiguous(memory_format=fmt)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            pred = model(xb).argmax(1)
        yb = y[s : s + bs]
        correct_C += torch.bincount(yb[pred == yb], minlength=num_classes)
    return correct_C.cpu().numpy()


@dataclass
class RunTrace:
    """What one run trained on, for the checks: each epoch's indices and the fed-back losses."""

    epochs_idx: list[np.ndarray] = field(default_factory=list)
    """int64 (m_t,) indices of every epoch, in the order trained."""
    losses: list[np.ndarray] = field(default_factory=list)
    """float32 (m_t,) per-sample losses posted after every epoch (feedback policies only)."""


@dataclass(frozen=True)
class LoopConfig:
    """Optimization settings shared by every run of a script call."""

    batch_size: int = 512
    lr: float = 0.2
    width: int = 64
    label_smoothing: float = 0.1
    eval_every: int = 1
    """Evaluate on the test set every this many epochs, and after the last."""


def train_run(
    data: dict[str, torch.Tensor],
    selector: SingleProcessSelector,
    *,
    epochs: int,
    seed: int,
    cfg: LoopConfig,
    feedback: bool,
    num_classes: int = 10,
) -> tuple[dict[str, Any], RunTrace]:
    """Train one model on ``epochs`` epochs drawn from ``selector`` (one ``step()`` per epoch).

    With ``feedback`` the per-sample losses of each epoch go back to the selector before the
    next epoch is drawn, and the LR schedule is re-planned from the selector's plan at each
    epoch start (the same as ``benchmarks/train_loop.py``). ``samples_seen`` counts the samples
    the batches really held, ``epoch_sha256`` digests the indices trained on.

    Returns (the run's figures, its trace).
    """
    dev = data["x_train"].device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)  # scoped: the model init only
        model = resnet(cfg.width, num_classes).to(dev).to(memory_format=memory_format(dev))
    opt = torch.optim.SGD(
        model.parameters(), lr=0.0, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    planned = steps_of(selector.plan(), cfg.batch_size)
    initial_planned = planned
    gen = torch.Generator(device=dev)
    use_amp = dev.type == "cuda"
    step, seen = 0, 0
    accs: list[float] = []
    eval_epochs: list[int] = []
    correct_C = np.zeros(num_classes, dtype=np.int64)
    trace = RunTrace()
    last_loss = float("nan")
    select_s = 0.0
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        t_sel = time.perf_counter()
        if feedback and epoch > 0:
            planned = step + steps_of(selector.plan()[epoch:], cfg.batch_size)
        idx_np = np.asarray(selector.step().indices, dtype=np.int64)
        select_s += time.perf_counter() - t_sel
        trace.epochs_idx.append(idx_np)
        gen.manual_seed(seed * 1_000_003 + epoch)
        idx = torch.from_numpy(idx_np).to(dev)
        losses_m = torch.empty(idx.shape[0], dtype=torch.float32, device=dev)
        model.train()
        for start in range(0, idx.shape[0], cfg.batch_size):
            b = idx[start : start + cfg.batch_size]
            seen += b.shape[0]
            x = augment(data["x_train"][b], gen).contiguous(memory_format=memory_format(dev))
            for group in opt.param_groups:
                group["lr"] = lr_at(step, planned, peak=cfg.lr)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
                loss_B = F.cross_entropy(
                    model(x), data["y_train"][b], reduction="none",
                    label_smoothing=cfg.label_smoothing,
                )  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss_B.mean().backward()
            opt.step()
            losses_m[start : start + b.shape[0]] = loss_B.detach().float()
            step += 1
        losses_np = losses_m.cpu().numpy()  # one sync per epoch
        last_loss = float(losses_np[-1]) if losses_np.size else float("nan")
        if feedback:
            t_sel = time.perf_counter()
            selector.feedback(idx_np, losses_np)
            select_s += time.perf_counter() - t_sel
            trace.losses.append(losses_np)
        if (epoch + 1) % cfg.eval_every == 0 or epoch == epochs - 1:
            correct_C = evaluate(model, data, cfg.batch_size * 4, use_amp, num_classes)
            accs.append(float(correct_C.sum()) / data["x_test"].shape[0])
            eval_epochs.append(epoch)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    wall_s = time.perf_counter() - t0
    train_s = wall_s - select_s
    return {
        "final_acc": accs[-1],
        "best_acc": max(accs),
        "acc_per_epoch": accs,
        "eval_epochs": eval_epochs,
        "class_correct": correct_C.tolist(),
        "last_loss": last_loss,
        "train_s": train_s,
        "selection_s": select_s,
        "steps": step,
        "planned_steps": initial_planned,
        "samples_seen": seen,
        "train_samples_per_s": seen / train_s if train_s > 0 else float("nan"),
        "epoch_sha256": [digest(e) for e in trace.epochs_idx],
    }, trace
