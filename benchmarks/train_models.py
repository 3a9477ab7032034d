"""Models and batch augmentation for the training benchmark (benchmarks/train_bench.py).

Everything here is plain torch on tensors already in memory: no torchvision (it does not import
on this machine), no DataLoader workers. Random choices take an explicit ``torch.Generator``.

- ``SmallCNN``: a compact BatchNorm CNN for 28x28 (Fashion-MNIST) and 8x8 (digits) images.
  Its first convolution has stride 2, which makes it about 3x cheaper than a plain
  two-conv-per-stage CNN on 2 CPU cores while keeping ~91-92% on Fashion-MNIST with augmentation.
- ``MLP``: a two-hidden-layer head for feature vectors (digits pixels, MiniLM text features).
- ``augment_batch``: random crop after zero padding plus optional horizontal flip, as tensor ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class AugmentConfig:
    """Batch augmentation for image tasks."""

    pad: int = 2
    """Zero padding on each side before a random crop back to the input size; 0 disables crops."""
    flip: bool = True
    """Flip each image horizontally with probability 1/2."""

    def __post_init__(self) -> None:
        if self.pad < 0:
            raise ValueError(f"pad must be >= 0, got {self.pad}")


def augment_batch(
    x_BCHW: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """Randomly crop (after zero padding) and flip a batch of images.

    Parameters
    ----------
    x_BCHW: float tensor (B, C, H, W).
    config: padding and flip.
    generator: the source of every random draw (seeded by the caller from (seed, epoch)).

    Returns
    -------
    float tensor (B, C, H, W): each image shifted by an offset in [-pad, pad] on both axes
    (vacated pixels are 0) and, with probability 1/2 when ``config.flip``, mirrored.
    """
    B, C, H, W = x_BCHW.shape
    out_BCHW = x_BCHW
    p = config.pad
    if p > 0:
        padded_BCHW = torch.nn.functional.pad(x_BCHW, (p, p, p, p))
        dy_B = torch.randint(0, 2 * p + 1, (B,), generator=generator)
        dx_B = torch.randint(0, 2 * p + 1, (B,), generator=generator)
        rows_BH = dy_B[:, None] + torch.arange(H)[None, :]
        cols_BW = dx_B[:, None] + torch.arange(W)[None, :]
        out_BCHW = padded_BCHW[
            torch.arange(B)[:, None, None, None],
            torch.arange(C)[None, :, None, None],
            rows_BH[:, None, :, None],
            cols_BW[:, None, None, :],
        ]
    if config.flip:
        flip_B = torch.rand(B, generator=generator) < 0.5
        out_BCHW = torch.where(flip_B[:, None, None, None], out_BCHW.flip(-1), out_BCHW)
    return out_BCHW


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(nn.Module):
    """Conv(stride 2) -> Conv -> pool -> Conv -> pool -> MLP head, with BatchNorm.

    Parameters
    ----------
    in_channels, num_classes: input channels and classes.
    image_size: H = W of the input (28 for Fashion-MNIST, 8 for digits).
    width: channels of the first stage; later stages use 2x and 4x.
    hidden: units of the hidden layer of the head.
    dropout: dropout before the last layer.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        image_size: int = 28,
        width: int = 16,
        hidden: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if width < 1 or hidden < 1:
            raise ValueError(f"width and hidden must be >= 1, got {width}, {hidden}")
        stride = 2 if image_size >= 16 else 1
        side = (image_size + 1) // 2 if stride == 2 else image_size
        side = side // 2 // 2
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for SmallCNN")
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, width, stride),
            *_conv_bn_relu(width, 2 * width),
            nn.MaxPool2d(2),
            *_conv_bn_relu(2 * width, 4 * width),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(4 * width * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for images (B, C, H, W)."""
        return self.head(self.features(x_BCHW))


class MLP(nn.Module):
    """Linear -> ReLU -> Dropout, twice, then a linear classifier; input (B, D)."""

    def __init__(
        self, in_dim: int, num_classes: int, *, hidden: int = 256, dropout: float = 0.2
    ) -> None:
        super().__init__()
        if in_dim < 1 or hidden < 1:
            raise ValueError(f"in_dim and hidden must be >= 1, got {in_dim}, {hidden}")
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for feature vectors (B, D)."""
        return self.net(x_BD.flatten(1))


@dataclass(frozen=True)
class ModelConfig:
    """Which model a task trains, and its size."""

    kind: str
    """"cnn" (SmallCNN on images) or "mlp" (MLP on flattened inputs)."""
    width: int = 16
    """cnn: channels of the first stage."""
    hidden: int = 128
    """Hidden units of the head (cnn) or of both hidden layers (mlp)."""
    dropout: float = 0.1
    """Dropout before the classifier."""

    def __post_init__(self) -> None:
        if self.kind not in ("cnn", "mlp"):
            raise ValueError(f"model kind must be 'cnn' or 'mlp', got {self.kind!r}")
        if self.width < 1 or self.hidden < 1:
            raise ValueError(f"width and hidden must be >= 1, got {self.width}, {self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def make_model(
    config: ModelConfig, input_shape: tuple[int, ...], num_classes: int, *, seed: int
) -> nn.Module:
    """Build the model for inputs of ``input_shape`` (one sample: (C, H, W) or (D,)).

    The initial weights depend only on ``seed`` (a local generator state is forked).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if config.kind == "cnn":
            if len(input_shape) != 3:
                raise ValueError(f"cnn needs (C, H, W) inputs, got shape {input_shape}")
            c, h, _ = input_shape
            return SmallCNN(
                c,
                num_classes,
                image_size=h,
                width=config.width,
                hidden=config.hidden,
                dropout=config.dropout,
            )
        in_dim = 1
        for s in input_shape:
            in_dim *= s
        return MLP(in_dim, num_classes, hidden=config.hidden, dropout=config.dropout)
