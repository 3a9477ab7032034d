"""Selection policies: one module each, dispatched by name from :data:`POLICIES`.

Example:
    >>> p = make_policy(PolicyConfig(name="rs2", ratio=0.5, epochs=4))
    >>> p.plan(10)
    [5, 5, 5, 5]
"""

from __future__ import annotations

from saelect.service.policies.base import Policy, PolicyConfig, Stage, epoch_size, parse_params
from saelect.service.policies.epsilon_greedy import EpsilonGreedyPolicy
from saelect.service.policies.factor import FactorPolicy
from saelect.service.policies.factor_loss import FactorLossPolicy
from saelect.service.policies.full import FullPolicy
from saelect.service.policies.infobatch import InfoBatchPolicy
from saelect.service.policies.rs2 import RS2Policy
from saelect.service.policies.static_random import StaticRandomPolicy
from saelect.service.policies.ucb import UCBPolicy

__all__ = [
    "POLICIES",
    "Policy",
    "PolicyConfig",
    "Stage",
    "epoch_size",
    "make_policy",
    "parse_params",
]

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        FactorPolicy,
        FactorLossPolicy,
        FullPolicy,
        StaticRandomPolicy,
        RS2Policy,
        InfoBatchPolicy,
        UCBPolicy,
        EpsilonGreedyPolicy,
    )
}
"""Policy name -> class."""


def make_policy(config: PolicyConfig) -> Policy:
    """The policy named by ``config`` (its params validated; ValueError when bad)."""
    if config.name not in POLICIES:
        raise ValueError(f"unknown policy {config.name!r}; known: {', '.join(sorted(POLICIES))}")
    return POLICIES[config.name](config)
