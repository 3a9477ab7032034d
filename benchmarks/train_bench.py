"""Training benchmark: accuracy against samples processed for every selection policy.

Trains a model per (task, policy, variant, ratio, seed) with a plain PyTorch loop whose indices
come from the selection service, and appends one JSON line per run to a results file keyed by the
run's key, so an interrupted sweep resumes where it stopped.

    # through a running service (the numbers in docs/benchmarks_train.md):
    saelect serve --port 8000 --store results/store &
    python benchmarks/train_bench.py --task fmnist --via http --url http://127.0.0.1:8000
    # in-process engine (no Ray, no HTTP; the same policies and engine):
    python benchmarks/train_bench.py --task digits --via inprocess --quick

Protocol (issue 5): every run has the task's epochs E and the same LR schedule shape (warm-up +
cosine over the steps the run takes, computed from the plan). ``full_fewer`` at ratio r is full
data for round(r E) epochs with its own complete schedule: the same sample budget as a selection
policy at ratio r. Samples processed are reported as a share of full data, sum of epoch sizes /
(N E). Scoring is one-time per (data, features, SAE, score forms) and has its own line.

Records (``kind``): ``run`` (one training run), ``scoring`` (one-time scoring cost and the
Spearman correlation of R and D), ``env`` (machine, threads, torch version).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.train_data import DATA_NAMES, TaskData, load_task
from benchmarks.train_loop import OptimConfig, derive_seed, train
from benchmarks.train_models import AugmentConfig, ModelConfig, make_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "results" / "train.jsonl"

# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark task: data, model, training regime and the service's scoring config."""

    name: str
    """Task name (``--task``)."""
    data: str
    """``fmnist``, ``digits`` or ``text`` (benchmarks.train_data.load_task)."""
    model: ModelConfig
    """Model kind and size."""
    augment: AugmentConfig | None
    """Batch augmentation (images), or None."""
    epochs: int
    """E: epochs of every full-length run."""
    optim: OptimConfig
    """Optimizer and LR schedule (shape shared by every run of the task)."""
    sae: dict[str, Any]
    """The job spec's ``sae`` section."""
    feature_overrides: dict[str, Any] = field(default_factory=dict)
    """Changes to the data's default feature spec."""
    data_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the data's loader (regimes: ``base_size`` and the builder's)."""
    eval_every: int = 1
    """Evaluate on the test set every this many epochs (and after the last)."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.data not in DATA_NAMES:
            raise ValueError(f"data must be one of {', '.join(DATA_NAMES)}, got {self.data!r}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")


_FMNIST_SAE = {"units": 2048, "k": 32}
TASKS: dict[str, TaskSpec] = {
    # Main regime: augmentation (random crop, pad 2, and flip) keeps the small CNN data-hungry.
    "fmnist": TaskSpec(
        name="fmnist",
        data="fmnist",
        model=ModelConfig("cnn", width=16, hidden=128, dropout=0.1),
        augment=AugmentConfig(pad=2, flip=True),
        epochs=20,
        optim=OptimConfig(lr=0.1, batch_size=256, weight_decay=5e-4),
        sae=_FMNIST_SAE,
    ),
    # Short regime (E = 12), same model and augmentation.
    "fmnist-short": TaskSpec(
        name="fmnist-short",
        data="fmnist",
        model=ModelConfig("cnn", width=16, hidden=128, dropout=0.1),
        augment=AugmentConfig(pad=2, flip=True),
        epochs=12,
        optim=OptimConfig(lr=0.1, batch_size=256, weight_decay=5e-4),
        sae=_FMNIST_SAE,
    ),
    "digits": TaskSpec(
        name="digits",
        data="digits",
        model=ModelConfig("mlp", hidden=128, dropout=0.1),
        augment=None,
        epochs=30,
        optim=OptimConfig(lr=0.05, batch_size=32, weight_decay=5e-4),
        sae={"units": 256, "k": 8, "epochs": 40, "batch_size": 256},
    ),
    "text": TaskSpec(
        name="text",
        data="text",
        model=ModelConfig("mlp", hidden=256, dropout=0.3),
        augment=None,
        epochs=20,
        optim=OptimConfig(lr=0.05, batch_size=64, weight_decay=5e-4),
        sae={"units": 1536, "k": 16},
    ),
}
REGIME_EPOCHS = 10
"""E of the data-regime tasks (issue 15): half the clean task's, to fit a CPU sweep."""
REGIME_BASE_SIZE = 10000
"""Rows of the class-stratified Fashion-MNIST subset the ref, dup and noisy regimes start from."""
REGIME_ARGS: dict[str, dict[str, Any]] = {"fmnist-lt": {"head_size": 3000}}
"""Loader arguments of regimes that do not start from the base subset."""
TASKS.update(
    {
        # Data regimes (benchmarks/train_regimes.py): the clean task's model, augmentation and
        # optimizer at a reduced scale to fit a CPU sweep (10k-row base subset; the long tail
        # has 3000 head images, 7.4k rows), E = 10, evaluated after epochs 5 and 10.
        name: TaskSpec(
            name=name,
            data=name,
            model=ModelConfig("cnn", width=16, hidden=128, dropout=0.1),
            augment=AugmentConfig(pad=2, flip=True),
            epochs=REGIME_EPOCHS,
            optim=OptimConfig(lr=0.1, batch_size=256, weight_decay=5e-4),
            sae=_FMNIST_SAE,
            data_args=REGIME_ARGS.get(name, {"base_size": REGIME_BASE_SIZE}),
            eval_every=5,
        )
        for name in ("fmnist-ref", "fmnist-dup", "fmnist-lt", "fmnist-noisy")
    }
)

