"""Bench policies and ``factor`` variants of the training benchmark.

A bench policy is a service policy plus fixed params (``rs2_equal`` is ``rs2`` with equal class
quotas, ``factor_loss_clean`` is ``factor_loss`` with ``FACTOR_LOSS_CLEAN``, ...); a variant is a
named change to a ``factor`` job (policy params, SAE, features, score forms), selected with
``--variants`` (names or groups of ``VARIANT_GROUPS``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

POLICIES: tuple[str, ...] = (
    "full",
    "full_fewer",
    "static_random",
    "rs2",
    "infobatch",
    "infobatch_max",
    "ucb",
    "epsilon_greedy",
    "factor",
    "factor_gumbel",
    "rs2_prop",
    "rs2_equal",
    "factor_loss",
    "factor_loss_eq",
    "factor_loss_clean",
    "factor_loss_clean_b1",
)
"""Bench policy names. ``rs2_prop`` / ``rs2_equal`` are ``rs2`` with ``class_quotas``
``proportional`` / ``equal`` (class-balanced random rotations, no scores); ``factor_loss`` is the
hybrid policy (diversity + clipped loss feedback), ``factor_loss_eq`` the same with equal class
quotas (for long-tailed data), ``factor_loss_clean`` the same with a low clip quantile and a
strong loss term (``FACTOR_LOSS_CLEAN``: for noisy labels), ``factor_loss_clean_b1`` its
ablation without the SAE's diversity (beta = 1: the clipped loss alone). ``full_fewer`` is the
service's ``full`` for round(r E) epochs;
``factor_gumbel`` is ``factor`` with ``sampling="gumbel"``; ``infobatch_max`` is ``infobatch``
pruning every below-mean-loss sample until the last epoch (prune_ratio 1, delta 1), its smallest
budget. InfoBatch ignores the keep ratio (its budget follows from the losses), so both run once
per seed, recorded at r = 1, and are compared at the sample fraction they realize."""

FEEDBACK_POLICIES = frozenset(
    {
        "infobatch",
        "infobatch_max",
        "ucb",
        "epsilon_greedy",
        "factor_loss",
        "factor_loss_eq",
        "factor_loss_clean",
        "factor_loss_clean_b1",
    }
)
OWN_BUDGET_POLICIES = frozenset({"infobatch", "infobatch_max"})
FACTOR_POLICIES = frozenset({"factor", "factor_gumbel"})
SCORED_POLICIES = FACTOR_POLICIES | {
    "factor_loss",
    "factor_loss_eq",
    "factor_loss_clean",
    "factor_loss_clean_b1",
}
"""Bench policies whose jobs need the scoring (R, D, codes)."""
SERVICE_NAMES: dict[str, str] = {
    "full_fewer": "full",
    "factor_gumbel": "factor",
    "infobatch_max": "infobatch",
    "rs2_prop": "rs2",
    "rs2_equal": "rs2",
    "factor_loss_eq": "factor_loss",
    "factor_loss_clean": "factor_loss",
    "factor_loss_clean_b1": "factor_loss",
}
"""Bench policy -> service policy name (the others are their own)."""
FACTOR_LOSS_CLEAN: dict[str, Any] = {"clip_quantile": 0.6, "beta": 0.8, "tau": 0.3}
"""``factor_loss_clean``'s params: losses ranked above 0.6 (below 1 - a 30% noise rate) fall
back to 0, the loss term outweighs diversity, and less Gumbel noise so the preference steers."""


@dataclass(frozen=True)
class Variant:
    """A named change to the ``factor`` job: policy params, SAE, feature and score options."""

    params: dict[str, Any] = field(default_factory=dict)
    """Merged into ``policy.params`` (FactorParams fields)."""
    sae: dict[str, Any] = field(default_factory=dict)
    """Merged into the job's ``sae`` section."""
    feature: dict[str, Any] = field(default_factory=dict)
    """Merged into ``dataset.feature``."""
    scores: dict[str, Any] = field(default_factory=dict)
    """Score forms (``representativeness``, ``quantile``, ``diversity``); sent as the job's
    ``scores`` section, so it needs a service that accepts one (the in-process path does)."""
    note: str = ""
    """What the variant tests (shown in the report)."""


