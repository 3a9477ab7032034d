"""``factor_loss``: rare-factor diversity plus the trainer's loss, with outlier losses clipped.

A hybrid of ``factor``'s diversity and the loss-based policies (beyond the paper; issue 15). Per
epoch t, for every sample i:

    s_i(t) = (1 - beta) D_i + beta L_i(t) - gamma u_i / max(t, 1) + tau Gumbel(seed, t, i)

D_i is the rank-normalized rare-factor diversity of the scoring (in [0, 1]); u_i counts the
epochs that selected i. L_i(t) is the loss term: r_i, the rank (CDF, in [0, 1]) of i's loss EMA
among the samples with feedback, passed through a hump clipped at the quantile q =
``clip_quantile``:

    L_i = r_i                         for r_i <= q
    L_i = q (1 - r_i) / (1 - q)       for r_i > q   (the highest losses fall back to 0)

so hard samples are preferred up to the q-th quantile, and the outlier losses above it (where
mislabelled samples sit: a wrong label keeps its loss high) are not chased. Samples without
feedback yet get L = q. The CDF comes from a global histogram of log(1 + EMA) over
``LOSS_BINS`` bins (one stats round), so the shards agree on it exactly.

``class_quotas``: ``auto`` (default: proportional when the data has labels, none otherwise),
``none``, ``proportional`` or ``equal`` (as in ``rs2``'s option).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from saelect.service.policies.base import Stage, add_counts
from saelect.service.policies.loss_ema import LossEMAPolicy
from saelect.service.policies.rs2 import class_quota_counts
from saelect.service.selection.hashing import STREAM_GUMBEL, gumbel
from saelect.workers.shard_data import ShardData

__all__ = ["LOSS_BINS", "FactorLossParams", "FactorLossPolicy", "hump", "loss_bins"]

LOSS_BINS = 1024
"""Bins of the loss histogram over log(1 + loss) in [0, log(1 + LOSS_MAX)]."""
LOSS_MAX = 50.0
"""Losses above this fall in the last bin."""


@dataclass(frozen=True)
class FactorLossParams:
    """Options of the ``factor_loss`` policy."""

    beta: float = 0.5
    """Weight of the loss term against diversity, in [0, 1] (0: diversity only)."""
    clip_quantile: float = 0.8
    """q in (0, 1]: loss ranks above q are treated as suspected label noise (1: no clipping)."""
    alpha: float = 0.5
    """EMA weight of the newest loss, in (0, 1]."""
    gamma: float = 2.0
    """Usage-penalty strength, >= 0."""
    tau: float = 1.0
    """Gumbel noise scale, >= 0."""
    class_quotas: str = "auto"
    """``auto``, ``none``, ``proportional`` or ``equal``."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta={self.beta} outside [0, 1]")
        if not 0.0 < self.clip_quantile <= 1.0:
            raise ValueError(f"clip_quantile={self.clip_quantile} outside (0, 1]")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha} outside (0, 1]")
        if not self.gamma >= 0:
            raise ValueError(f"gamma={self.gamma} must be >= 0")
        if not self.tau >= 0:
            raise ValueError(f"tau={self.tau} must be >= 0")
        if self.class_quotas not in ("auto", "none", "proportional", "equal"):
            raise ValueError(
                f"class_quotas={self.class_quotas!r} must be auto, none, proportional or equal"
            )


def loss_bins(loss: np.ndarray) -> np.ndarray:
    """int64 (n,) histogram bin of each loss (>= 0) on the log(1 + loss) grid."""
    scaled = np.log1p(np.maximum(loss, 0.0)) * (LOSS_BINS / np.log1p(LOSS_MAX))
    return np.minimum(scaled.astype(np.int64), LOSS_BINS - 1)