# --------------------------------------------------------------------------- policies, variants

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
)
"""Bench policy names. ``rs2_prop`` / ``rs2_equal`` are ``rs2`` with ``class_quotas``
``proportional`` / ``equal`` (class-balanced random rotations, no scores); ``factor_loss`` is the
hybrid policy (diversity + clipped loss feedback), ``factor_loss_eq`` the same with equal class
quotas (for long-tailed data), ``factor_loss_clean`` the same with a low clip quantile and a
strong loss term (``FACTOR_LOSS_CLEAN``: for noisy labels). ``full_fewer`` is the service's
``full`` for round(r E) epochs;
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
    }
)
OWN_BUDGET_POLICIES = frozenset({"infobatch", "infobatch_max"})
FACTOR_POLICIES = frozenset({"factor", "factor_gumbel"})
SCORED_POLICIES = FACTOR_POLICIES | {"factor_loss", "factor_loss_eq", "factor_loss_clean"}
"""Bench policies whose jobs need the scoring (R, D, codes)."""
SERVICE_NAMES: dict[str, str] = {
    "full_fewer": "full",
    "factor_gumbel": "factor",
    "infobatch_max": "infobatch",
    "rs2_prop": "rs2",
    "rs2_equal": "rs2",
    "factor_loss_eq": "factor_loss",
    "factor_loss_clean": "factor_loss",
}
FACTOR_LOSS_CLEAN: dict[str, Any] = {"clip_quantile": 0.6, "beta": 0.8, "tau": 0.3}
"""``factor_loss_clean``'s params: losses ranked above 0.6 (below 1 - a 30% noise rate) fall
back to 0, the loss term outweighs diversity, and less Gumbel noise so the preference steers."""
"""Bench policy -> service policy name (the others are their own)."""


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
    "default": Variant(note="factor's pre-ablation defaults: the literal form of DESIGN 2"),
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
        note="the paper's literal form (DESIGN 2)",
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


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunSpec:
    """One training run of the sweep."""

    task: str
    """Task name (``TASKS``)."""
    policy: str
    """Bench policy name (``POLICIES``)."""
    ratio: float
    """Keep ratio r (1.0 for ``full``)."""
    seed: int
    """Seed of the model init, augmentation and the policy."""
    epochs: int
    """The task's E (``full_fewer`` trains round(r E) of them)."""
    variant: str = "default"
    """Variant name for factor policies, ``-`` otherwise."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; known: {POLICIES}")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.policy == "full_fewer" and round(self.ratio * self.epochs) < 1:
            raise ValueError(
                f"full_fewer needs round(r E) >= 1, got r={self.ratio}, E={self.epochs}"
            )

    @property
    def key(self) -> str:
        """The resume key: everything that determines the run's result."""
        return (
            f"{self.task}|{self.policy}|{self.variant}|r={self.ratio:g}|seed={self.seed}"
            f"|E={self.epochs}"
        )

    @property
    def job_epochs(self) -> int:
        """Epochs the job (and the training) has."""
        if self.policy == "full_fewer":
            return round(self.ratio * self.epochs)
        return self.epochs

    def job_spec(self, task: TaskSpec, data: TaskData) -> dict[str, Any]:
        """The ``POST /v1/jobs`` body of this run."""
        name = SERVICE_NAMES.get(self.policy, self.policy)
        ratio = 1.0 if self.policy in ("full", "full_fewer") else self.ratio
        params: dict[str, Any] = {}
        if self.policy == "infobatch_max":
            params.update(prune_ratio=1.0, delta=1.0)
        if self.policy in ("rs2_prop", "rs2_equal"):
            params["class_quotas"] = "proportional" if self.policy == "rs2_prop" else "equal"
        if self.policy == "factor_loss_eq":
            params["class_quotas"] = "equal"
        if self.policy == "factor_loss_clean":
            params.update(FACTOR_LOSS_CLEAN)
        variant = VARIANTS[self.variant] if self.policy in FACTOR_POLICIES else Variant()
        if self.policy in FACTOR_POLICIES and self.variant not in ON_DEFAULTS:
            # every recorded variant was run against the literal form, before the ablation made
            # quotas + dynamic coverage the policy's default: pin it so the keys keep meaning
            params.update(LITERAL_BASE)
        if self.policy == "factor_gumbel":
            params["sampling"] = "gumbel"
        params.update(variant.params)
        spec: dict[str, Any] = {
            "name": self.key.replace("|", "_").replace("=", "")[:200],
            "dataset": {
                "uri": data.uri,
                "label_column": data.label_column,
                "feature": {**data.feature, **task.feature_overrides, **variant.feature},
            },
            "policy": {
                "name": name,
                "ratio": ratio,
                "epochs": self.job_epochs,
                "seed": self.seed,
                "params": params,
            },
            "sae": {**task.sae, **variant.sae},
        }
        if variant.scores:
            spec["scores"] = dict(variant.scores)
        return spec