LITERAL_BASE: dict[str, Any] = {
    "class_quotas": False,
    "dynamic_coverage": False,
    "sampling": "topm",
    "tau": 0.1,
}
"""The paper's literal form, pinned: the ablation changed these defaults afterwards (quotas and
dynamic coverage on, then Gumbel sampling at tau = 1). Every variant but ``service_default``
starts from them, so recorded results keep their meaning; ``qd_gumbel1`` spells out the
current defaults."""

VARIANTS: dict[str, Variant] = {
    "default": Variant(
        note="factor's pre-ablation defaults: the literal form (docs/architecture.md, The method)"
    ),
    "service_default": Variant(
        note="factor's current defaults, whatever they are when the run starts (now: quotas + "
        "dynamic coverage where the data allows, Gumbel sampling at tau = 1, i.e. qd_gumbel1)"
    ),
    "literal": Variant(
        params={
            "gamma": 2.0,
            "penalty": "additive",
            "schedule": "cosine",
            "sampling": "topm",
            "class_quotas": False,
            "dynamic_coverage": False,
            "anneal_epochs": 0,
        },
        note="the paper's literal form (docs/architecture.md, The method)",
    ),
    "rep_frequent_set": Variant(
        scores={"representativeness": "frequent_set"}, note="R = mass on units above q=0.9"
    ),
    "div_max": Variant(scores={"diversity": "max"}, note="D = max rarity over active units"),
    "sched_linear": Variant(params={"schedule": "linear"}, note="linear lambda(t)"),
    "sched_sigmoid": Variant(params={"schedule": "sigmoid"}, note="sigmoid lambda(t)"),
    "sched_constant": Variant(params={"schedule": "constant"}, note="constant lambda"),
    "gamma0": Variant(params={"gamma": 0.0}, note="no usage penalty"),
    "gamma0.5": Variant(params={"gamma": 0.5}, note="weak penalty"),
    "gamma2": Variant(params={"gamma": 2.0}, note="paper-strength penalty"),
    "gamma5": Variant(params={"gamma": 5.0}, note="strong penalty"),
    "penalty_mult": Variant(params={"penalty": "multiplicative"}, note="B exp(-gamma u/(r t+1))"),
    "gumbel": Variant(params={"sampling": "gumbel"}, note="top m of s + tau Gumbel"),
    "sae_small": Variant(sae={"units": 512, "k": 16}, note="SAE M=512, k=16"),
    "sae_large": Variant(sae={"units": 4096, "k": 64}, note="SAE M=4096, k=64"),
    "pca64": Variant(feature={"dim": 64}, note="pixels PCA to 64"),
    "pca128": Variant(feature={"dim": 128}, note="pixels PCA to 128"),
    "dyncov": Variant(params={"dynamic_coverage": True}, note="dynamic factor coverage"),
    "quotas": Variant(params={"class_quotas": True}, note="class quotas per epoch"),
    "anneal2": Variant(params={"anneal_epochs": 2}, note="full data for the last 2 epochs"),
    "quotas_dyncov": Variant(
        params={"class_quotas": True, "dynamic_coverage": True}, note="quotas + dynamic coverage"
    ),
    "gamma10": Variant(params={"gamma": 10.0}, note="very strong penalty (near strict rotation)"),
    "gamma20": Variant(params={"gamma": 20.0}, note="penalty dominates: strict rotation"),
    "qd_gamma5": Variant(
        params={"class_quotas": True, "dynamic_coverage": True, "gamma": 5.0},
        note="quotas + dynamic coverage + strong penalty",
    ),
    "selfsup": Variant(
        feature={"kind": "selfsup", "dim": 128},
        note="features of a small conv encoder trained self-supervised (SimCLR) on the data",
    ),
    "qd_selfsup": Variant(
        params={"class_quotas": True, "dynamic_coverage": True},
        feature={"kind": "selfsup", "dim": 128},
        note="quotas + dynamic coverage on self-supervised features",
    ),
    "sched_early": Variant(
        params={"schedule": {"shape": "sigmoid", "center": 0.25}},
        note="timing: sigmoid lambda(t) centred at a quarter of the run",
    ),
    "sched_late": Variant(
        params={"schedule": {"shape": "sigmoid", "center": 0.75}},
        note="timing: sigmoid lambda(t) centred at three quarters of the run",
    ),
    "sched_warmup5": Variant(
        params={"schedule": {"shape": "cosine", "warmup_epochs": 5}},
        note="timing: representativeness only for 5 epochs, then cosine",
    ),
    "sched_reverse": Variant(
        params={"schedule": {"shape": "cosine", "lambda_min": 1.0, "lambda_max": 0.0}},
        note="timing reversed: diversity first, representativeness last",
    ),
    "qd_gamma10": Variant(
        params={"class_quotas": True, "dynamic_coverage": True, "gamma": 10.0},
        note="quotas + dynamic coverage + very strong penalty",
    ),
    "fgamma1": Variant(
        params={"factor_gamma": 1.0},
        note="current defaults + factor-level usage penalty (factor_gamma = 1)",
    ),
    "fgamma3": Variant(
        params={"factor_gamma": 3.0},
        note="current defaults + strong factor-level usage penalty (factor_gamma = 3)",
    ),
    "selfsup_default": Variant(
        feature={"kind": "selfsup", "dim": 128},
        note="current defaults on self-supervised (crop-invariant) features",
    ),
    "selfsup_fgamma1": Variant(
        params={"factor_gamma": 1.0},
        feature={"kind": "selfsup", "dim": 128},
        note="current defaults + factor_gamma = 1 on self-supervised features",
    ),
}
ON_DEFAULTS: frozenset[str] = frozenset(
    {"service_default", "fgamma1", "fgamma3", "selfsup_default", "selfsup_fgamma1"}
)
"""Variants applied on factor's current defaults (not pinned to ``LITERAL_BASE``)."""
VARIANTS.update(
    {
        f"qd_gumbel{tau:g}": Variant(
            params={
                "class_quotas": True,
                "dynamic_coverage": True,
                "sampling": "gumbel",
                "tau": tau,
            },
            note=f"quotas + dynamic coverage, sampled: top m of s + {tau:g} Gumbel",
        )
        for tau in (0.5, 1.0, 2.0, 5.0)  # qd_gumbel1 = factor's current defaults
    }
)
"""``--variants`` presets (apply to ``factor`` and ``factor_gumbel`` runs)."""

