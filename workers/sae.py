"""TopK sparse autoencoder over frozen features (docs/architecture.md, The method 2).

Inputs are standardized with the training set's per-feature mean and std (buffers ``mean_D``,
``std_D``; constant features get std 1). With x = (h - mean) / std:

    z = ReLU(TopK_k(W_enc (x - b_pre) + b_enc)),    x_hat = W_dec z + b_pre.

The alternative ``relu_l1`` activation is z = ReLU(W_enc (x - b_pre) + b_enc) with an L1
penalty; its codes keep the top k values per sample.

Layout: ``W_enc`` (M, D), ``b_enc`` (M,), ``W_dec`` (M, D) whose row j is unit j's decoder
direction (column j of the math's W_dec), ``b_pre`` (D,). ``forward`` returns the loss pieces and
never updates statistics; the firing counters live outside the model (`FiringCounters`), so a
DDP-wrapped module trains with the same `sae_train_step`.

Initialization is seeded (``torch.Generator``): decoder directions random unit vectors,
``W_enc = W_dec``, ``b_enc = b_pre = 0`` (the data mean after standardization).

Training lives in :mod:`workers.sae_fit` (`fit_sae`, `sae_train_step`, `FiringCounters`,
`total_loss`, `init_sae`); sparse codes of features in :mod:`workers.sae_encode` (`encode`); the
model on disk in :mod:`workers.sae_files` (`save_sae`, `load_sae`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "ENCODE_DTYPES",
    "EncoderOutput",
    "ForwardOutput",
    "SAEConfig",
    "TopKSAE",
    "default_units",
]

ACTIVATIONS = ("topk", "relu_l1")
"""SAE activations: TopK (default) or ReLU with an L1 penalty."""


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
