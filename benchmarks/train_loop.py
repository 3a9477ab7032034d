"""The training loop of the benchmark: plain PyTorch, indices from a selector, LR over the plan.

Kept apart from the driver (train_bench.py) so it is small and testable. The loop never decides
which samples to train on: every epoch it asks the selector for rank 0's indices (world size 1)
and, for loss-based policies, posts the per-sample losses back.

LR schedule: linear warm-up over the first ``warmup_frac`` of the run's steps, then cosine to
zero, where the step count is computed up front from the plan's epoch sizes. Every run, whatever
its policy, therefore traverses the same schedule shape over the steps it actually takes.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.train_models import AugmentConfig, augment_batch


class Selector(Protocol):
    """The part of ``client.SelectionClient`` the loop trains through (one job, one rank)."""

    def plan(self, job_id: str, world_size: int = 1) -> dict[str, Any]:
        """``{"epochs": [{"epoch", "size", "per_rank"}], "sample_fraction"}``."""
        ...

    def indices(self, job_id: str, epoch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """int64 (per_rank,) indices of one rank for one epoch."""
        ...

    def feedback(self, job_id: str, epoch: int, indices: np.ndarray, losses: np.ndarray) -> Any:
        """Per-sample losses of an epoch (loss-based policies)."""
        ...


@dataclass(frozen=True)
class OptimConfig:
    """SGD with Nesterov momentum and a warm-up + cosine LR over the run's steps."""

    lr: float = 0.1
    """Peak learning rate."""
    momentum: float = 0.9
    """SGD momentum (Nesterov)."""
    weight_decay: float = 5e-4
    """L2 weight decay."""
    batch_size: int = 256
    """Samples per step."""
    warmup_frac: float = 0.05
    """Share of the run's total steps spent in linear warm-up from 0 to ``lr``."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


def steps_per_epoch(per_rank: Sequence[int], batch_size: int) -> list[int]:
    """Optimizer steps of each epoch: ceil(per-rank length / batch size) (last batch partial)."""
    return [-(-int(n) // batch_size) for n in per_rank]


def lr_at(step: int, total_steps: int, *, peak: float, warmup_frac: float) -> float:
    """Learning rate of step ``step`` (0-based) of a run of ``total_steps`` steps.

    Linear warm-up to ``peak`` over ``ceil(warmup_frac * total_steps)`` steps, then a half
    cosine from ``peak`` to 0 reached after the last step.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warm = math.ceil(warmup_frac * total_steps)
    if step < warm:
        return peak * (step + 1) / warm
    rest = max(total_steps - warm, 1)
    progress = min((step - warm + 1) / rest, 1.0)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (e.g. (seed, "augment", epoch)), stable across runs."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class TrainResult:
    """What one training run measured."""

    acc_curve: list[float]
    """Test accuracy after each evaluated epoch (every epoch by default)."""
    epoch_sizes: list[int]
    """Samples trained on in each epoch (rank 0, world size 1)."""
    served: list[np.ndarray]
    """The indices of each epoch as served, int64 (size,) each."""
    total_steps: int
    """Optimizer steps the run took (equals the plan's count)."""
    planned_steps: int
    """Optimizer steps computed from the plan before training (loss-based policies re-plan)."""
    lr_trace: list[float]
    """Learning rate of every step."""
    train_s: float
    """Wall time of forward/backward/step, summed over epochs."""
    select_s: float
    """Wall time of the plan, indices and feedback calls (selection + serving)."""
    eval_s: float
    """Wall time of test evaluation."""
    eval_epochs: list[int] = field(default_factory=list)
    """The epochs ``acc_curve`` was measured after (all of them unless ``eval_every`` > 1)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Per-epoch hook outputs (diagnostics)."""


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, *, batch_size: int = 2048
) -> float:
    """Top-1 accuracy of ``model`` on (x_test (n, ...), y_test (n,))."""
    model.eval()
    correct = 0
    for lo in range(0, x_test.shape[0], batch_size):
        logits = model(x_test[lo : lo + batch_size])
        correct += int((logits.argmax(1) == y_test[lo : lo + batch_size]).sum())
    return correct / max(int(x_test.shape[0]), 1)


