"""Schedule configuration and the progress variable shared by every shape (docs/architecture.md,
The method 6)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SHAPES", "ScheduleConfig", "progress"]

SHAPES = ("cosine", "linear", "sigmoid", "constant")
"""Names of the schedule shapes; each has one module in this package."""


@dataclass(frozen=True)
class ScheduleConfig:
    """How lambda(t) moves from ``lambda_min`` to ``lambda_max`` over the epochs."""

    shape: str = "cosine"
    """One of ``cosine`` (default), ``linear``, ``sigmoid``, ``constant`` (stays at lambda_min)."""
    lambda_min: float = 0.0
    """Value at the start (and during warm-up), in [0, 1]."""
    lambda_max: float = 1.0
    """Value at the last epoch, in [0, 1] (may be below lambda_min for a reversed schedule)."""
    warmup_epochs: int = 0
    """Epochs held at lambda_min before the schedule starts to move, >= 0."""
    kappa: float = 10.0
    """Steepness of the ``sigmoid`` shape, > 0."""
    center: float = 0.5
    """Midpoint of the ``sigmoid`` shape as a share of the moving span, in [0, 1]."""

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown schedule shape {self.shape!r}; known: {', '.join(SHAPES)}")
        for name in ("lambda_min", "lambda_max"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} outside [0, 1]")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be >= 0")
        if not self.kappa > 0:
            raise ValueError(f"kappa={self.kappa} must be > 0")
        if not 0.0 <= self.center <= 1.0:
            raise ValueError(f"center={self.center} outside [0, 1]")


def progress(t: int, epochs: int, warmup_epochs: int) -> float:
    """Share x in [0, 1] of the schedule covered at epoch t.

    x = 0 through the warm-up, then grows linearly to 1 at the last epoch ``epochs - 1``. A
    span of a single epoch stays at x = 0.
    """
    if epochs < 1:
        raise ValueError(f"epochs={epochs} must be >= 1")
    if t < 0:
        raise ValueError(f"epoch t={t} must be >= 0")
    span = epochs - 1 - warmup_epochs
    if t <= warmup_epochs or span <= 0:
        return 0.0
    return min(1.0, (t - warmup_epochs) / span)
