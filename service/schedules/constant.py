"""Constant schedule shape: lambda stays at lambda_min for every epoch."""

from __future__ import annotations

from saelect.service.schedules.base import ScheduleConfig


def constant(x: float, config: ScheduleConfig) -> float:
    """Always 0: the schedule never leaves lambda_min."""
    return 0.0
