"""``rs2``: dynamic random selection without replacement.

Epochs form rounds of K = ceil(N / m) epochs (= ceil(1 / r) when r N is an integer). Within a
round, samples not yet used in the round rank above used ones, and equals are ordered by
uniform01(seed, t, random stream, i). Since K m >= N, every sample is selected at least once in
every round, i.e. at least once every K epochs from the round start.

Option ``class_quotas`` (a class-balanced random rotation, no scores; the baseline that keeps a
class-balance gain from being credited to a scoring policy): ``"none"`` (default, the plain
rotation above), ``"proportional"`` (every class keeps its share of every epoch, per-class counts
by largest remainder as in ``factor``'s quotas) or ``"equal"`` (the same count for every class,
capped at the class size, the rest filled water-level over the classes that still have samples:
class-balanced sampling for long-tailed data). Within a class the rotation is as above: samples
not yet used in the round first, then uniform01 order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from saelect.service.policies.base import Policy, Stage, add_counts, epoch_size
from saelect.service.selection.hashing import STREAM_RANDOM, uniform01
from saelect.workers.shard_data import ShardData

__all__ = ["RS2Params", "RS2Policy", "equal_quotas", "round_length"]

QUOTA_MODES = ("none", "proportional", "equal")


@dataclass(frozen=True)
class RS2Params:
    """Options of the ``rs2`` policy."""

    class_quotas: str = "none"
    """``none`` (plain rotation), ``proportional`` (every class keeps its share of each epoch) or
    ``equal`` (the same count per class, capped at the class size). Quotas need labels."""

    def __post_init__(self) -> None:
        if self.class_quotas not in QUOTA_MODES:
            raise ValueError(
                f"class_quotas={self.class_quotas!r} must be one of {', '.join(QUOTA_MODES)}"
            )


def equal_quotas(size: int, counts: np.ndarray) -> np.ndarray:
    """int64 (C,) per-class counts summing to min(size, N): as equal as the class sizes allow.

    Water-filling: every class gets the same level L, capped at its count n_c, with L the
    largest integer level whose total stays <= size; the remainder goes one each to the
    uncapped classes in class-id order.

    Example:
        >>> equal_quotas(10, np.array([100, 2, 100])).tolist()
        [4, 2, 4]
    """
    counts = np.asarray(counts, dtype=np.int64)
    size = min(int(size), int(counts.sum()))
    if size <= 0 or counts.shape[0] == 0:
        return np.zeros_like(counts)
    lo, hi = 0, int(counts.max())
    while lo < hi:  # largest L with sum(min(n_c, L)) <= size
        mid = (lo + hi + 1) // 2
        if int(np.minimum(counts, mid).sum()) <= size:
            lo = mid
        else:
            hi = mid - 1
    quotas = np.minimum(counts, lo)
    extra = size - int(quotas.sum())
    open_ids = np.flatnonzero(quotas < counts)
    quotas[open_ids[:extra]] += 1
    return quotas


def class_quota_counts(mode: str, size: int, counts: np.ndarray) -> np.ndarray:
    """int64 (C,) per-class counts of an epoch of ``size`` for quota mode ``mode``."""
    from saelect.service.policies.factor import largest_remainder

    if mode == "proportional":
        return largest_remainder(size, counts)
    if mode == "equal":
        return equal_quotas(size, counts)
    raise ValueError(f"no quotas for class_quotas={mode!r}")


def round_length(num_samples: int, ratio: float) -> int:
    """K = ceil(N / m): epochs per round of rs2."""
    m = epoch_size(ratio, num_samples)
    return max(1, -(-num_samples // m)) if m else 1


class RS2Policy(Policy):
    """Random subsets that sweep the data without replacement, round by round."""

    name = "rs2"
    params_type = RS2Params
    params: RS2Params

    def context(self, epoch: int, partials: list[dict], ctx: dict | None = None) -> dict:
        out = super().context(epoch, partials, ctx)
        mode = self.params.class_quotas
        if mode == "none":
            k = round_length(out["num_samples"], self.config.ratio)
        else:
            counts = add_counts([p["class_counts"] for p in partials])
            quotas = class_quota_counts(mode, out["size"], counts)
            out["quotas"] = quotas.tolist()
            # a round is as long as the slowest class needs to use all of its samples once
            live = quotas > 0
            k = int(np.max(-(-counts[live] // quotas[live]))) if live.any() else 1
        out["round_start"] = (epoch // k) * k
        return out

    def stages(self, epoch: int, ctx: dict) -> list[Stage]:
        if "quotas" in ctx:
            return [Stage("classes", int(sum(ctx["quotas"])), tuple(ctx["quotas"]))]
        return [Stage("main", int(ctx["size"]))]

    def local_stats(
        self, epoch: int, data: ShardData, counters: dict[str, np.ndarray], ctx: dict | None
    ) -> dict:
        if self.params.class_quotas == "none":
            return {}
        if data.labels is None:
            raise ValueError(f"rs2 class_quotas={self.params.class_quotas!r} needs labels")
        return {"class_counts": data.derived.class_counts()}

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
