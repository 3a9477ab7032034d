"""Cosine schedule shape: f(x) = (1 - cos(pi x)) / 2 (the default)."""

from __future__ import annotations

import math

from saelect.service.schedules.base import ScheduleConfig


def cosine(x: float, config: ScheduleConfig) -> float:
    """Share of the way from lambda_min to lambda_max at progress x in [0, 1]."""
    return 0.5 * (1.0 - math.cos(math.pi * x))
