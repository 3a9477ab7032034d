"""Policy configuration and the base class every selection policy extends.

A policy is pure numpy and split in two (docs/architecture.md, "How a policy meets the shards"):
methods that take ``data`` and ``counters`` run on the shard that holds the samples and may only
read the config, the per-epoch context ``ctx`` and the shard's own arrays; ``context``, ``stages``,
``absorb``, ``epoch_stats``, ``plan`` and ``state_dict`` run on the coordinator and own the global
state. A shard never mutates its policy object, so in-process shards may share the coordinator's.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from saelect.service.selection.hashing import STREAM_TIEBREAK, hash_u64
from saelect.workers.shard_data import ShardData

__all__ = [
    "NoParams",
    "Policy",
    "PolicyConfig",
    "Stage",
    "add_counts",
    "check_losses",
    "epoch_size",
    "parse_params",
    "round_half_up",
]


@dataclass(frozen=True)
class PolicyConfig:
    """Which policy selects, how much, for how long, with which seed and options."""

    name: str
    """Registered policy name (see ``service.policies.POLICIES``)."""
    ratio: float
    """Keep ratio r in (0, 1]: an epoch holds m = round(r N) samples (at least 1)."""
    epochs: int
    """Number of epochs T >= 1."""
    seed: int = 0
    """Seed of every random draw (hash streams and the shuffle), >= 0."""
    params: Mapping[str, Any] = field(default_factory=dict)
    """Policy-specific options, validated into the policy's params dataclass."""

    def __post_init__(self) -> None:
        from saelect.service.policies import POLICIES

        if self.name not in POLICIES:
            raise ValueError(f"unknown policy {self.name!r}; known: {', '.join(sorted(POLICIES))}")
        if not (isinstance(self.ratio, int | float) and 0.0 < self.ratio <= 1.0):
            raise ValueError(f"ratio={self.ratio} outside (0, 1]")
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} must be an integer >= 1")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed} must be an integer >= 0")
        if not isinstance(self.params, Mapping):
            raise ValueError(f"params={self.params!r} must be a mapping")


@dataclass(frozen=True)
class Stage:
    """One step of an epoch's selection: the global top ``count`` of the stage's scores."""

    key: str
    """What the stage selects (policy-specific, e.g. ``"main"``, ``"classes"``)."""
    count: int
    """How many samples the stage takes, >= 0."""
    quotas: tuple[int, ...] | None = None
    """Per-class counts, or None. With quotas the stage groups the samples by the shard's
    ``labels`` and takes the top ``quotas[c]`` of every class c (all classes in the same
    protocol calls); they sum to ``count``."""

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"stage {self.key!r} has count={self.count} < 0")
        if self.quotas is not None:
            quotas = tuple(int(q) for q in self.quotas)
            if any(q < 0 for q in quotas) or sum(quotas) != self.count:
                raise ValueError(
                    f"stage {self.key!r}: quotas must be >= 0 and sum to count={self.count}"
                )
            object.__setattr__(self, "quotas", quotas)


@dataclass(frozen=True)
class NoParams:
    """Parameters of a policy that takes none."""


_T = typing.TypeVar("_T")


