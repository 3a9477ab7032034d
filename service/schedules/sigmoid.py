"""Sigmoid schedule shape, rescaled so that f(0) = 0 and f(1) = 1.

f(x) = (s(kappa (x - c)) - s(-kappa c)) / (s(kappa (1 - c)) - s(-kappa c)), s the logistic.
"""

from __future__ import annotations

import math

from saelect.service.schedules.base import ScheduleConfig


def _logistic(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def sigmoid(x: float, config: ScheduleConfig) -> float:
    """Share of the way from lambda_min to lambda_max at progress x in [0, 1]."""
    k, c = config.kappa, config.center
    lo, hi = _logistic(-k * c), _logistic(k * (1.0 - c))
    return (_logistic(k * (x - c)) - lo) / (hi - lo)