def train(
    *,
    model: torch.nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    selector: Selector,
    job: str,
    epochs: int,
    optim: OptimConfig,
    augment: AugmentConfig | None,
    seed: int,
    send_feedback: bool,
    on_epoch: Callable[[int, np.ndarray], None] | None = None,
    eval_every: int = 1,
) -> TrainResult:
    """Train ``model`` for ``epochs`` epochs on the indices ``selector`` serves for ``job``.

    Parameters
    ----------
    x_train: float (N, ...) inputs; y_train int64 (N,) labels; same for the test set.
    selector: object with ``plan``, ``indices``, ``feedback`` (the HTTP client's interface);
        when it also has ``weights(job, epoch)`` returning float (size,) or None, the per-sample
        losses of loss-based policies are multiplied by them (InfoBatch's rescaling).
    epochs: epochs of the job's plan.
    optim: optimizer and LR schedule; the schedule spans the steps computed from the plan.
    augment: batch augmentation for images, or None.
    seed: augmentation draws come from generators seeded by (seed, epoch).
    send_feedback: post per-sample training losses after each epoch (loss-based policies); their
        plan depends on the feedback, so the schedule is re-planned at every epoch start.
    on_epoch: called as on_epoch(epoch, indices) after the epoch (diagnostics).
    eval_every: evaluate after every ``eval_every``-th epoch and after the last one; the
        accuracy curve then holds only the evaluated epochs (``TrainResult.eval_epochs``).

    Returns
    -------
    TrainResult. For feedback-free policies ``total_steps == planned_steps`` unless the service
    served a different length than it planned, which the driver treats as an error.
    """
    if eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    # Dropout draws from torch's global generator (nn.Dropout takes no generator): fork it,
    # seed the fork from (seed, "dropout"), and restore the caller's state afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "dropout"))
        t0 = time.perf_counter()
        plan = selector.plan(job, 1)
        select_s = time.perf_counter() - t0
        per_rank = [int(e["per_rank"]) for e in plan["epochs"]]
        if len(per_rank) != epochs:
            raise ValueError(f"plan has {len(per_rank)} epochs, expected {epochs}")
        planned_steps = sum(steps_per_epoch(per_rank, optim.batch_size))
        initial_steps = planned_steps
        weights_of = getattr(selector, "weights", None) if send_feedback else None
        opt = torch.optim.SGD(
            model.parameters(),
            lr=optim.lr,
            momentum=optim.momentum,
            nesterov=optim.momentum > 0,
            weight_decay=optim.weight_decay,
        )
        step = 0
        train_s = eval_s = 0.0
        acc_curve: list[float] = []
        sizes: list[int] = []
        served: list[np.ndarray] = []
        lrs: list[float] = []
        eval_epochs: list[int] = []
        for epoch in range(epochs):
            t0 = time.perf_counter()
            if send_feedback and epoch > 0:
                # Loss-based plans depend on the feedback: the schedule's length becomes the steps
                # taken so far plus the re-planned rest, so it still ends where the run ends.
                plan = selector.plan(job, 1)
                rest = [int(e["per_rank"]) for e in plan["epochs"]][epoch:]
                planned_steps = step + sum(steps_per_epoch(rest, optim.batch_size))
            idx_n = np.asarray(selector.indices(job, epoch, 0, 1), dtype=np.int64)
            w_n = weights_of(job, epoch) if weights_of is not None else None
            select_s += time.perf_counter() - t0
            sizes.append(int(idx_n.shape[0]))
            served.append(idx_n)
            gen = torch.Generator().manual_seed(derive_seed(seed, "augment", epoch))
            losses_n = np.empty(idx_n.shape[0], dtype=np.float32)
            idx_t = torch.from_numpy(idx_n)
            t0 = time.perf_counter()
            model.train()
            for lo in range(0, idx_n.shape[0], optim.batch_size):
                b = idx_t[lo : lo + optim.batch_size]
                xb = x_train[b]
                if augment is not None:
                    xb = augment_batch(xb, augment, gen)
                lr = lr_at(step, planned_steps, peak=optim.lr, warmup_frac=optim.warmup_frac)
                for group in opt.param_groups:
                    group["lr"] = lr
                lrs.append(lr)
                loss_B = F.cross_entropy(
                    model(xb), y_train[b], reduction="none", label_smoothing=optim.label_smoothing
                )
                opt.zero_grad(set_to_none=True)
                if w_n is not None:
                    w_B = torch.from_numpy(w_n[lo : lo + b.shape[0]]).to(loss_B.dtype)
                    (loss_B * w_B).mean().backward()
                else:
                    loss_B.mean().backward()
                opt.step()
                losses_n[lo : lo + b.shape[0]] = loss_B.detach().numpy()
                step += 1
            train_s += time.perf_counter() - t0
            if send_feedback:
                t0 = time.perf_counter()
                selector.feedback(job, epoch, idx_n, losses_n)
                select_s += time.perf_counter() - t0
            if (epoch + 1) % eval_every == 0 or epoch == epochs - 1:
                t0 = time.perf_counter()
                acc_curve.append(evaluate(model, x_test, y_test))
                eval_epochs.append(epoch)
                eval_s += time.perf_counter() - t0
            if on_epoch is not None:
                on_epoch(epoch, idx_n)
        return TrainResult(
            acc_curve=acc_curve,
            epoch_sizes=sizes,
            served=served,
            total_steps=step,
            planned_steps=initial_steps,
            lr_trace=lrs,
            train_s=train_s,
            select_s=select_s,
            eval_s=eval_s,
            eval_epochs=eval_epochs,
        )
