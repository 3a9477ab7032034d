"""TopK sparse autoencoder over frozen features (docs/architecture.md, The method 2).

Inputs are standardized with the training set's per-feature mean and std (buffers ``mean_D``,
``std_D``; constant features get std 1). With x = (h - mean) / std:

    z = ReLU(TopK_k(W_enc (x - b_pre) + b_enc)),    x_hat = W_dec z + b_pre,

loss = MSE(x_hat, x) (+ ``aux_coef`` * AuxK loss on dead units, as in EleutherAI/sparsify: the top
``aux_k`` pre-activations of units that have not fired for ``dead_steps`` steps reconstruct the
residual, normalized by the batch's total variance). After every step the decoder directions are
renormalized to unit norm, and before it the gradient component parallel to each direction is
removed. The alternative ``relu_l1`` activation is z = ReLU(W_enc (x - b_pre) + b_enc) with an L1
penalty; its codes keep the top k values per sample.

Layout: ``W_enc`` (M, D), ``b_enc`` (M,), ``W_dec`` (M, D) whose row j is unit j's decoder
direction (column j of the math's W_dec), ``b_pre`` (D,). ``forward`` returns the loss pieces and
never updates statistics; the firing counters live outside the model (`FiringCounters`), so a
DDP-wrapped module trains with the same `sae_train_step`.

Initialization is seeded (``torch.Generator``): decoder directions random unit vectors,
``W_enc = W_dec``, ``b_enc = b_pre = 0`` (the data mean after standardization). Training batches
are drawn with ``numpy.random.default_rng([seed, epoch])``; on CPU a seed gives identical weights.

Example:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(512, 16)).astype(np.float32)
    >>> fit = fit_sae(x, SAEConfig(units=64, k=4, epochs=2, batch_size=128), progress=False)
    >>> codes = encode(fit.model, x)
    >>> codes.ids.shape, codes.values.dtype
    ((512, 4), dtype('float16'))
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from saelect.workers.codes import SparseCodes
from saelect.workers.factors import dead_share
from saelect.workers.progress import OnProgress, Progress, batch_ranges
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "EncoderOutput",
    "FiringCounters",
    "ForwardOutput",
    "SAEConfig",
    "SAEFit",
    "TopKSAE",
    "dead_share",
    "default_units",
    "encode",
    "fit_sae",
    "init_sae",
    "load_sae",
    "sae_train_step",
    "save_sae",
    "total_loss",
    "train_sample",
]

ACTIVATIONS = ("topk", "relu_l1")
"""SAE activations: TopK (default) or ReLU with an L1 penalty."""
WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "sae.json"
_F16_MAX = 65504.0


def default_units(d_in: int) -> int:
    """M = min(8 d, 16384)."""
    return int(min(8 * d_in, 16384))


ENCODE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""Compute dtypes `encode` supports, by name."""