VARIANT_GROUPS: dict[str, tuple[str, ...]] = {
    "ablation": (
        "literal",
        "rep_frequent_set",
        "div_max",
        "sched_linear",
        "sched_sigmoid",
        "sched_constant",
        "gamma0",
        "gamma0.5",
        "gamma2",
        "gamma5",
        "penalty_mult",
        "gumbel",
        "sae_small",
        "sae_large",
        "pca64",
        "pca128",
    ),
    "beyond": ("dyncov", "quotas", "anneal2", "quotas_dyncov"),
    "penalty": ("gamma10", "gamma20", "qd_gamma5", "qd_gamma10"),
    "soft": ("qd_gumbel0.5", "qd_gumbel1", "qd_gumbel2", "qd_gumbel5"),
    "features": ("selfsup", "qd_selfsup"),
    "timing": ("sched_early", "sched_late", "sched_warmup5", "sched_reverse"),
    "regimes": ("service_default", "fgamma1"),
}
"""Named lists usable in ``--variants`` (e.g. ``--variants default,ablation``)."""


def expand_variants(names: Iterable[str]) -> list[str]:
    """Variant names with groups expanded, order kept, duplicates dropped.

    Raises ValueError for an unknown name.
    """
    out: list[str] = []
    for name in names:
        for v in VARIANT_GROUPS.get(name, (name,)):
            if v not in VARIANTS:
                raise ValueError(f"unknown variant {v!r}; known: {sorted(VARIANTS)}")
            if v not in out:
                out.append(v)
    return out
