"""``infobatch``: soft pruning of well-learned samples from loss feedback (InfoBatch).

In a pruning epoch t < delta T with some losses known: mean = mean of the known last losses;
the "low" samples are those whose last loss is below the mean; exactly n_prune = round(prune_ratio
n_low) of them are pruned, chosen by uniform01(seed, t, prune stream, i) (the highest draws are
kept). Samples with no loss yet and the others are always kept. Kept low samples get the loss weight
min(1 / (1 - prune_ratio), max_weight); every other weight is 1. Epochs t >= delta T take all data.

Size accounting: an epoch's size is N - n_prune, which depends on the feedback, so it is known
exactly once the epoch is computed. ``plan`` reports computed epochs exactly and predicts the
others: N for full-data epochs and epoch 0, otherwise N - round(prune_ratio n_low) with the last
observed n_low (N / 2 before any).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from saelect.service.policies.base import Policy, PolicyConfig, Stage, check_losses, round_half_up
from saelect.service.selection.hashing import STREAM_PRUNE, uniform01
from saelect.workers.shard_data import ShardData

__all__ = ["InfoBatchParams", "InfoBatchPolicy"]


@dataclass(frozen=True)
class InfoBatchParams:
    """Options of the ``infobatch`` policy."""

    prune_ratio: float = 0.5
    """Share of the below-mean-loss samples pruned per epoch, in [0, 1]."""
    delta: float = 0.875
    """Pruning stops at epoch delta T (the rest is full data), in [0, 1]."""
    max_weight: float = 10.0
    """Cap of the 1 / (1 - prune_ratio) rescaling weight, >= 1."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.prune_ratio <= 1.0:
            raise ValueError(f"prune_ratio={self.prune_ratio} outside [0, 1]")
        if not 0.0 <= self.delta <= 1.0:
            raise ValueError(f"delta={self.delta} outside [0, 1]")
        if not self.max_weight >= 1.0:
            raise ValueError(f"max_weight={self.max_weight} must be >= 1")


class InfoBatchPolicy(Policy):
    """Loss-feedback soft pruning with rescaled weights."""

    name = "infobatch"
    needs_feedback = True
    stat_rounds = 2
    params_type = InfoBatchParams
    params: InfoBatchParams

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__(config)
        self._sizes: dict[int, int] = {}  # epoch -> size of computed epochs
        self._last_low: int | None = None  # n_low of the last pruning epoch

    def _pruning(self, epoch: int) -> bool:
        return epoch < self.params.delta * self.config.epochs

    @property
    def keep_weight(self) -> float:
        """Weight of a kept below-mean sample."""
        keep = 1.0 - self.params.prune_ratio
        return self.params.max_weight if keep <= 0 else min(1.0 / keep, self.params.max_weight)

    # ----------------------------------------------------------------- coordinator side
    def plan(self, num_samples: int) -> list[int]:
        sizes = []
        low = num_samples // 2 if self._last_low is None else self._last_low
        for t in range(self.config.epochs):
            if t in self._sizes:
                sizes.append(self._sizes[t])
            elif t == 0 or not self._pruning(t):
                sizes.append(num_samples)
            else:
                sizes.append(num_samples - round_half_up(self.params.prune_ratio * low))
        return sizes

    def context(self, epoch: int, partials: list[dict], ctx: dict | None = None) -> dict:
        n = int(sum(p["n"] for p in partials))
        if ctx is None:  # round 1: the mean of the known losses
            count = int(sum(p["loss_count"] for p in partials))
            mean = float(sum(p["loss_sum"] for p in partials)) / count if count else None
            prune = self._pruning(epoch) and mean is not None
            return {"num_samples": n, "mean": mean, "prune": prune, "size": n}
        out = dict(ctx)  # round 2: how many are below the mean
        if out["prune"]:
            low = int(sum(p["low"] for p in partials))
            self._last_low = low
            out["size"] = n - round_half_up(self.params.prune_ratio * low)
        self._sizes[epoch] = out["size"]
        return out

    def stages(self, epoch: int, ctx: dict) -> list[Stage]:
        return [Stage("keep", int(ctx["size"]))]

    def state_dict(self) -> dict:
        return {"sizes": dict(self._sizes), "last_low": self._last_low}

    def load_state_dict(self, state: dict) -> None:
        self._sizes = {int(k): int(v) for k, v in state["sizes"].items()}
        self._last_low = None if state["last_low"] is None else int(state["last_low"])

    # ----------------------------------------------------------------- shard side
    def init_counters(self, n: int) -> dict[str, np.ndarray]:
        return {"loss": np.full(n, np.nan)}

    def local_stats(
        self, epoch: int, data: ShardData, counters: dict[str, np.ndarray], ctx: dict | None
    ) -> dict:
        loss = counters["loss"]
        if ctx is None:
            known = ~np.isnan(loss)
            return {"loss_sum": float(loss[known].sum()), "loss_count": int(known.sum())}
        low = int(np.count_nonzero(loss < ctx["mean"])) if ctx["prune"] else 0
        return {"low": low}

    def _low(self, ctx: dict, counters: dict[str, np.ndarray]) -> np.ndarray:
        if not ctx["prune"]:
            return np.zeros(counters["loss"].shape[0], dtype=bool)
        return counters["loss"] < ctx["mean"]  # NaN (unknown) compares False

    def local_scores(
        self, stage: Stage, epoch: int, ctx: dict, data: ShardData, counters: dict[str, np.ndarray]
    ) -> np.ndarray:
        s = np.ones(data.n)
        low = np.flatnonzero(self._low(ctx, counters))
        s[low] = uniform01(self.config.seed, epoch, STREAM_PRUNE, low + data.lo) - 1.0
        return s

    def weights(
        self,
        epoch: int,
        ctx: dict,
        data: ShardData,
        counters: dict[str, np.ndarray],
        selected_local: np.ndarray,
    ) -> np.ndarray | None:
        w = np.ones(selected_local.shape[0])
        w[self._low(ctx, counters)[selected_local]] = self.keep_weight
        return w

    def feedback(
        self,
        data: ShardData,
        counters: dict[str, np.ndarray],
        local_idx: np.ndarray,
        losses: np.ndarray,
    ) -> None:
        check_losses(local_idx, losses)
        counters["loss"][local_idx] = losses