def plan_runs(
    task: str,
    *,
    policies: Sequence[str],
    ratios: Sequence[float],
    seeds: Sequence[int],
    epochs: int,
    variants: Sequence[str] = ("default",),
) -> list[RunSpec]:
    """Every run of a sweep, the most informative first.

    Order: ``full`` for every seed (the reference); then, per ratio from the lowest and per seed,
    ``factor`` (each variant), ``rs2`` and ``full_fewer`` at ratios <= 0.3; then the other
    policies at those ratios (InfoBatch once per seed, at r = 1: it ignores the ratio); then
    everything at ratios > 0.3.
    """
    core = ("factor", "rs2", "full_fewer")
    runs: list[tuple[tuple, RunSpec]] = []
    for seed in seeds:
        if "full" in policies:
            runs.append(((0, 0.0, seed, 0), RunSpec(task, "full", 1.0, seed, epochs, "-")))
        for p_rank, policy in enumerate(policies):
            if policy in OWN_BUDGET_POLICIES:
                order = (2, 1.0, seed, p_rank * 1000)
                runs.append((order, RunSpec(task, policy, 1.0, seed, epochs, "-")))
    for r in sorted(set(ratios)):
        for seed in seeds:
            for p_rank, policy in enumerate(policies):
                if policy == "full" or policy in OWN_BUDGET_POLICIES:
                    continue
                if policy == "full_fewer" and round(r * epochs) < 1:
                    continue
                group = 1 if r <= 0.3 + 1e-9 and policy in core else 2 if r <= 0.3 + 1e-9 else 3
                names = variants if policy in FACTOR_POLICIES else ("-",)
                for v_rank, variant in enumerate(names):
                    order = (group, r, seed, p_rank * 1000 + v_rank)
                    runs.append((order, RunSpec(task, policy, r, seed, epochs, variant)))
    runs.sort(key=lambda x: x[0])
    seen: set[str] = set()
    out = []
    for _, run in runs:
        if run.key not in seen:
            seen.add(run.key)
            out.append(run)
    return out


