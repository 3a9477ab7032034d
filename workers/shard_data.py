"""What one shard knows about its samples, and the policy's side that runs where they live.

:class:`ShardData` holds the samples of one contiguous global index range [lo, hi): their scores,
labels and SAE codes (arrays indexed by local position). :class:`ShardPolicy` is the part of a
selection policy that a :class:`workers.selection_shard.SelectionShard` calls; the policy object
is passed in, so this module stays pure numpy and never imports ``service``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from saelect.workers.shard_derived import ShardDerived

__all__ = ["ShardData", "ShardPolicy"]


@dataclass(frozen=True, eq=False)
class ShardData:
    """What one shard knows about its samples [lo, hi) (arrays are indexed by local position).

    Read-only structures derived from these arrays (the label layout, the codes as a sparse
    matrix) are built on first use by :attr:`derived` and never travel with a pickled copy.
    """

    lo: int
    """First global index of the shard."""
    hi: int
    """One past the last global index (hi >= lo)."""
    R: np.ndarray | None = None
    """float64 (n,) representativeness in [0, 1], or None."""
    D: np.ndarray | None = None
    """float64 (n,) rare-factor diversity in [0, 1], or None."""
    labels: np.ndarray | None = None
    """int64 (n,) class labels >= 0, or None."""
    code_ids: np.ndarray | None = None
    """int32 (n, k) active SAE unit ids per sample, or None."""
    code_values: np.ndarray | None = None
    """float (n, k) activations of those units (float16 as stored), or None."""
    p: np.ndarray | None = None
    """float64 (M,) global factor frequencies p_j (the same on every shard), or None."""

    def __post_init__(self) -> None:
        if self.lo < 0 or self.hi < self.lo:
            raise ValueError(f"shard range [lo={self.lo}, hi={self.hi}) is invalid")
        n = self.hi - self.lo
        for name in ("R", "D", "labels", "code_ids", "code_values"):
            arr = getattr(self, name)
            if arr is not None and arr.shape[0] != n:
                raise ValueError(f"{name} has {arr.shape[0]} rows, shard [lo, hi) holds {n}")
        if (self.code_ids is None) != (self.code_values is None):
            raise ValueError("code_ids and code_values come together")
        if self.code_ids is not None and self.code_ids.shape != self.code_values.shape:  # type: ignore[union-attr]
            raise ValueError(
                f"code_ids shape {self.code_ids.shape} != code_values shape "
                f"{self.code_values.shape}"  # type: ignore[union-attr]
            )

    @property
    def n(self) -> int:
        """Number of samples in the shard."""
        return self.hi - self.lo

    @property
    def derived(self) -> ShardDerived:
        """Lazily built read-only structures over this data (see :class:`ShardDerived`)."""
        derived = self.__dict__.get("_derived")
        if derived is None:
            derived = ShardDerived(self)
            object.__setattr__(self, "_derived", derived)
        return derived

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_derived", None)  # rebuilt on demand where the copy lands
        return state


class ShardPolicy(Protocol):
    """The part of a selection policy that runs where the samples live (see service/policies).

    The methods are documented on ``service.policies.base.Policy``, which implements them.
    """

    def init_counters(self, n: int) -> dict[str, np.ndarray]:
        """Per-sample mutable state (arrays with n rows) beyond ``usage``."""
        ...

    def local_stats(
        self, epoch: int, data: ShardData, counters: dict[str, np.ndarray], ctx: dict | None
    ) -> dict:
        """Partial reductions for the coordinator's per-epoch context."""
        ...

    def local_scores(
        self, stage: Any, epoch: int, ctx: dict, data: ShardData, counters: dict[str, np.ndarray]
    ) -> np.ndarray:
        """float64 (n,) stage scores; -inf = ineligible.

        A policy may also define ``local_scores_into(stage, epoch, ctx, data, counters, out)``
        returning the same scores, written into ``out`` (float64 (n,), a buffer the shard
        reuses for every stage) where it can: the shard then calls that instead.
        """
        ...

    def tiebreak(self, epoch: int, global_idx: np.ndarray) -> np.ndarray:
        """uint64 tie-breaks of global indices."""
        ...

    def weights(
        self,
        epoch: int,
        ctx: dict,
        data: ShardData,
        counters: dict[str, np.ndarray],
        selected_local: np.ndarray,
    ) -> np.ndarray | None:
        """float64 (m_s,) loss weights of the selected samples, or None (all 1)."""
        ...

    def selection_partials(
        self,
        epoch: int,
        ctx: dict,
        data: ShardData,
        counters: dict[str, np.ndarray],
        selected_local: np.ndarray,
    ) -> dict:
        """Partial reductions over the shard's selection, for the epoch's stats."""
        ...

    def commit(
        self,
        epoch: int,
        ctx: dict,
        data: ShardData,
        counters: dict[str, np.ndarray],
        selected_local: np.ndarray,
    ) -> dict:
        """Update the policy's counters for a committed selection."""
        ...

    def feedback(
        self,
        data: ShardData,
        counters: dict[str, np.ndarray],
        local_idx: np.ndarray,
        losses: np.ndarray,
    ) -> None:
        """Record per-sample losses (ValueError for a policy that takes none)."""
        ...
