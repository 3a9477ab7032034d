"""``ucb``: upper-confidence-bound selection on an EMA of per-sample loss feedback.

Samples without feedback yet come first (stage ``unseen``, random order by uniform01(seed, t, i));
the rest of the epoch (stage ``ucb``) is the top by ema_i + c sqrt(log(t + 1) / (n_i + 1)), n_i
the number of losses received for i. EMA: the first loss sets it, later ones
ema <- (1 - alpha) ema + alpha loss. Within one feedback call a repeated index counts once (the
last value).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from saelect.service.policies.base import Stage
from saelect.service.policies.loss_ema import LossEMAPolicy, random_scores
from saelect.workers.shard_data import ShardData

__all__ = ["UCBParams", "UCBPolicy"]


@dataclass(frozen=True)
class UCBParams:
    """Options of the ``ucb`` policy."""

    alpha: float = 0.5
    """EMA weight of the newest loss, in (0, 1]."""
    c: float = 1.0
    """Exploration bonus scale, >= 0."""

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha} outside (0, 1]")
        if not self.c >= 0:
            raise ValueError(f"c={self.c} must be >= 0")


class UCBPolicy(LossEMAPolicy):
    """Loss EMA plus a count-based exploration bonus."""

    name = "ucb"
    params_type = UCBParams
    params: UCBParams

    def context(self, epoch: int, partials: list[dict], ctx: dict | None = None) -> dict:
        out = super().context(epoch, partials, ctx)
        out["unseen"] = int(sum(p["unseen"] for p in partials))
        return out

    def stages(self, epoch: int, ctx: dict) -> list[Stage]:
        first = min(int(ctx["size"]), ctx["unseen"])
        return [Stage("unseen", first), Stage("ucb", int(ctx["size"]) - first)]

    def local_stats(
        self, epoch: int, data: ShardData, counters: dict[str, np.ndarray], ctx: dict | None
    ) -> dict:
        return {"unseen": int(np.count_nonzero(counters["seen"] == 0))}

    def local_scores(
        self, stage: Stage, epoch: int, ctx: dict, data: ShardData, counters: dict[str, np.ndarray]
    ) -> np.ndarray:
        seen = counters["seen"]
        if stage.key == "unseen":
            return random_scores(self.config.seed, epoch, data, seen == 0)
        bonus = np.sqrt(np.log(epoch + 1.0) / (seen + 1.0))
        s = counters["ema"] + self.params.c * bonus
        s[seen == 0] = -np.inf
        return s
