"""Shared pieces of the loss-feedback policies (``ucb``, ``epsilon_greedy``): a per-sample EMA
of the losses posted through the API, and random scores for exploration stages."""

from __future__ import annotations

from typing import Any

import numpy as np
from saelect.service.policies.base import Policy, check_losses
from saelect.service.selection.hashing import STREAM_RANDOM, uniform01
from saelect.workers.shard_data import ShardData

__all__ = ["LossEMAPolicy", "ema_counters", "ema_feedback", "random_scores"]


def ema_counters(n: int) -> dict[str, np.ndarray]:
    """Per-sample loss EMA (float64 (n,)) and feedback count (int32 (n,))."""
    return {"ema": np.zeros(n), "seen": np.zeros(n, dtype=np.int32)}


def ema_feedback(
    counters: dict[str, np.ndarray], local_idx: np.ndarray, losses: np.ndarray, alpha: float
) -> None:
    """Fold losses into the EMA counters (first loss sets the EMA)."""
    check_losses(local_idx, losses)
    ema, seen = counters["ema"], counters["seen"]
    old = ema[local_idx]
    ema[local_idx] = np.where(seen[local_idx] > 0, (1.0 - alpha) * old + alpha * losses, losses)
    seen[local_idx] += 1


def random_scores(seed: int, epoch: int, data: ShardData, eligible: np.ndarray) -> np.ndarray:
    """uniform01(seed, epoch, random stream, i) where eligible, -inf elsewhere (float64 (n,))."""
    s = uniform01(seed, epoch, STREAM_RANDOM, np.arange(data.lo, data.hi, dtype=np.int64))
    s[~eligible] = -np.inf
    return s


class LossEMAPolicy(Policy):
    """Base of policies that rank samples by an EMA of their loss feedback.

    Subclasses' params carry ``alpha``, the EMA weight of the newest loss.
    """

    needs_feedback = True
    params: Any

    def init_counters(self, n: int) -> dict[str, np.ndarray]:
        return ema_counters(n)

    def feedback(
        self,
        data: ShardData,
        counters: dict[str, np.ndarray],
        local_idx: np.ndarray,
        losses: np.ndarray,
    ) -> None:
        ema_feedback(counters, local_idx, losses, self.params.alpha)
