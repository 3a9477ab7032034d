"""Runs of the training benchmark and its results file.

``RunSpec`` is one training run (task, policy, variant, ratio, seed, E) with its resume key and
its ``POST /v1/jobs`` body; ``plan_runs`` orders a sweep's runs, the most informative first. The
results file is JSON lines, one record per run (plus ``scoring`` and ``env`` records), appended
with one write each so concurrent sweeps may share it and an interrupted sweep resumes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.train_variants import (
    FACTOR_LOSS_CLEAN,
    FACTOR_POLICIES,
    LITERAL_BASE,
    ON_DEFAULTS,
    OWN_BUDGET_POLICIES,
    POLICIES,
    SERVICE_NAMES,
    VARIANTS,
    Variant,
)

if TYPE_CHECKING:
    from benchmarks.train_data import TaskData
    from benchmarks.train_tasks import TaskSpec


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

    @property
    def variant_spec(self) -> Variant:
        """The run's ``factor`` variant (an empty one for the other policies)."""
        return VARIANTS[self.variant] if self.policy in FACTOR_POLICIES else Variant()

    def policy_section(self) -> dict[str, Any]:
        """The job spec's ``policy`` section: the service policy, ratio, epochs, seed, params."""
        name = SERVICE_NAMES.get(self.policy, self.policy)
        ratio = 1.0 if self.policy in ("full", "full_fewer") else self.ratio
        params: dict[str, Any] = {}
        if self.policy == "infobatch_max":
            params.update(prune_ratio=1.0, delta=1.0)
        if self.policy in ("rs2_prop", "rs2_equal"):
            params["class_quotas"] = "proportional" if self.policy == "rs2_prop" else "equal"
        if self.policy == "factor_loss_eq":
            params["class_quotas"] = "equal"
        if self.policy in ("factor_loss_clean", "factor_loss_clean_b1"):
            params.update(FACTOR_LOSS_CLEAN)
        if self.policy == "factor_loss_clean_b1":
            params["beta"] = 1.0  # the ablation: the clipped loss without the SAE's diversity
        variant = self.variant_spec
        if self.policy in FACTOR_POLICIES and self.variant not in ON_DEFAULTS:
            # every recorded variant was run against the literal form, before the ablation made
            # quotas + dynamic coverage the policy's default: pin it so the keys keep meaning
            params.update(LITERAL_BASE)
        if self.policy == "factor_gumbel":
            params["sampling"] = "gumbel"
        params.update(variant.params)
        return {
            "name": name,
            "ratio": ratio,
            "epochs": self.job_epochs,
            "seed": self.seed,
            "params": params,
        }

    def job_spec(self, task: TaskSpec, data: TaskData) -> dict[str, Any]:
        """The ``POST /v1/jobs`` body of this run."""
        variant = self.variant_spec
        spec: dict[str, Any] = {
            "name": self.key.replace("|", "_").replace("=", "")[:200],
            "dataset": {
                "uri": data.uri,
                "label_column": data.label_column,
                "feature": {**data.feature, **task.feature_overrides, **variant.feature},
            },
            "policy": self.policy_section(),
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
