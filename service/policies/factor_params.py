"""``FactorParams``: the options of the ``factor`` policy (`service.policies.factor`) and their
validation; the module docstring there says what each option does to the scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from saelect.service.schedules import ScheduleConfig

__all__ = ["FactorParams"]


@dataclass(frozen=True)
class FactorParams:
    """Options of the ``factor`` policy."""

    schedule: ScheduleConfig | str | dict[str, Any] = "cosine"
    """lambda(t): a shape name, a dict of ScheduleConfig fields, or a ScheduleConfig."""
    gamma: float = 2.0
    """Usage-penalty strength, >= 0 (0 switches the penalty off)."""
    penalty: str = "additive"
    """``additive`` (B - gamma f) or ``multiplicative`` (B exp(-gamma u / (r t + 1)))."""
    sampling: str = "gumbel"
    """``gumbel`` (default: top m of s + tau Gumbel noise, i.e. m draws without replacement with
    probabilities ~ exp(s / tau)) or ``topm`` (the deterministic ranking of the paper's literal
    form, which the hard no-monopoly bound of The method 7 is about). The default comes from the
    ablation in docs/benchmarks_train.md: on Fashion-MNIST at r = 0.1 the ranking lost 2.4 points
    to sampling at tau = 1, which recovered all but ~0.2 points of the gap to ``rs2``."""
    tau: float = 1.0
    """Gumbel noise scale, >= 0 (0 gives the ranking). B is in [0, 1], so tau = 1 keeps a clear
    preference for high scores while every eligible sample keeps a chance."""
    class_quotas: bool | None = None
    """Keep every class's share of the data in every epoch. None (default): on when the data has
    labels; True: required (an error without labels); False: off (the paper's literal form)."""
    dynamic_coverage: bool | None = None
    """Diversity prefers factors under-covered by the selections so far. None (default): on when
    the shards hold the codes and p; True: required; False: off (the paper's literal form).
    The defaults come from the ablation in docs/benchmarks_train.md (quotas + dynamic coverage
    was the best `factor` variant at r = 0.1 to 0.3 on Fashion-MNIST and digits)."""
    anneal_epochs: int = 0
    """The last anneal_epochs epochs select all N samples, >= 0."""
    factor_gamma: float = 0.0
    """Factor-level usage penalty strength, >= 0 (0, the default, switches it off; needs the
    codes and p in the shard data). See the module docstring and docs/benchmarks_train.md
    (data regimes) for what it was measured to do."""

    def __post_init__(self) -> None:
        sched = self.schedule
        if isinstance(sched, str):
            sched = ScheduleConfig(shape=sched)
        elif isinstance(sched, dict):
            unknown = set(sched) - set(ScheduleConfig.__dataclass_fields__)
            if unknown:
                raise ValueError(f"unknown schedule fields {sorted(unknown)}")
            sched = ScheduleConfig(**sched)
        elif not isinstance(sched, ScheduleConfig):
            raise ValueError(f"schedule={sched!r} must be a shape name, dict or ScheduleConfig")
        object.__setattr__(self, "schedule", sched)
        if not self.gamma >= 0:
            raise ValueError(f"gamma={self.gamma} must be >= 0")
        if self.penalty not in ("additive", "multiplicative"):
            raise ValueError(f"penalty={self.penalty!r} must be 'additive' or 'multiplicative'")
        if self.sampling not in ("topm", "gumbel"):
            raise ValueError(f"sampling={self.sampling!r} must be 'topm' or 'gumbel'")
        if not self.tau >= 0:
            raise ValueError(f"tau={self.tau} must be >= 0")
        if self.anneal_epochs < 0:
            raise ValueError(f"anneal_epochs={self.anneal_epochs} must be >= 0")
        if not self.factor_gamma >= 0:
            raise ValueError(f"factor_gamma={self.factor_gamma} must be >= 0")
        for name in ("class_quotas", "dynamic_coverage"):
            if getattr(self, name) not in (None, True, False):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true, false or null")