@dataclass(frozen=True)
class SAEConfig:
    """Sparse autoencoder size and training."""

    units: int | None = None
    """M, the number of units; None -> min(8 d, 16384) for input dim d."""
    k: int = 32
    """Active units per sample (TopK), and entries stored per sample for either activation."""
    activation: str = "topk"
    """``topk`` (the default) or ``relu_l1`` (ReLU + L1 penalty)."""
    l1_coef: float = 1e-3
    """``relu_l1``: weight of the L1 penalty mean_B sum_j z_j."""
    aux_k: int | None = None
    """AuxK: dead units used to reconstruct the residual; None -> d // 2 (as sparsify)."""
    aux_coef: float = 1.0 / 32.0
    """AuxK loss weight (``topk`` only); 0 turns AuxK off."""
    dead_steps: int = 10
    """A unit is dead for AuxK when it has not fired for this many training steps."""
    lr: float = 1e-3
    """Adam learning rate."""
    batch_size: int = 4096
    """Training batch size (per worker under data parallelism)."""
    epochs: int = 10
    """Passes over the training sample."""
    max_train_samples: int | None = 200_000
    """At most this many rows train the SAE (a seeded subsample); None: all."""
    seed: int = 0
    """Seed of the initialization, the subsample and the batch order."""
    device: str = "cpu"
    """Torch device of the training (``cpu``, ``cuda``, ``cuda:1``, ...)."""
    encode_dtype: str = "float32"
    """Compute dtype of `encode`: ``float32``, or ``bfloat16`` (the encoder matmul in bf16:
    about 4x faster on CPUs with AMX and on GPUs; the top-k ids agree with float32 for ~99% of
    entries, values keep ~3 significant digits). Training always runs in float32."""
    normalize_decoder: bool = True
    """Renormalize decoder directions to unit norm after every step."""
    remove_parallel_grad: bool = True
    """Remove the decoder gradient component parallel to each direction before the step."""

    def __post_init__(self) -> None:
        if self.encode_dtype not in ENCODE_DTYPES:
            raise ValueError(
                f"encode_dtype must be one of {sorted(ENCODE_DTYPES)}, got {self.encode_dtype!r}"
            )

        def _int(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")

        if self.units is not None:
            _int("units", 1)
        _int("k", 1)
        if self.units is not None and self.k > self.units:
            raise ValueError(f"k must be <= units, got k={self.k} > units={self.units}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not np.isfinite(self.l1_coef) or self.l1_coef < 0:
            raise ValueError(f"l1_coef must be >= 0, got {self.l1_coef}")
        if self.aux_k is not None:
            _int("aux_k", 1)
        if not np.isfinite(self.aux_coef) or self.aux_coef < 0:
            raise ValueError(f"aux_coef must be >= 0, got {self.aux_coef}")
        _int("dead_steps", 1)
        if not np.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        _int("batch_size", 1)
        _int("epochs", 1)
        if self.max_train_samples is not None:
            _int("max_train_samples", 1)
        _int("seed", 0)
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device must be a non-empty string, got {self.device!r}")

    def units_for(self, d_in: int) -> int:
        """M for input dim ``d_in``; ValueError when k > M."""
        units = self.units if self.units is not None else default_units(d_in)
        if self.k > units:
            raise ValueError(f"k must be <= units, got k={self.k} > units={units}")
        return int(units)


class EncoderOutput(NamedTuple):
    """The sparse code of a batch."""

    top_acts_BK: torch.Tensor  # noqa: N815
    """float (B, k) activations, >= 0, in decreasing order."""
    top_indices_BK: torch.Tensor  # noqa: N815
    """int64 (B, k) unit ids."""


class ForwardOutput(NamedTuple):
    """Everything a training step needs from one forward pass (standardized space)."""

    recon_BD: torch.Tensor  # noqa: N815
    """(B, D) reconstruction of the standardized input."""
    top_acts_BK: torch.Tensor  # noqa: N815
    """(B, k) activations."""
    top_indices_BK: torch.Tensor  # noqa: N815
    """(B, k) unit ids."""
    aux_loss: torch.Tensor
    """AuxK loss (scalar; 0 without dead units or for ``relu_l1``)."""
    mse: torch.Tensor
    """Reconstruction MSE (scalar), mean over batch and features."""
    l1_loss: torch.Tensor
    """mean_B sum_j z_j (scalar; 0 for ``topk``)."""


class TopKSAE(nn.Module):
    """TopK (or ReLU + L1) sparse autoencoder with input standardization buffers.

    Parameters
    ----------
    d_in: D, the feature dim.
    units: M, the number of units.
    k: active units per sample.
    activation: ``topk`` or ``relu_l1``.
    seed: seed of the initialization.
    aux_k: AuxK dead units (None: D // 2).
    """

    # buffers (D,): per-feature mean and std of the training features (std 1 where constant)
    mean_D: torch.Tensor  # noqa: N815
    std_D: torch.Tensor  # noqa: N815

    def __init__(
        self,
        d_in: int,
        units: int,
        k: int,
        *,
        activation: str = "topk",
        seed: int = 0,
        aux_k: int | None = None,
    ) -> None:
        super().__init__()
        if d_in < 1:
            raise ValueError(f"d_in must be >= 1, got {d_in}")
        if units < 1:
            raise ValueError(f"units must be >= 1, got {units}")
        if not 1 <= k <= units:
            raise ValueError(f"k must lie in [1, units={units}], got {k}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.d_in, self.k, self.activation = int(d_in), int(k), activation
        self.encode_dtype = "float32"  # see SAEConfig.encode_dtype; saved in sae.json
        self.aux_k = int(aux_k) if aux_k is not None else max(1, d_in // 2)
        gen = torch.Generator().manual_seed(int(seed))
        dirs_MD = torch.randn(units, d_in, generator=gen, dtype=torch.float32)
        dirs_MD /= dirs_MD.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.register_buffer("mean_D", torch.zeros(d_in))
        self.register_buffer("std_D", torch.ones(d_in))
        self.b_pre = nn.Parameter(torch.zeros(d_in))
        self.W_enc = nn.Parameter(dirs_MD.clone())
        self.b_enc = nn.Parameter(torch.zeros(units))
        self.W_dec = nn.Parameter(dirs_MD.clone())

    @property
    def units(self) -> int:
        """M."""
        return int(self.W_enc.shape[0])

    # ------------------------------------------------------------------ pieces
    def standardize(self, h_BD: torch.Tensor) -> torch.Tensor:
        """(h - mean) / std; ValueError on a wrong feature dim."""
        if h_BD.ndim != 2 or h_BD.shape[1] != self.d_in:
            raise ValueError(f"expected input (B, {self.d_in}), got {tuple(h_BD.shape)}")
        return (h_BD - self.mean_D) / self.std_D

    def pre_acts(self, x_BD: torch.Tensor) -> torch.Tensor:
        """(B, M) W_enc (x - b_pre) + b_enc of standardized x."""
        return F.linear(x_BD - self.b_pre, self.W_enc, self.b_enc)

    def _select(self, pre_BM: torch.Tensor) -> tuple[EncoderOutput, torch.Tensor | None]:
        if self.activation == "topk":
            vals_BK, idx_BK = pre_BM.topk(self.k, dim=1, sorted=True)
            return EncoderOutput(F.relu(vals_BK), idx_BK), None
        z_BM = F.relu(pre_BM)
        vals_BK, idx_BK = z_BM.topk(self.k, dim=1, sorted=True)
        return EncoderOutput(vals_BK, idx_BK), z_BM

    def encode_topk(self, h_BD: torch.Tensor, *, dtype: torch.dtype | None = None) -> EncoderOutput:
        """The k largest activations of raw features h (B, D) and their unit ids.

        ``dtype`` (e.g. ``torch.bfloat16``) runs the encoder matmul and the top-k in that dtype;
        the activations come back as float32. None or float32: the training-time computation.
        """
        x_BD = self.standardize(h_BD)
        if dtype is None or dtype == torch.float32:
            return self._select(self.pre_acts(x_BD))[0]
        pre_BM = F.linear((x_BD - self.b_pre).to(dtype), self.W_enc.to(dtype), self.b_enc.to(dtype))
        enc = self._select(pre_BM)[0]
        return EncoderOutput(enc.top_acts_BK.float(), enc.top_indices_BK)

    def decode(self, top_acts_BK: torch.Tensor, top_indices_BK: torch.Tensor) -> torch.Tensor:
        """(B, D) W_dec z + b_pre in standardized space, from the sparse code."""
        return self.decode_residual(top_acts_BK, top_indices_BK) + self.b_pre

    def decode_residual(
        self, top_acts_BK: torch.Tensor, top_indices_BK: torch.Tensor
    ) -> torch.Tensor:
        """(B, D) W_dec z without b_pre (dense scatter + matmul: faster than embedding_bag on
        CPU at these sizes, and its backward is plain matmuls)."""
        z_BM = top_acts_BK.new_zeros(top_acts_BK.shape[0], self.units)
        z_BM = z_BM.scatter(1, top_indices_BK, top_acts_BK)
        return z_BM @ self.W_dec

    def forward(self, h_BD: torch.Tensor, dead_mask_M: torch.Tensor | None = None) -> ForwardOutput:
        """Reconstruction and loss pieces of raw features h (B, D).

        ``dead_mask_M`` (bool (M,)) marks the units AuxK may use; None: no AuxK.
        """
        x_BD = self.standardize(h_BD)
        pre_BM = self.pre_acts(x_BD)
        enc, z_BM = self._select(pre_BM)
        zero = pre_BM.new_zeros(())
        if z_BM is None:
            recon_BD = self.decode(enc.top_acts_BK, enc.top_indices_BK)
            l1 = zero
        else:
            recon_BD = z_BM @ self.W_dec + self.b_pre
            l1 = z_BM.sum(dim=1).mean()
        err_BD = recon_BD - x_BD
        mse = err_BD.pow(2).mean()
        aux = zero
        if dead_mask_M is not None and z_BM is None:
            num_dead = int(dead_mask_M.sum())
            if num_dead > 0:
                k_aux = min(self.aux_k, num_dead)
                masked_BM = pre_BM.masked_fill(~dead_mask_M, float("-inf"))
                a_vals_BK, a_idx_BK = masked_BM.topk(k_aux, dim=1, sorted=False)
                e_hat_BD = self.decode_residual(F.relu(a_vals_BK), a_idx_BK)
                total_var = (x_BD - x_BD.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
                scale = min(num_dead / k_aux, 1.0)
                aux = scale * (e_hat_BD + err_BD.detach()).pow(2).sum() / total_var
        return ForwardOutput(recon_BD, enc.top_acts_BK, enc.top_indices_BK, aux, mse, l1)

    # ------------------------------------------------------------------ decoder norm
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Rescale every decoder direction (row of W_dec) to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project each decoder row's gradient onto the tangent space of the unit sphere."""
        if self.W_dec.grad is None:
            return
        parallel_M1 = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel_M1 * self.W_dec)


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


def _first_nonfinite_row(x_ND: np.ndarray) -> int | None:
    """Position of the first row holding NaN/inf, or None when every value is finite."""
    finite_N = np.isfinite(x_ND).all(axis=1)
    return None if finite_N.all() else int(np.flatnonzero(~finite_N)[0])


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


def encode(model: TopKSAE, features_ND: np.ndarray, *, batch_size: int = 8192) -> SparseCodes:
    """Sparse codes of raw features (N, D): ids int32 (N, k), values float16 (N, k).

    Per sample exactly k entries with distinct ids, in decreasing order of value; values are
    >= 0 (a 0 is an inactive entry) and clipped to the float16 range. Runs on the model's device
    in batches of ``batch_size`` under ``torch.inference_mode``, in ``model.encode_dtype``
    (`SAEConfig.encode_dtype`: float32, or bfloat16 for speed).

    Raises ValueError for a wrong feature dim or NaN/inf features.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    f_ND = np.asarray(features_ND)
    if f_ND.ndim != 2 or f_ND.shape[1] != model.d_in:
        raise ValueError(f"features must have shape (N, {model.d_in}), got {f_ND.shape}")
    n, k = f_ND.shape[0], model.k
    dtype = ENCODE_DTYPES[model.encode_dtype]
    ids = np.empty((n, k), dtype=np.int32)
    values = np.empty((n, k), dtype=np.float16)
    device = model.W_enc.device
    with torch.inference_mode():
        for start, stop in batch_ranges(n, batch_size):
            part = np.ascontiguousarray(f_ND[start:stop], dtype=np.float32)
            row = _first_nonfinite_row(part)
            if row is not None:
                raise ValueError(f"features have a non-finite value (NaN/inf) in row {start + row}")
            out = model.encode_topk(torch.from_numpy(part).to(device), dtype=dtype)
            ids[start:stop] = out.top_indices_BK.to(torch.int32).cpu().numpy()
            vals = out.top_acts_BK.clamp(max=_F16_MAX).to(torch.float16)
            values[start:stop] = vals.cpu().numpy()
    return SparseCodes(ids, values)


def save_sae(
    model: TopKSAE, directory: str | os.PathLike[str], config: SAEConfig | None = None
) -> None:
    """Write ``sae.safetensors`` (weights and buffers) then ``sae.json`` (shape and config).

    ``sae.json`` is written last, so its presence marks a complete save.
    """
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE))
    meta = {
        "d_in": model.d_in,
        "units": model.units,
        "k": model.k,
        "activation": model.activation,
        "aux_k": model.aux_k,
        "encode_dtype": model.encode_dtype,
        "config": dataclasses.asdict(config) if config is not None else None,
    }
    tmp = os.path.join(directory, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(directory, CONFIG_FILE))


def load_sae(directory: str | os.PathLike[str], device: str = "cpu") -> TopKSAE:
    """The SAE `save_sae` wrote (bit-exact weights), in eval mode on ``device``.

    Raises FileNotFoundError when a file is missing, ValueError when they disagree.
    """
    from safetensors.torch import load_file

    with open(os.path.join(directory, CONFIG_FILE)) as f:
        meta = json.load(f)
    model = TopKSAE(
        int(meta["d_in"]),
        int(meta["units"]),
        int(meta["k"]),
        activation=str(meta["activation"]),
        aux_k=meta.get("aux_k"),
    )
    model.encode_dtype = str(meta.get("encode_dtype", "float32"))
    state = load_file(os.path.join(directory, WEIGHTS_FILE))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{directory}: weights do not match sae.json: {exc}") from exc
    return model.to(device).eval()
