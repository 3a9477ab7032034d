"""Training a TopK SAE in this process (docs/architecture.md, The method 2).

loss = MSE(x_hat, x) (+ ``aux_coef`` * AuxK loss on dead units, as in EleutherAI/sparsify: the top
``aux_k`` pre-activations of units that have not fired for ``dead_steps`` steps reconstruct the
residual, normalized by the batch's total variance). After every step the decoder directions are
renormalized to unit norm, and before it the gradient component parallel to each direction is
removed (`sae_train_step`). ``relu_l1`` adds ``l1_coef`` times its L1 penalty (`total_loss`).

The firing counters live outside the model (`FiringCounters`), so a DDP-wrapped module trains
with the same `sae_train_step` (:mod:`workers.sae_train` runs it data-parallel on Ray Train).

Initialization is seeded (`init_sae`, see :mod:`workers.sae`); training batches are drawn with
``numpy.random.default_rng([seed, epoch])``; on CPU a seed gives identical weights.

Example:
    >>> import numpy as np
    >>> from saelect.workers.sae_encode import encode
    >>> x = np.random.default_rng(0).normal(size=(512, 16)).astype(np.float32)
    >>> fit = fit_sae(x, SAEConfig(units=64, k=4, epochs=2, batch_size=128), progress=False)
    >>> codes = encode(fit.model, x)
    >>> codes.ids.shape, codes.values.dtype
    ((512, 4), dtype('float16'))
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from saelect.workers.factors import dead_share
from saelect.workers.progress import OnProgress, Progress, batch_ranges
from saelect.workers.sae import ForwardOutput, SAEConfig, TopKSAE
from saelect.workers.sae_encode import _first_nonfinite_row, encode
from torch import nn

__all__ = [
    "FiringCounters",
    "SAEFit",
    "fit_sae",
    "init_sae",
    "sae_train_step",
    "total_loss",
    "train_sample",
]


class FiringCounters:
    """Steps since each unit last fired (kept outside the model, updated after each step)."""

    def __init__(self, units: int, device: str | torch.device = "cpu") -> None:
        self.steps_M = torch.zeros(units, dtype=torch.int64, device=device)

    def update(self, top_acts_BK: torch.Tensor, top_indices_BK: torch.Tensor) -> None:
        """Count one step; units active (act > 0) in the batch reset to 0."""
        fired_M = torch.zeros_like(self.steps_M, dtype=torch.bool)
        fired_M[top_indices_BK[top_acts_BK.detach() > 0]] = True
        self.steps_M += 1
        self.steps_M[fired_M] = 0

    def dead_mask(self, dead_steps: int) -> torch.Tensor:
        """bool (M,): units that have not fired for ``dead_steps`` steps."""
        return self.steps_M >= dead_steps


def total_loss(out: ForwardOutput, config: SAEConfig) -> torch.Tensor:
    """mse + aux_coef * aux_loss + l1_coef * l1_loss (the L1 term for ``relu_l1`` only)."""
    loss = out.mse + config.aux_coef * out.aux_loss
    if config.activation == "relu_l1":
        loss = loss + config.l1_coef * out.l1_loss
    return loss


def sae_train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x_BD: torch.Tensor,
    config: SAEConfig,
    *,
    module: nn.Module | None = None,
    counters: FiringCounters | None = None,
) -> float:
    """One optimizer step on the raw-feature batch ``x_BD``; returns the batch's MSE (before it).

    Parameters
    ----------
    model: the `TopKSAE` (or a DDP wrapper around it: its ``.module`` is used for the decoder
        renormalization).
    optimizer: over the model's parameters.
    x_BD: float32 (B, D) raw features on the model's device.
    config: loss weights, decoder options.
    module: what to call for the forward pass (e.g. the DDP wrapper); default ``model``.
    counters: firing counters for AuxK (updated here); None turns AuxK off.
    """
    if module is None:
        module = model
    base: Any = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    dead = None
    if counters is not None and config.aux_coef > 0 and config.activation == "topk":
        dead = counters.dead_mask(config.dead_steps)
    out: ForwardOutput = module(x_BD, dead)
    loss = total_loss(out, config)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.remove_parallel_grad:
        base.remove_gradient_parallel_to_decoder_directions()
    optimizer.step()
    if config.normalize_decoder:
        base.set_decoder_norm_to_unit_norm()
    if counters is not None:
        counters.update(out.top_acts_BK, out.top_indices_BK)
    return float(out.mse.detach())


class SAEFit(NamedTuple):
    """Result of `fit_sae`."""

    model: TopKSAE
    """The trained SAE (eval mode)."""
    losses: list[float]
    """Mean reconstruction MSE (standardized space) per epoch."""
    dead_share: float
    """Share of units never active when encoding the training sample, in [0, 1]."""


def _check_features(features: Any, what: str = "features") -> np.ndarray:
    f_ND = np.asarray(features)
    if f_ND.ndim != 2:
        raise ValueError(f"{what} must be 2-D (N, D), got shape {f_ND.shape}")
    if f_ND.shape[0] < 1 or f_ND.shape[1] < 1:
        raise ValueError(f"{what} must have N >= 1 rows and D >= 1 columns, got {f_ND.shape}")
    f_ND = np.ascontiguousarray(f_ND, dtype=np.float32)
    row = _first_nonfinite_row(f_ND)
    if row is not None:
        raise ValueError(f"{what} has a non-finite value (NaN/inf) in row {row}")
    return f_ND


def train_sample(features_ND: np.ndarray, config: SAEConfig) -> np.ndarray:
    """The rows the SAE trains on: all, or a seeded subsample of ``max_train_samples`` (sorted)."""
    n = features_ND.shape[0]
    if config.max_train_samples is None or n <= config.max_train_samples:
        return features_ND
    rng = np.random.default_rng([config.seed, 0x5AE])
    rows = np.sort(rng.choice(n, size=config.max_train_samples, replace=False))
    return features_ND[rows]


def init_sae(features_ND: np.ndarray, config: SAEConfig) -> TopKSAE:
    """A freshly initialized SAE whose standardization buffers come from ``features_ND``."""
    f_ND = _check_features(features_ND)
    d = f_ND.shape[1]
    model = TopKSAE(
        d,
        config.units_for(d),
        config.k,
        activation=config.activation,
        seed=config.seed,
        aux_k=config.aux_k,
    )
    f64 = f_ND.astype(np.float64)
    std = f64.std(axis=0)
    with torch.no_grad():
        model.mean_D.copy_(torch.from_numpy(f64.mean(axis=0)).float())
        model.std_D.copy_(torch.from_numpy(np.where(std > 1e-8, std, 1.0)).float())
    model.encode_dtype = config.encode_dtype
    return model


def fit_sae(
    features_ND: np.ndarray,
    config: SAEConfig,
    *,
    progress: bool = True,
    on_progress: OnProgress | None = None,
) -> SAEFit:
    """Train an SAE on features (N, D) in this process.

    Parameters
    ----------
    features_ND: float (N, D) frozen features; at most ``config.max_train_samples`` rows are used.
    config: `SAEConfig`.
    progress: show a tqdm bar (on a terminal only).
    on_progress: called with (steps done, total steps).

    Returns
    -------
    `SAEFit` (model, per-epoch MSE, dead-unit share).

    Raises
    ------
    ValueError: NaN/inf features, empty input, or k > units.
    """
    f_ND = train_sample(_check_features(features_ND), config)
    device = torch.device(config.device)
    model = init_sae(f_ND, config).to(device)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    counters = FiringCounters(model.units, device)
    x_ND = torch.from_numpy(f_ND).to(device)
    n, bs = f_ND.shape[0], config.batch_size
    steps_per_epoch = -(-n // bs)
    losses: list[float] = []
    with Progress(
        steps_per_epoch * config.epochs,
        desc="sae",
        progress=progress,
        on_progress=on_progress,
        unit="step",
    ) as bar:
        for epoch in range(config.epochs):
            perm = torch.from_numpy(np.random.default_rng([config.seed, epoch]).permutation(n))
            perm = perm.to(device)
            total = 0.0
            for start, stop in batch_ranges(n, bs):
                x_BD = x_ND[perm[start:stop]]
                mse = sae_train_step(model, optimizer, x_BD, config, counters=counters)
                total += mse * (stop - start)
                bar.update(1)
            losses.append(total / n)
            bar.set_postfix(mse=f"{losses[-1]:.4f}")
    model.eval()
    codes = encode(model, f_ND)
    return SAEFit(model, losses, dead_share(codes, model.units))
