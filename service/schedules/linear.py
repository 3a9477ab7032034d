"""Linear schedule shape: f(x) = x."""

from __future__ import annotations

from saelect.service.schedules.base import ScheduleConfig


def linear(x: float, config: ScheduleConfig) -> float:
    """Share of the way from lambda_min to lambda_max at progress x in [0, 1]."""
    return x