# --------------------------------------------------------------------------- results file


def read_results(path: Path) -> list[dict[str, Any]]:
    """All records of a results JSONL file (a torn last line from a crash is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def done_keys(path: Path) -> set[str]:
    """Keys of the runs already recorded in ``path``."""
    return {r["key"] for r in read_results(path) if r.get("kind") == "run"}


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line with a single O_APPEND write (concurrent sweeps may share a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record, default=_json_default) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


# --------------------------------------------------------------------------- selectors


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two float arrays (n,), average ranks for ties."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def scoring_key(spec: dict[str, Any]) -> str:
    """Identifies what a job's scoring depends on: data, features, SAE config, score forms."""
    part = {k: spec[k] for k in ("dataset", "sae") if k in spec}
    part["scores"] = spec.get("scores", {})
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ScoredData:
    """In-process scoring output of one dataset (one scoring key)."""

    R: np.ndarray
    """float64 (N,) representativeness, rank-normalized."""
    D: np.ndarray
    """float64 (N,) diversity, rank-normalized."""
    labels: np.ndarray | None
    """int64 (N,) labels or None."""
    code_ids: np.ndarray
    """int32 (N, k) active unit ids."""
    code_values: np.ndarray
    """float16 (N, k) activations."""
    p: np.ndarray
    """float64 (M,) factor frequencies."""
    scoring_s: float
    """Wall time of features + SAE fit + encode + scores when computed."""
    dead_share: float
    """Share of SAE units never active."""


