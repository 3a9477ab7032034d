"""``epsilon_greedy``: exploit the highest loss EMA, explore at random.

Stage ``exploit`` takes min(round((1 - epsilon) m), samples with feedback) samples with the
highest loss EMA; stage ``explore`` fills the epoch with random others by uniform01(seed, t, i).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from saelect.service.policies.base import Stage, round_half_up
from saelect.service.policies.loss_ema import LossEMAPolicy, random_scores
from saelect.workers.shard_data import ShardData

__all__ = ["EpsilonGreedyParams", "EpsilonGreedyPolicy"]


@dataclass(frozen=True)
class EpsilonGreedyParams:
    """Options of the ``epsilon_greedy`` policy."""

    epsilon: float = 0.1
    """Share of each epoch chosen at random, in [0, 1]."""
    alpha: float = 0.5
    """EMA weight of the newest loss, in (0, 1]."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon={self.epsilon} outside [0, 1]")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha} outside (0, 1]")


class EpsilonGreedyPolicy(LossEMAPolicy):
    """Highest-loss samples plus a random share."""

    name = "epsilon_greedy"
    params_type = EpsilonGreedyParams
    params: EpsilonGreedyParams

    def context(self, epoch: int, partials: list[dict], ctx: dict | None = None) -> dict:
        out = super().context(epoch, partials, ctx)
        out["seen"] = int(sum(p["seen"] for p in partials))
        return out

    def stages(self, epoch: int, ctx: dict) -> list[Stage]:
        size = int(ctx["size"])
        exploit = min(round_half_up((1.0 - self.params.epsilon) * size), ctx["seen"])
        return [Stage("exploit", exploit), Stage("explore", size - exploit)]

    def local_stats(
        self, epoch: int, data: ShardData, counters: dict[str, np.ndarray], ctx: dict | None
    ) -> dict:
        return {"seen": int(np.count_nonzero(counters["seen"] > 0))}

    def local_scores(
        self, stage: Stage, epoch: int, ctx: dict, data: ShardData, counters: dict[str, np.ndarray]
    ) -> np.ndarray:
        seen = counters["seen"] > 0
        if stage.key == "explore":
            return random_scores(self.config.seed, epoch, data, np.ones(data.n, dtype=bool))
        s = counters["ema"].copy()
        s[~seen] = -np.inf
        return s
