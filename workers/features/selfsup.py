"""The ``selfsup`` extractor: a small conv encoder trained self-supervised on the data itself.

For images with no pretrained encoder at hand, a stronger plug-in feature space than pixel PCA.
``fit`` trains a 3-layer CNN (stride-2 3x3 convs with BatchNorm and ReLU, then global average
pooling to ``dim`` features, default 128) with SimCLR's contrastive NT-Xent loss (Chen et al.
2020, eq. 1): two augmented views of every image (random resized crop via ``affine_grid`` /
``grid_sample``, horizontal flip, brightness/contrast jitter) are pulled together through a
projection head (dim -> 128 -> 64, dropped after training) and pushed away from the other
2B - 2 views of the batch. After training, BatchNorm's running statistics are recomputed on the
un-augmented sample, so ``transform`` (eval mode, batch by batch) sees statistics of clean images
and a row's features do not depend on its batch.

Rows are read as channel-first images: a row of D values is the flattened (C, H, W) array, with
(C, H, W) = ``spec.image_shape`` or, when unset, (1, s, s) for D = s^2 or (3, s, s) for D = 3 s^2.
Inputs are standardized per channel with the fit sample's mean and std (any value range works).

Cost: fitting on 20,000 Fashion-MNIST images (28x28) for `EPOCHS` epochs took 141 s on one CPU
thread (``torch.set_num_threads(1)``, a shared 2-core machine; 235 s under heavier load), about
14 s an epoch; transforming 15,000 images took 2 s. Training runs on CUDA when available.
Init, shuffling and augmentation all draw from one ``torch.Generator`` seeded with `SEED` (the
global torch RNG is never touched), so on CPU with the same thread count the same sample gives
the same state; CUDA kernels are not bit-reproducible.

The encoder, augmentation and loss are in :mod:`workers.features.simclr`.

Example:
    >>> import numpy as np
    >>> ex = SelfSupExtractor(FeatureSpec("selfsup", "image", dim=16), epochs=1)
    >>> ex.fit(np.random.default_rng(0).integers(0, 256, (64, 144)), progress=False)
    >>> ex.image_shape, ex.transform(np.zeros((3, 144)), progress=False).shape
    ((1, 12, 12), (3, 16))
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from saelect.workers.features.base import FeatureSpec, as_float_matrix, map_batches
from saelect.workers.features.simclr import (
    augment,
    build_seeded,
    conv_encoder,
    nt_xent,
    projection_head,
    recompute_bn_stats,
)
from saelect.workers.progress import Progress

if TYPE_CHECKING:
    import torch

__all__ = [
    "BATCH_SIZE",
    "EPOCHS",
    "SEED",
    "SELFSUP_DIM",
    "SelfSupExtractor",
    "infer_image_shape",
]

SELFSUP_DIM = 128
"""Encoder output dim when the spec gives none."""
EPOCHS = 8
"""Training epochs over the fit sample (see the module docstring for the cost)."""
SEED = 0
"""Seed of the one generator behind init, shuffling and augmentation."""
BATCH_SIZE = 256
"""Images per training step (each gives two views)."""
LR = 1e-3
"""Adam learning rate."""


def infer_image_shape(d: int, image_shape: tuple[int, int, int] | None) -> tuple[int, int, int]:
    """(C, H, W) of rows with ``d`` values: ``image_shape`` if given, else (1, s, s) or (3, s, s).

    Raises ValueError when ``image_shape`` does not hold ``d`` values, or when it is None and
    ``d`` is neither s^2 nor 3 s^2.

    Example:
        >>> infer_image_shape(784, None), infer_image_shape(3 * 32 * 32, None)
        ((1, 28, 28), (3, 32, 32))
    """
    if image_shape is not None:
        c, h, w = (int(v) for v in image_shape)
        if c * h * w != d:
            raise ValueError(f"image_shape {(c, h, w)} holds {c * h * w} values, the rows have {d}")
        return c, h, w
    for c in (1, 3):
        s = math.isqrt(d // c)
        if d % c == 0 and s >= 1 and s * s * c == d:
            return c, s, s
    raise ValueError(
        f"rows of {d} values are not square images (1, s, s) or (3, s, s); set the feature "
        "spec's image_shape to (C, H, W)"
    )


class SelfSupExtractor:
    """Conv encoder trained with SimCLR on the fit sample: float32 (n, dim) features.

    Parameters
    ----------
    spec: the feature spec (``dim``: output dim, default 128; ``image_shape``: (C, H, W)).
    epochs: training epochs (default `EPOCHS`; tests use fewer).
    device: torch device; default CUDA when available, else CPU.

    After ``fit``, ``losses`` holds the mean NT-Xent loss of each epoch.
    """

    def __init__(
        self, spec: FeatureSpec, *, epochs: int = EPOCHS, device: str | None = None
    ) -> None:
        if isinstance(epochs, bool) or int(epochs) < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs!r}")
        self.spec = spec
        self.epochs = int(epochs)
        self.device = device
        self.out_dim: int | None = None
        self.image_shape: tuple[int, int, int] | None = None
        self.mean_C: np.ndarray | None = None  # float64 (C,)
        self.std_C: np.ndarray | None = None  # float64 (C,)
        self.losses: list[float] = []
        self._enc: Any = None  # torch.nn.Sequential (B, C, H, W) -> (B, out_dim), eval mode

    def _device(self) -> str:
        if self.device is None:
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def _standardized(self, x_ND: np.ndarray) -> torch.Tensor:
        """(n, C, H, W) float32 tensor on the device of standardized rows (n, D)."""
        import torch

        if self.image_shape is None or self.mean_C is None or self.std_C is None:
            raise ValueError("selfsup extractor is not fitted: call fit() or load_state_dict()")
        c = self.image_shape[0]
        dev = self._device()
        x = torch.from_numpy(np.ascontiguousarray(x_ND, dtype=np.float32)).to(dev)
        mean = torch.from_numpy(self.mean_C.astype(np.float32)).to(dev).view(1, c, 1, 1)
        std = torch.from_numpy(self.std_C.astype(np.float32)).to(dev).view(1, c, 1, 1)
        return (x.view(-1, *self.image_shape) - mean) / std

    def fit(self, sample: Any, *, progress: bool = True) -> None:
        """Train the encoder on ``sample`` (n, D) or (n, C, H, W) numeric, n >= 2.

        Raises ValueError for non-numeric or non-finite input, fewer than 2 rows, or rows that
        are not images of a known shape (set ``spec.image_shape``).
        """
        import torch

        x_ND = as_float_matrix(sample, f"column {self.spec.column!r}")
        n, d = x_ND.shape
        self._enc, self.out_dim = None, None  # unfitted until training succeeds
        if n < 2:
            raise ValueError(f"selfsup extractor needs at least 2 rows to fit, got {n}")
        shape = infer_image_shape(d, self.spec.image_shape)
        c = shape[0]
        x_NCP = x_ND.reshape(n, c, -1)
        mean_C = x_NCP.mean(axis=(0, 2), dtype=np.float64)
        std_C = x_NCP.std(axis=(0, 2), dtype=np.float64)
        self.image_shape = shape
        self.mean_C, self.std_C = mean_C, np.where(std_C > 1e-8, std_C, 1.0)
        out_dim = self.spec.dim if self.spec.dim is not None else SELFSUP_DIM
        device = self._device()

        gen = torch.Generator().manual_seed(SEED)
        enc = build_seeded(conv_encoder, c, out_dim, device=device, gen=gen)
        head = build_seeded(projection_head, out_dim, device=device, gen=gen)
        optimizer = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=LR)
        x_NCHW = self._standardized(x_ND)
        bs = min(BATCH_SIZE, n)
        steps = n // bs  # full batches only: every step contrasts bs images
        self.losses = []
        enc.train()
        head.train()
        with Progress(steps * self.epochs, desc="selfsup", progress=progress, unit="step") as bar:
            for _ in range(self.epochs):
                perm_N = torch.randperm(n, generator=gen).to(device)
                total = 0.0
                for step in range(steps):
                    x_BCHW = x_NCHW[perm_N[step * bs : (step + 1) * bs]]
                    views_2BCHW = torch.cat([augment(x_BCHW, gen), augment(x_BCHW, gen)])
                    loss = nt_xent(head(enc(views_2BCHW)))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach())
                    bar.update(1)
                self.losses.append(total / steps)
                bar.set_postfix(loss=f"{self.losses[-1]:.3f}")
        recompute_bn_stats(enc, x_NCHW, bs)
        self._enc = enc
        self.out_dim = out_dim

    def _encode(self, batch: np.ndarray) -> np.ndarray:
        import torch

        x_BD = as_float_matrix(batch, f"column {self.spec.column!r}")
        with torch.no_grad():
            h_BF = self._enc(self._standardized(x_BD))
        return h_BF.float().cpu().numpy()

    def transform(self, values: Any, *, progress: bool = True) -> np.ndarray:
        """float32 (n, out_dim) encoder features of ``values`` (n, D) or (n, C, H, W).

        Raises ValueError when not fitted, or for non-numeric or non-finite input or rows whose
        length differs from the fitted image's C*H*W.
        """
        if self._enc is None or self.out_dim is None or self.image_shape is None:
            raise ValueError("selfsup extractor is not fitted: call fit() or load_state_dict()")
        arr = np.asarray(values)
        as_float_matrix(arr[:1], f"column {self.spec.column!r}")  # numeric and >= 2 dims
        d = math.prod(self.image_shape)
        if math.prod(arr.shape[1:]) != d:
            raise ValueError(
                f"column {self.spec.column!r} has {math.prod(arr.shape[1:])} values per row, "
                f"the selfsup extractor was fitted on images {self.image_shape} ({d} values)"
            )
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            as_float_matrix(arr, f"column {self.spec.column!r}")  # raises naming the row
        self._enc.eval()
        return map_batches(
            self._encode, arr, self.out_dim, self.spec.batch_size, progress=progress, desc="selfsup"
        )

    def state_dict(self) -> dict[str, np.ndarray]:
        """``image_shape`` int64 (3,), ``mean`` and ``std`` float64 (C,), and the encoder's
        parameters and BatchNorm buffers as ``enc.<name>`` (the projection head is dropped)."""
        if (
            self._enc is None
            or self.image_shape is None
            or self.mean_C is None
            or self.std_C is None
        ):
            raise ValueError("selfsup extractor is not fitted: call fit() or load_state_dict()")
        state = {
            "image_shape": np.asarray(self.image_shape, dtype=np.int64),
            "mean": self.mean_C.copy(),
            "std": self.std_C.copy(),
        }
        for name, value in self._enc.state_dict().items():
            state[f"enc.{name}"] = value.detach().cpu().numpy().copy()
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Rebuild the encoder from `state_dict` (on CUDA when available).

        Raises ValueError for a missing or inconsistent entry.
        """
        import torch

        for key in ("image_shape", "mean", "std", "enc.conv3.weight"):
            if key not in state:
                raise ValueError(f"selfsup state has no {key!r}")
        shape_arr = np.asarray(state["image_shape"], dtype=np.int64)
        if shape_arr.shape != (3,) or (shape_arr < 1).any():
            raise ValueError(f"selfsup state has image_shape {shape_arr.tolist()}")
        c, h, w = (int(v) for v in shape_arr)
        mean = np.asarray(state["mean"], dtype=np.float64).reshape(-1)
        std = np.asarray(state["std"], dtype=np.float64).reshape(-1)
        if mean.shape != (c,) or std.shape != (c,) or not (std > 0).all():
            raise ValueError(
                f"selfsup state has mean {mean.shape}, std {std.shape} for {c} channels "
                "(std must be > 0)"
            )
        out_dim = int(np.asarray(state["enc.conv3.weight"]).shape[0])
        enc = build_seeded(conv_encoder, c, out_dim, device=self._device(), gen=None)
        weights = {
            k.removeprefix("enc."): torch.from_numpy(np.array(v))
            for k, v in state.items()
            if k.startswith("enc.")
        }
        try:
            enc.load_state_dict(weights)  # strict: every parameter and buffer, right shapes
        except RuntimeError as exc:
            raise ValueError(f"selfsup state does not fit the encoder: {exc}") from exc
        self.image_shape = (c, h, w)
        self.mean_C, self.std_C = mean, std
        self._enc = enc.eval()
        self.out_dim = out_dim