def score_in_process(spec: dict[str, Any], cache_dir: Path | None) -> ScoredData:
    """Score a job's dataset with ``workers.scoring_local.score_single_process``, cached on disk.

    The pipeline's own single-process reference (the same samples, extractor fit, SAE and
    score functions as the distributed scoring), so in-process runs select what the service
    would select.
    """
    from workers.features import FeatureSpec
    from workers.sae import SAEConfig
    from workers.scores import ScoreConfig
    from workers.scoring_local import score_single_process

    key = scoring_key(spec)
    path = None if cache_dir is None else cache_dir / f"scores_{key}.npz"
    if path is not None and path.exists():
        z = np.load(path)
        return ScoredData(
            R=z["R"],
            D=z["D"],
            labels=z["labels"] if z["labels"].size else None,
            code_ids=z["code_ids"],
            code_values=z["code_values"],
            p=z["p"],
            scoring_s=float(z["scoring_s"]),
            dead_share=float(z["dead_share"]),
        )
    ds = spec["dataset"]
    t0 = time.perf_counter()
    sc = score_single_process(
        ds["uri"],
        FeatureSpec(**ds["feature"]),
        ds.get("label_column"),
        SAEConfig(**spec.get("sae", {})),
        ScoreConfig(**spec.get("scores", {})),
    )
    out = ScoredData(
        R=np.asarray(sc.R, dtype=np.float64),
        D=np.asarray(sc.D, dtype=np.float64),
        labels=sc.labels,
        code_ids=np.asarray(sc.codes.ids),
        code_values=np.asarray(sc.codes.values),
        p=np.asarray(sc.p, dtype=np.float64),
        scoring_s=time.perf_counter() - t0,
        dead_share=float(np.mean(sc.p == 0)),
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(
            tmp,
            R=out.R,
            D=out.D,
            labels=out.labels if out.labels is not None else np.zeros(0, np.int64),
            code_ids=out.code_ids,
            code_values=out.code_values,
            p=out.p,
            scoring_s=out.scoring_s,
            dead_share=out.dead_share,
        )
        tmp.replace(path)
    return out


class InProcessSelector:
    """``client.SelectionClient``'s interface over in-process ``SingleProcessSelector`` engines.

    The same policies and engine as the service, without Ray or HTTP; scoring runs in this
    process (``score_in_process``). ``weights`` gives InfoBatch's loss weights, like
    ``GET .../weights``.
    """

    def __init__(self, cache_dir: Path | None) -> None:
        self.cache_dir = cache_dir
        self._jobs: dict[str, dict[str, Any]] = {}
        self._scored: dict[str, ScoredData] = {}
        self.scoring_s: dict[str, float] = {}

    def scored(self, spec: dict[str, Any]) -> ScoredData:
        """The scoring of ``spec``'s dataset (computed once per scoring key)."""
        key = scoring_key(spec)
        if key not in self._scored:
            self._scored[key] = score_in_process(spec, self.cache_dir)
        return self._scored[key]

    def create_job(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Build the policy and engine; factor policies score the data first."""
        import pyarrow.parquet as pq

        from service.policies import PolicyConfig, make_policy
        from service.selection.engine import SingleProcessSelector
        from workers.selection_shard import ShardData

        policy = make_policy(PolicyConfig(**spec["policy"]))
        label_col = spec["dataset"].get("label_column")
        if spec["policy"]["name"] in ("factor", "factor_loss"):  # the scored policies
            sc = self.scored(spec)
            data = ShardData(
                0,
                sc.R.shape[0],
                R=sc.R,
                D=sc.D,
                labels=sc.labels,
                code_ids=sc.code_ids,
                code_values=sc.code_values,
                p=sc.p,
            )
        else:
            cols = [label_col] if label_col else []
            table = pq.read_table(spec["dataset"]["uri"], columns=cols or None)
            labels = (
                np.asarray(table.column(label_col).to_numpy(), dtype=np.int64)
                if label_col
                else None
            )
            data = ShardData(0, table.num_rows, labels=labels)
        job_id = f"job{len(self._jobs)}"
        self._jobs[job_id] = {
            "engine": SingleProcessSelector(policy, data),
            "epochs": [],
            "spec": spec,
        }
        return {"id": job_id, "phase": "ready"}

    def wait_ready(self, job_id: str, timeout: float = 600.0) -> dict[str, Any]:
        """In-process jobs are ready on creation."""
        return {"id": job_id, "phase": "ready"}

    def plan(self, job_id: str, world_size: int = 1) -> dict[str, Any]:
        """Same shape as ``GET /v1/jobs/{id}/plan``."""
        from service.selection.partition import per_rank_length

        engine = self._jobs[job_id]["engine"]
        sizes = engine.plan()
        n = engine.num_samples
        return {
            "world_size": world_size,
            "epochs": [
                {"epoch": t, "size": s, "per_rank": per_rank_length(s, world_size)}
                for t, s in enumerate(sizes)
            ],
            "sample_fraction": sum(sizes) / (n * len(sizes)) if n and sizes else 0.0,
        }

    def _epoch(self, job_id: str, epoch: int) -> Any:
        job = self._jobs[job_id]
        while len(job["epochs"]) <= epoch:
            job["epochs"].append(job["engine"].step())
        return job["epochs"][epoch]

    def indices(self, job_id: str, epoch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """int64 (per_rank,) indices of ``rank`` (selects earlier epochs first, in order)."""
        from service.selection.partition import rank_indices

        return rank_indices(self._epoch(job_id, epoch).indices, rank, world_size)

    def weights(self, job_id: str, epoch: int) -> np.ndarray | None:
        """float (size,) loss weights of ``epoch`` aligned with rank 0 of 1, or None."""
        return self._epoch(job_id, epoch).weights

    def feedback(
        self, job_id: str, epoch: int, indices: np.ndarray, losses: np.ndarray
    ) -> dict[str, Any]:
        """Per-sample losses of ``epoch``."""
        applied = self._jobs[job_id]["engine"].feedback(indices, losses)
        return {"applied": applied}

    def stats(self, job_id: str, epoch: int) -> dict[str, Any]:
        """The engine's statistics of a selected epoch."""
        return dict(self._epoch(job_id, epoch).stats)

    def delete(self, job_id: str) -> None:
        """Forget a job."""
        self._jobs.pop(job_id, None)

    def close(self) -> None:
        """Nothing to release."""


class HttpSelector:
    """``client.SelectionClient`` with the driver's interface (``weights`` serves rank 0 of 1)."""

    def __init__(self, url: str, token: str | None = None) -> None:
        from client import SelectionClient

        self.client = SelectionClient(url, token=token, timeout=120.0)
        self.scoring_s: dict[str, float] = {}

    def weights(self, job_id: str, epoch: int) -> np.ndarray:
        """float32 (size,) loss weights of ``epoch`` (all 1 unless the policy reweights)."""
        return self.client.weights(job_id, epoch, 0, 1)

    def __getattr__(self, name: str) -> Any:
        if name in ("create_job", "wait_ready", "plan", "indices", "feedback", "stats", "delete"):
            return getattr(self.client, name)
        raise AttributeError(name)

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self.client.close()


def start_service(store: Path, port: int, allowed_root: Path) -> subprocess.Popen:
    """Start ``saelect serve`` on loopback (its own process group); returns once it answers."""
    import httpx

    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["SAELECT_ALLOWED_ROOTS"] = json.dumps([str(allowed_root)])
    exe = Path(sys.executable).with_name("saelect")
    cmd = [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port), "--store", str(store)]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"saelect serve exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    proc.terminate()
    raise RuntimeError("saelect serve did not answer /healthz within 180 s")


# --------------------------------------------------------------------------- one run


def _diagnostics(
    stats: list[dict[str, Any]], served: list[np.ndarray], labels: np.ndarray, n: int
) -> dict[str, Any]:
    """Per-epoch diagnostics of a run from the service's stats and the served indices."""
    usage = np.zeros(n, dtype=np.int64)
    per_epoch = []
    num_classes = int(labels.max()) + 1
    for st, idx in zip(stats, served, strict=True):
        np.add.at(usage, idx, 1)
        cls = np.bincount(labels[idx], minlength=num_classes)
        per_epoch.append(
            {
                "epoch": st.get("epoch"),
                "lambda": st.get("lambda"),
                "mean_R": st.get("mean_R"),
                "mean_D": st.get("mean_D"),
                "penalty_share": st.get("penalty_share"),
                "factor_coverage": st.get("factor_coverage"),
                "coverage": float(np.mean(usage > 0)),
                "usage_std": float(usage.std()),
                "usage_max": int(usage.max()),
                "class_share": (cls / max(int(cls.sum()), 1)).round(4).tolist(),
            }
        )
    return {"epochs": per_epoch}


def run_one(
    run: RunSpec,
    task: TaskSpec,
    data: TaskData,
    selector: Any,
    *,
    via: str,
    threads: int,
) -> dict[str, Any]:
    """Create the run's job, train through it, and return the run record."""
    spec = run.job_spec(task, data)
    t0 = time.perf_counter()
    job_id = selector.create_job(spec)["id"]
    selector.wait_ready(job_id, timeout=3600.0)
    job_s = time.perf_counter() - t0
    x_train = data.x_train
    input_shape = tuple(x_train.shape[1:])
    model = make_model(
        task.model, input_shape, data.num_classes, seed=derive_seed(run.seed, "init")
    )
    if task.model.kind == "cnn":
        model = model.to(memory_format=torch.channels_last)
    stats: list[dict[str, Any]] = []
    want_stats = run.policy in FACTOR_POLICIES or run.policy.startswith("rs2")

    def on_epoch(epoch: int, idx: np.ndarray) -> None:
        if want_stats:
            stats.append(selector.stats(job_id, epoch))

    t_run = time.perf_counter()
    res = train(
        model=model,
        x_train=x_train,
        y_train=data.y_train,
        x_test=data.x_test,
        y_test=data.y_test,
        selector=selector,
        job=job_id,
        epochs=run.job_epochs,
        optim=task.optim,
        augment=task.augment,
        seed=run.seed,
        send_feedback=run.policy in FEEDBACK_POLICIES,
        on_epoch=on_epoch,
        eval_every=task.eval_every,
    )
    wall_s = time.perf_counter() - t_run
    if run.policy not in FEEDBACK_POLICIES and res.total_steps != res.planned_steps:
        raise RuntimeError(
            f"{run.key}: took {res.total_steps} steps, plan said {res.planned_steps}"
        )
    selector.delete(job_id)
    n = data.num_samples
    samples = int(sum(res.epoch_sizes))
    record: dict[str, Any] = {
        "kind": "run",
        "key": run.key,
        **dataclasses.asdict(run),
        "job_epochs": run.job_epochs,
        "params": spec["policy"]["params"],
        "spec_sae": spec["sae"],
        "spec_feature": spec["dataset"]["feature"],
        "spec_scores": spec.get("scores", {}),
        # The service scores every job (jobs with equal data, feature, SAE and score specs share
        # one scoring); in-process only factor policies score.
        "scoring_key": scoring_key(spec)
        if via == "http" or run.policy in SCORED_POLICIES
        else None,
        "via": via,
        "loss_weights": run.policy in FEEDBACK_POLICIES,
        "final_acc": res.acc_curve[-1],
        "best_acc": max(res.acc_curve),
        "acc_curve": res.acc_curve,
        "eval_epochs": res.eval_epochs,
        "epoch_sizes": res.epoch_sizes,
        "served_digest": [
            hashlib.blake2b(
                np.ascontiguousarray(i, dtype="<i8").tobytes(), digest_size=6
            ).hexdigest()
            for i in res.served
        ],
        "samples": samples,
        "sample_fraction": samples / (n * run.epochs),
        "steps": res.total_steps,
        "planned_steps": res.planned_steps,
        "train_s": round(res.train_s, 3),
        "select_s": round(res.select_s, 4),
        "eval_s": round(res.eval_s, 3),
        "wall_s": round(wall_s, 3),
        "job_s": round(job_s, 3),
        "threads": threads,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if data.meta:
        from benchmarks.train_regimes import regime_metrics

        record["regime"] = regime_metrics(model, data, res.served, run.epochs)
    if stats:
        labels = data.y_train.numpy()
        record["diagnostics"] = _diagnostics(stats, res.served, labels, n)
        prior = np.bincount(labels) / n
        record["class_prior"] = prior.round(4).tolist()
    return record


def scoring_record(
    selector: Any, spec: dict[str, Any], via: str, job_s: float, cache_dir: Path | None = None
) -> dict[str, Any]:
    """The one-time scoring line of a scoring key.

    In-process: the measured scoring time and the Spearman correlation of R and D. Via HTTP: the
    first job's create-to-ready time (it paid the shared scoring), and the R-D correlation from
    the in-process scoring cache when one exists (the same scores: both use the pipeline).
    """
    rec: dict[str, Any] = {
        "kind": "scoring",
        "key": "scoring|" + scoring_key(spec),
        "task_uri": spec["dataset"]["uri"],
        "feature": spec["dataset"]["feature"],
        "sae": spec["sae"],
        "scores": spec.get("scores", {}),
        "via": via,
        "job_ready_s": round(job_s, 3),
    }
    if isinstance(selector, InProcessSelector):
        sc = selector.scored(spec)
        rec.update(
            scoring_s=round(sc.scoring_s, 3),
            spearman_RD=spearman(sc.R, sc.D),
            dead_share=sc.dead_share,
            num_samples=int(sc.R.shape[0]),
        )
    else:
        rec["scoring_s"] = round(job_s, 3)
        cached = None if cache_dir is None else cache_dir / f"scores_{scoring_key(spec)}.npz"
        if cached is not None and cached.exists():
            sc = score_in_process(spec, cache_dir)
            rec.update(spearman_RD=spearman(sc.R, sc.D), dead_share=sc.dead_share)
    return rec


# --------------------------------------------------------------------------- CLI


def _csv(kind: type) -> Any:
    def parse(s: str) -> list:
        return [kind(x) for x in s.split(",") if x.strip()]

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=sorted(TASKS), default="fmnist")
    ap.add_argument("--policies", type=_csv(str), default=list(POLICIES))
    ap.add_argument("--ratios", type=_csv(float), default=[0.1, 0.2, 0.3, 0.5, 0.7])
    ap.add_argument("--seeds", type=_csv(int), default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="override the task's E")
    ap.add_argument(
        "--variants",
        type=_csv(str),
        default=["default"],
        help=f"factor variants or groups {sorted(VARIANT_GROUPS)}; presets: {sorted(VARIANTS)}",
    )
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 epochs, 1 seed, r=0.3")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--data-root", type=Path, default=REPO / "results" / "data")
    ap.add_argument("--via", choices=["http", "inprocess"], default="http")
    ap.add_argument(
        "--url",
        default=None,
        help="service URL; with --via http and no URL, "
        "the bench starts `saelect serve` on --port with --store",
    )
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--store", type=Path, default=REPO / "results" / "store")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--limit", type=int, default=None, help="stop after this many new runs")
    ap.add_argument("--dry-run", action="store_true", help="print the run list and exit")
    return ap


