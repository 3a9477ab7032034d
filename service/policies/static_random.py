"""``static_random``: the same random m samples in every epoch.

Sample i's score is uniform01(seed, 0, random stream, i) for every epoch, so the subset never
changes (only its shuffled order does).
"""

from __future__ import annotations

import numpy as np
from saelect.service.policies.base import Policy, Stage
from saelect.service.selection.hashing import STREAM_RANDOM, uniform01
from saelect.workers.shard_data import ShardData


class StaticRandomPolicy(Policy):
    """A fixed random subset of size m."""

    name = "static_random"

    def local_scores(
        self, stage: Stage, epoch: int, ctx: dict, data: ShardData, counters: dict[str, np.ndarray]
    ) -> np.ndarray:
        gidx = np.arange(data.lo, data.hi, dtype=np.int64)
        return uniform01(self.config.seed, 0, STREAM_RANDOM, gidx)