def parse_params(cls: type[_T], params: Mapping[str, Any]) -> _T:
    """Build the params dataclass ``cls`` from a mapping, coercing JSON numbers.

    Raises ValueError naming an unknown key or a value of the wrong type; range checks are the
    dataclass's own ``__post_init__``.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in params.items():
        if key not in names:
            raise ValueError(f"unknown parameter {key!r}; known: {', '.join(sorted(names))}")
        kind = hints[key]
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            value = float(value)
        elif kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif kind in (float, int, bool, str) and not (
            isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        ):
            raise ValueError(f"parameter {key}={value!r} must be of type {kind.__name__}")
        kwargs[key] = value
    return cls(**kwargs)


def round_half_up(x: float) -> int:
    """floor(x + 0.5): the rounding of every size computed from a ratio (never banker's)."""
    return math.floor(x + 0.5)


def epoch_size(ratio: float, num_samples: int) -> int:
    """m = round(r N), half up, at least 1 (0 for an empty dataset)."""
    if num_samples == 0:
        return 0
    return min(num_samples, max(1, round_half_up(ratio * num_samples)))


def add_counts(parts: list[np.ndarray]) -> np.ndarray:
    """int64 (C,) sum of per-shard bincounts of different lengths (C = the longest).

    Example:
        >>> add_counts([np.array([1, 2]), np.array([0, 1, 5])]).tolist()
        [1, 3, 5]
    """
    counts = np.zeros(max((len(c) for c in parts), default=0), dtype=np.int64)
    for c in parts:
        counts[: len(c)] += c
    return counts


class Policy:
    """Base class: a feedback-free policy with one stage of size m per epoch.

    Subclasses set ``name``, ``params_type`` and override ``local_scores`` (and whatever else
    they need). Every per-sample random draw goes through :mod:`service.selection.hashing`.
    """

    name: ClassVar[str] = ""
    needs_feedback: ClassVar[bool] = False
    """Whether the policy reads per-sample losses through :meth:`feedback`."""
    stat_rounds: ClassVar[int] = 1
    """How many rounds of (shard ``local_stats`` -> coordinator ``context``) an epoch needs."""
    params_type: ClassVar[type] = NoParams

    def __init__(self, config: PolicyConfig) -> None:
        if config.name != self.name:
            raise ValueError(f"config names policy {config.name!r}, this is {self.name!r}")
        self.config = config
        self.params: Any = parse_params(self.params_type, config.params)

    # ----------------------------------------------------------------- coordinator side
    def plan(self, num_samples: int) -> list[int]:
        """Every epoch's size, epochs 0..T-1."""
        return [epoch_size(self.config.ratio, num_samples)] * self.config.epochs

    def context(self, epoch: int, partials: list[dict], ctx: dict | None = None) -> dict:
        """Global per-epoch context from the shards' ``local_stats`` partials.

        Called ``stat_rounds`` times; ``ctx`` is the previous round's result (None first).
        """
        n = int(sum(p["n"] for p in partials))
        return {"num_samples": n, "size": self.plan(n)[epoch]}

    def stages(self, epoch: int, ctx: dict) -> list[Stage]:
        """The epoch's stages; their counts sum to the epoch's size."""
        return [Stage("main", int(ctx["size"]))]

    def absorb(self, epoch: int, partials: list[dict]) -> None:
        """Fold the shards' commit partials of ``epoch`` into the global state."""

    def epoch_stats(self, epoch: int, ctx: dict, partials: list[dict]) -> dict:
        """Policy-specific entries of the epoch's stats, from ``selection_partials``."""
        return {"lambda": None}

    def state_dict(self) -> dict:
        """Global (coordinator) state; per-sample state lives in the shards' counters."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""

    # ----------------------------------------------------------------- shard side
    def init_counters(self, n: int) -> dict[str, np.ndarray]:
        """Per-sample mutable state (arrays with n rows) beyond the shard's own ``usage``."""
        return {}

    def local_stats(
        self, epoch: int, data: ShardData, counters: dict[str, np.ndarray], ctx: dict | None
    ) -> dict:
        """Partial reductions the coordinator's :meth:`context` needs."""
        return {}

    def local_scores(
        self, stage: Stage, epoch: int, ctx: dict, data: ShardData, counters: dict[str, np.ndarray]
    ) -> np.ndarray:
        """float64 (n,) stage scores; -inf = ineligible (higher is selected first)."""
        raise NotImplementedError

    def tiebreak(self, epoch: int, global_idx: np.ndarray) -> np.ndarray:
        """uint64 tie-breaks of global indices: hash(seed, epoch, tiebreak stream, i)."""
        return hash_u64(self.config.seed, epoch, STREAM_TIEBREAK, global_idx)

    def selection_partials(
        self,
        epoch: int,
        ctx: dict,
        data: ShardData,
        counters: dict[str, np.ndarray],
        selected_local: np.ndarray,
    ) -> dict:
        """Partial reductions over the shard's selection, for :meth:`epoch_stats`."""
        return {}

    def weights(
        self,
        epoch: int,
        ctx: dict,
        data: ShardData,
        counters: dict[str, np.ndarray],
        selected_local: np.ndarray,
    ) -> np.ndarray | None:
        """float64 (m_s,) loss weights of the selected samples, or None (all 1)."""
        return None

    def commit(
        self,
        epoch: int,
        ctx: dict,
        data: ShardData,
        counters: dict[str, np.ndarray],
        selected_local: np.ndarray,
    ) -> dict:
        """Update the policy's counters for a committed selection (usage is already counted)."""
        return {}

    def feedback(
        self,
        data: ShardData,
        counters: dict[str, np.ndarray],
        local_idx: np.ndarray,
        losses: np.ndarray,
    ) -> None:
        """Record per-sample losses; only policies with ``needs_feedback`` accept them."""
        raise ValueError(f"policy {self.name!r} takes no feedback")


def check_losses(local_idx: np.ndarray, losses: np.ndarray) -> None:
    """ValueError unless indices and losses align and every loss is finite."""
    if local_idx.shape != losses.shape:
        raise ValueError(f"{local_idx.shape[0]} indices but {losses.shape[0]} losses")
    if not np.all(np.isfinite(losses)):
        raise ValueError("losses must be finite")