QUICK: dict[str, Any] = {
    "epochs": 2,
    "seeds": [0],
    "ratios": [0.3],
    "policies": ["full", "full_fewer", "rs2", "infobatch", "factor"],
    "sae": {"units": 128, "k": 8, "epochs": 5},
}
"""``--quick``: a smoke test of every code path (a small SAE, 2 epochs, one ratio and seed)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep; returns 0 when every planned run is recorded."""
    args = build_parser().parse_args(argv)
    task = TASKS[args.task]
    if args.quick:
        args.epochs = args.epochs or QUICK["epochs"]
        args.seeds, args.ratios = QUICK["seeds"], QUICK["ratios"]
        if args.policies == list(POLICIES):
            args.policies = QUICK["policies"]
        task = dataclasses.replace(task, sae={**task.sae, **QUICK["sae"]})
        if args.out == DEFAULT_OUT:  # never mix smoke-test rows into the real results
            args.out = DEFAULT_OUT.with_name("train_quick.jsonl")
    epochs = args.epochs or task.epochs
    if args.epochs:
        task = dataclasses.replace(task, epochs=epochs)
    for p in args.policies:
        if p not in POLICIES:
            raise SystemExit(f"unknown policy {p!r}; known: {', '.join(POLICIES)}")
    variants = expand_variants(args.variants)
    runs = plan_runs(
        task.name,
        policies=args.policies,
        ratios=args.ratios,
        seeds=args.seeds,
        epochs=epochs,
        variants=variants,
    )
    done = done_keys(args.out)
    todo = [r for r in runs if r.key not in done]
    print(f"{len(runs)} runs planned, {len(runs) - len(todo)} already in {args.out}", flush=True)
    if args.dry_run:
        for r in todo:
            print(r.key)
        return 0
    if not todo:
        return 0
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = load_task(task.data, args.data_root, **task.data_args)
    server = None
    if args.via == "inprocess":
        selector: Any = InProcessSelector(args.data_root / "cache")
    else:
        url = args.url
        if url is None:
            server = start_service(args.store, args.port, args.data_root.resolve())
            url = f"http://127.0.0.1:{args.port}"
        selector = HttpSelector(url, token=os.environ.get("SAELECT_API_TOKEN"))
    append_record(
        args.out,
        {
            "kind": "env",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "task": task.name,
            "via": args.via,
            "machine": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "argv": list(argv) if argv is not None else sys.argv[1:],
        },
    )
    scored_keys = {r["key"] for r in read_results(args.out) if r.get("kind") == "scoring"}
    anchor = None
    if args.via == "http":
        # The service drops a shared scoring when its last job is deleted; one idle job with the
        # sweep's default data, feature and SAE spec keeps it for every run that deletes its own.
        spec = todo[0].job_spec(task, data)
        spec["name"] = f"{task.name}-scoring-anchor"
        spec["policy"] = {"name": "full", "ratio": 1.0, "epochs": 1, "seed": 0, "params": {}}
        spec.pop("scores", None)
        anchor = selector.create_job(spec)["id"]
    try:
        for i, run in enumerate(todo):
            if args.limit is not None and i >= args.limit:
                break
            rec = run_one(run, task, data, selector, via=args.via, threads=args.threads)
            if rec["scoring_key"] and "scoring|" + rec["scoring_key"] not in scored_keys:
                spec = run.job_spec(task, data)
                append_record(
                    args.out,
                    scoring_record(
                        selector, spec, args.via, rec["job_s"], args.data_root / "cache"
                    ),
                )
                scored_keys.add("scoring|" + rec["scoring_key"])
            append_record(args.out, rec)
            print(
                f"[{i + 1}/{len(todo)}] {run.key}: final {rec['final_acc']:.4f} "
                f"best {rec['best_acc']:.4f} samples {rec['sample_fraction']:.3f} "
                f"train {rec['train_s']:.1f}s select {rec['select_s']:.3f}s",
                flush=True,
            )
    finally:
        if anchor is not None:
            selector.delete(anchor)
        selector.close()
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
