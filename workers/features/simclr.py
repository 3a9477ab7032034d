"""SimCLR pieces of the ``selfsup`` extractor (`workers.features.selfsup`): the conv encoder and
its projection head built with a seeded init, the augmentation, the NT-Xent loss, and the
BatchNorm statistics recomputed on clean images after training.

Every random draw comes from a ``torch.Generator`` the caller passes in (the global torch RNG is
never touched): models are built on the meta device and initialized from it on CPU.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "augment",
    "build_seeded",
    "conv_encoder",
    "nt_xent",
    "projection_head",
    "recompute_bn_stats",
]

TEMPERATURE = 0.2
"""NT-Xent temperature."""
CHANNELS = (32, 64)
"""Channels of the first two conv layers (the third has ``dim``)."""
HEAD_DIMS = (128, 64)
"""Projection head: hidden and output dim (training only)."""
CROP_AREA = (0.6, 1.0)
"""Random resized crop: range of the kept share of the image area."""
CROP_LOG_RATIO = math.log(4 / 3)
"""Random resized crop: aspect ratio in exp([-this, this])."""
SHIFT = 0.1
"""Extra random translation, in grid units (the image spans [-1, 1])."""
JITTER = 0.4
"""Brightness shift in [-JITTER, JITTER] (standardized units); contrast factor in 1 +- JITTER."""


def conv_encoder(channels: int, out_dim: int) -> torch.nn.Sequential:
    """Conv encoder (B, C, H, W) -> (B, out_dim); parameters uninitialized if built on meta."""
    from torch import nn

    widths = (channels, *CHANNELS, out_dim)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i in range(3):
        layers[f"conv{i + 1}"] = nn.Conv2d(widths[i], widths[i + 1], 3, 2, 1, bias=False)
        layers[f"bn{i + 1}"] = nn.BatchNorm2d(widths[i + 1])
        layers[f"relu{i + 1}"] = nn.ReLU()
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flat"] = nn.Flatten()
    return nn.Sequential(layers)


def projection_head(in_dim: int) -> torch.nn.Sequential:
    """Projection head (B, in_dim) -> (B, 64), used by the loss only."""
    from torch import nn

    return nn.Sequential(
        nn.Linear(in_dim, HEAD_DIMS[0]), nn.ReLU(), nn.Linear(HEAD_DIMS[0], HEAD_DIMS[1])
    )


def _init_(model: torch.nn.Module, gen: torch.Generator) -> None:
    """torch's default init of conv/linear/BN layers, drawn from ``gen`` (in place)."""
    import torch
    from torch import nn

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Conv2d | nn.Linear):
                nn.init.kaiming_uniform_(mod.weight, a=math.sqrt(5), generator=gen)
                if mod.bias is not None:
                    bound = 1 / math.sqrt(mod.weight[0].numel())
                    nn.init.uniform_(mod.bias, -bound, bound, generator=gen)
            elif isinstance(mod, nn.BatchNorm2d):
                mod.reset_parameters()  # weight 1, bias 0, running stats reset


def build_seeded(factory: Any, *args: int, device: str, gen: torch.Generator | None) -> Any:
    """``factory(*args)`` built on meta, moved to ``device``, initialized from ``gen`` if given.

    Building on meta keeps torch's own init (which draws from the global RNG) from running.
    """
    import torch

    with torch.device("meta"):
        model = factory(*args)
    model = model.to_empty(device="cpu" if gen is not None else device)
    if gen is not None:
        _init_(model, gen)  # on CPU, so CPU and CUDA runs start from the same weights
        model = model.to(device)
    return model


def augment(x_BCHW: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random view of each image: resized crop + shift, horizontal flip, brightness/contrast.

    The random draws come from ``gen`` (a CPU generator), 7 uniforms per image; the result has
    the shape and device of ``x_BCHW``.
    """
    import torch
    import torch.nn.functional as F

    b = x_BCHW.shape[0]
    u_B7 = torch.rand((b, 7), generator=gen, dtype=torch.float32)
    area_B = CROP_AREA[0] + (CROP_AREA[1] - CROP_AREA[0]) * u_B7[:, 0]
    ratio_B = torch.exp((2 * u_B7[:, 1] - 1) * CROP_LOG_RATIO)
    sx_B = torch.sqrt(area_B * ratio_B).clamp(max=1.0)
    sy_B = torch.sqrt(area_B / ratio_B).clamp(max=1.0)
    flip_B = torch.where(u_B7[:, 4] < 0.5, -1.0, 1.0)
    theta_B23 = torch.zeros((b, 2, 3), dtype=torch.float32)
    theta_B23[:, 0, 0] = sx_B * flip_B
    theta_B23[:, 1, 1] = sy_B
    theta_B23[:, 0, 2] = (2 * u_B7[:, 2] - 1) * (1 - sx_B + SHIFT)
    theta_B23[:, 1, 2] = (2 * u_B7[:, 3] - 1) * (1 - sy_B + SHIFT)
    dev = x_BCHW.device
    grid = F.affine_grid(theta_B23.to(dev), list(x_BCHW.shape), align_corners=False)
    view_BCHW = F.grid_sample(
        x_BCHW, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    contrast_B111 = (1 + JITTER * (2 * u_B7[:, 5] - 1)).view(b, 1, 1, 1).to(dev)
    bright_B111 = (JITTER * (2 * u_B7[:, 6] - 1)).view(b, 1, 1, 1).to(dev)
    mean_B111 = view_BCHW.mean(dim=(1, 2, 3), keepdim=True)
    return (view_BCHW - mean_B111) * contrast_B111 + mean_B111 + bright_B111


def nt_xent(z_2BP: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """SimCLR's NT-Xent loss of 2B projections: rows i and i + B are the two views of image i.

    Notes: Chen et al. 2020 (arXiv:2002.05709), eq. 1, averaged over all 2B anchors.
    """
    import torch
    import torch.nn.functional as F

    n2 = z_2BP.shape[0]
    b = n2 // 2
    z_2BP = F.normalize(z_2BP, dim=1)
    sim_2B2B = z_2BP @ z_2BP.T / temperature
    self_mask = torch.eye(n2, dtype=torch.bool, device=z_2BP.device)
    sim_2B2B = sim_2B2B.masked_fill(self_mask, float("-inf"))
    idx_B = torch.arange(b, device=z_2BP.device)
    target_2B = torch.cat([idx_B + b, idx_B])
    return F.cross_entropy(sim_2B2B, target_2B)


def recompute_bn_stats(enc: torch.nn.Module, x_NCHW: torch.Tensor, batch_size: int) -> None:
    """Set BatchNorm running stats to their average over the full batches of the clean images."""
    import torch
    from torch import nn

    bns = [m for m in enc.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    enc.train()
    with torch.no_grad():
        for start in range(0, x_NCHW.shape[0] - batch_size + 1, batch_size):
            enc(x_NCHW[start : start + batch_size])
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
    enc.eval()
