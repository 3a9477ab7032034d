"""``rs2``: dynamic random selection without replacement.

Epochs form rounds of K = ceil(N / m) epochs (= ceil(1 / r) when r N is an integer). Within a
round, samples not yet used in the round rank above used ones, and equals are ordered by
uniform01(seed, t, random stream, i). Since K m >= N, every sample is selected at least once in
every round, i.e. at least once every K epochs from the round start.
"""

from __future__ import annotations

import numpy as np

from service.policies.base import Policy, Stage, epoch_size
from service.selection.hashing import STREAM_RANDOM, uniform01
from workers.selection_shard import ShardData


def round_length(num_samples: int, ratio: float) -> int:
    """K = ceil(N / m): epochs per round of rs2."""
    m = epoch_size(ratio, num_samples)
    return max(1, -(-num_samples // m)) if m else 1


class RS2Policy(Policy):
    """Random subsets that sweep the data without replacement, round by round."""

    name = "rs2"

    def context(self, epoch: int, partials: list[dict], ctx: dict | None = None) -> dict:
        out = super().context(epoch, partials, ctx)
        k = round_length(out["num_samples"], self.config.ratio)
        out["round_start"] = (epoch // k) * k
        return out

    def init_counters(self, n: int) -> dict[str, np.ndarray]:
        return {"last_used": np.full(n, -1, dtype=np.int32)}

    def local_scores(
        self, stage: Stage, epoch: int, ctx: dict, data: ShardData, counters: dict[str, np.ndarray]
    ) -> np.ndarray:
        gidx = np.arange(data.lo, data.hi, dtype=np.int64)
        s = uniform01(self.config.seed, epoch, STREAM_RANDOM, gidx)
        s += counters["last_used"] < ctx["round_start"]  # +1 for samples unused in this round
        return s

    def commit(
        self,
        epoch: int,
        ctx: dict,
        data: ShardData,
        counters: dict[str, np.ndarray],
        selected_local: np.ndarray,
    ) -> dict:
        counters["last_used"][selected_local] = epoch
        return {}
