"""Smooth schedules lambda(t) from representativeness to diversity (docs/architecture.md, The
method 6).

One module per shape, dispatched by name from :data:`SCHEDULES`.

Example:
    >>> lambda_at(0, 10, ScheduleConfig()), lambda_at(9, 10, ScheduleConfig())
    (0.0, 1.0)
"""

from __future__ import annotations

from collections.abc import Callable

from saelect.service.schedules.base import SHAPES, ScheduleConfig, progress
from saelect.service.schedules.constant import constant
from saelect.service.schedules.cosine import cosine
from saelect.service.schedules.linear import linear
from saelect.service.schedules.sigmoid import sigmoid

__all__ = ["SCHEDULES", "SHAPES", "ScheduleConfig", "lambda_at", "progress"]

SCHEDULES: dict[str, Callable[[float, ScheduleConfig], float]] = {
    "cosine": cosine,
    "linear": linear,
    "sigmoid": sigmoid,
    "constant": constant,
}
"""Shape name -> f(x, config), the share in [0, 1] of the way from lambda_min to lambda_max."""


def lambda_at(t: int, epochs: int, config: ScheduleConfig) -> float:
    """lambda(t) for epoch t of ``epochs``.

    Parameters
    ----------
    t:
        Epoch, ``t >= 0`` (epochs past the last one stay at the final value).
    epochs:
        Total epochs T >= 1.
    config:
        The schedule.

    Returns
    -------
    float: lambda_min + f(x) (lambda_max - lambda_min), x the progress of :func:`progress`.
    """
    x = progress(t, epochs, config.warmup_epochs)
    f = SCHEDULES[config.shape](x, config)
    return config.lambda_min + f * (config.lambda_max - config.lambda_min)
