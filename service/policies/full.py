"""``full``: every sample in every epoch (the full-data baseline; the ratio is ignored)."""

from __future__ import annotations

import numpy as np
from saelect.service.policies.base import Policy, Stage
from saelect.workers.shard_data import ShardData


class FullPolicy(Policy):
    """All N samples, every epoch."""

    name = "full"

    def plan(self, num_samples: int) -> list[int]:
        return [num_samples] * self.config.epochs

    def stages(self, epoch: int, ctx: dict) -> list[Stage]:
        return [Stage("all", int(ctx["num_samples"]))]

    def local_scores(
        self, stage: Stage, epoch: int, ctx: dict, data: ShardData, counters: dict[str, np.ndarray]
    ) -> np.ndarray:
        return np.zeros(data.n)