def hump(rank: np.ndarray, q: float) -> np.ndarray:
    """float64 (n,) the clipped loss term of ranks in [0, 1]: rank up to q, then down to 0 at 1.

    Example:
        >>> hump(np.array([0.0, 0.4, 0.8, 0.9, 1.0]), 0.8).round(3).tolist()
        [0.0, 0.4, 0.8, 0.4, 0.0]
    """
    rank = np.asarray(rank, dtype=np.float64)
    if q >= 1.0:
        return rank.copy()
    return np.where(rank <= q, rank, q * (1.0 - rank) / (1.0 - q))


class FactorLossPolicy(LossEMAPolicy):
    """Rare-factor diversity plus a clipped loss rank, rotated by a usage penalty."""

    name = "factor_loss"
    params_type = FactorLossParams
    params: FactorLossParams

    # ----------------------------------------------------------------- coordinator side
    def context(self, epoch: int, partials: list[dict], ctx: dict | None = None) -> dict:
        out = super().context(epoch, partials, ctx)
        hist = add_counts([p["loss_hist"] for p in partials]).astype(np.float64)
        seen = hist.sum()
        # cdf_mid[b]: rank of a loss in bin b (mid-bin: half of its own bin counted below)
        below = np.concatenate([[0.0], np.cumsum(hist)[:-1]])
        out["loss_cdf"] = ((below + 0.5 * hist) / seen).tolist() if seen else None
        mode = self.params.class_quotas
        has_counts = all("class_counts" in p for p in partials)
        if mode == "auto":
            mode = "proportional" if has_counts else "none"
        if mode != "none":
            counts = add_counts([p["class_counts"] for p in partials])
            out["quotas"] = class_quota_counts(mode, out["size"], counts).tolist()
        return out

    def stages(self, epoch: int, ctx: dict) -> list[Stage]:
        if "quotas" in ctx:
            return [Stage("classes", int(sum(ctx["quotas"])), tuple(ctx["quotas"]))]
        return [Stage("main", int(ctx["size"]))]

    # ----------------------------------------------------------------- shard side (the loss
    # EMA counters and their feedback come from LossEMAPolicy)
    def local_stats(
        self, epoch: int, data: ShardData, counters: dict[str, np.ndarray], ctx: dict | None
    ) -> dict:
        if data.D is None:
            raise ValueError("policy 'factor_loss' needs D in the shard data")
        seen = counters["seen"] > 0
        out: dict = {
            "loss_hist": np.bincount(loss_bins(counters["ema"][seen]), minlength=LOSS_BINS)
        }
        if self.params.class_quotas in ("proportional", "equal") and data.labels is None:
            raise ValueError(f"class_quotas={self.params.class_quotas!r} needs labels")
        if self.params.class_quotas != "none" and data.labels is not None:
            out["class_counts"] = data.derived.class_counts()
        return out

    def loss_term(self, ctx: dict, counters: dict[str, np.ndarray]) -> np.ndarray:
        """float64 (n,) L_i(t) of the shard's samples (q where there is no feedback yet)."""
        q = self.params.clip_quantile
        seen = counters["seen"] > 0
        out = np.full(seen.shape[0], q)
        if ctx.get("loss_cdf") is not None and seen.any():
            cdf = np.asarray(ctx["loss_cdf"], dtype=np.float64)
            out[seen] = hump(cdf[loss_bins(counters["ema"][seen])], q)
        return out

    def local_scores(
        self, stage: Stage, epoch: int, ctx: dict, data: ShardData, counters: dict[str, np.ndarray]
    ) -> np.ndarray:
        if data.D is None:
            raise ValueError("policy 'factor_loss' needs D in the shard data")
        beta = self.params.beta
        s = np.multiply(np.asarray(data.D, dtype=np.float64), 1.0 - beta)
        if beta > 0:
            s += beta * self.loss_term(ctx, counters)
        if self.params.gamma > 0:
            s -= counters["usage"] * (self.params.gamma / max(epoch, 1))
        if self.params.tau > 0:
            noise = gumbel(self.config.seed, epoch, STREAM_GUMBEL, np.arange(data.lo, data.hi))
            s += self.params.tau * noise
        return s
