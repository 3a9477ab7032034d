"""Tasks of ``benchmarks/gpu_train.py``: the clean Fashion-MNIST table and the data regimes.

The regimes are the ones of the CPU sweep (``benchmarks/train_regimes.py``: near-duplicates, a
long tail with imbalance ratio 100, 30% symmetric label noise; built with seed 15, the test set
untouched), at the full scale a GPU affords: ``base_size`` rows (all 60k by default) for the
duplicate and noisy regimes, ``head_size`` head images (6000: 14,886 rows) for the long tail.
Each task has the policies its conclusion rests on (``TASK_POLICIES``, bench names of
``benchmarks/train_variants.py``, with the CPU bench's params through ``RunSpec``).

Run records have the CPU bench's fields (``task``, ``policy``, ``variant``, ``ratio``, ``seed``,
``final_acc``, ``sample_fraction``, ``regime``), so the tables and the target check of
``benchmarks/train_regimes_report.py`` render them (``render``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.doc_block import replace_marked
from benchmarks.train_regimes import (
    HEAD_CLASSES,
    REGIMES,
    TAIL_CLASSES,
    build_regime,
    lt_counts,
    regime_diagnostics,
)
from benchmarks.train_regimes_report import group_runs, target_check, task_table
from benchmarks.train_runs import RunSpec
from benchmarks.train_variants import FACTOR_POLICIES, FEEDBACK_POLICIES

TASKS: tuple[str, ...] = ("fmnist", *REGIMES)
"""``fmnist``: the clean 60k table; the others: ``benchmarks/train_regimes.py``."""
TASK_POLICIES: dict[str, tuple[str, ...]] = {
    "fmnist": ("factor", "rs2", "full_fewer"),
    "fmnist-ref": ("factor", "factor_loss", "rs2", "full_fewer"),
    "fmnist-noisy": ("factor_loss_clean", "factor_loss_clean_b1", "rs2", "rs2_prop", "full_fewer"),
    "fmnist-lt": ("rs2_equal", "factor_loss_eq", "rs2", "full_fewer"),
    "fmnist-dup": ("factor", "rs2", "rs2_prop", "full_fewer"),
}
"""Per task, the policies a conclusion rests on: the best saelect policy of the CPU sweep and
the baselines it must beat (``rs2``, class-balanced ``rs2``, full data for fewer epochs); on
noisy labels also the win's ablation without the SAE's diversity (``factor_loss_clean_b1``)."""
DOC_BEGIN, DOC_END = "<!-- gpu-train:begin -->", "<!-- gpu-train:end -->"
DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks_gpu.md"


def variant_of(policy: str) -> str:
    """The run's variant: ``factor``'s current defaults for factor policies, ``-`` otherwise."""
    return "service_default" if policy in FACTOR_POLICIES else "-"


def run_spec(task: str, policy: str, ratio: float, seed: int, epochs: int) -> RunSpec:
    """The CPU bench's ``RunSpec`` of a GPU run (``full`` at ratio 1)."""
    r = 1.0 if policy == "full" else ratio
    return RunSpec(task, policy, r, seed, epochs, variant_of(policy))


def needs_feedback(policy: str) -> bool:
    """True for the loss-based bench policies (the run posts per-sample losses)."""
    return policy in FEEDBACK_POLICIES


def task_rows(task: str, base_size: int, head_size: int) -> int:
    """N of a task's training rows (without building them)."""
    return int(lt_counts(head_size, 10, 100.0).sum()) if task == "fmnist-lt" else base_size


def task_data(
    task: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    base_size: int,
    head_size: int,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A task's training rows from the full training set.

    Parameters
    ----------
    images: uint8 (N, 28, 28); labels: int64 (N,): Fashion-MNIST's training set.
    base_size: rows of the clean, duplicate and noisy regimes (``fmnist``: the first rows).
    head_size: n_0 of the long tail.

    Returns
    -------
    (uint8 (n, 28, 28), int64 (n,), meta) where meta holds ``group`` int64 (n,) (deduplicated
    image ids), ``noisy`` bool (n,), ``dedup_n``; empty for ``fmnist``.
    """
    if task == "fmnist":
        return images[:base_size], labels[:base_size].astype(np.int64), {}
    kwargs = {"head_size": head_size} if task == "fmnist-lt" else {}
    reg = build_regime(task, images, labels, base_size=base_size, **kwargs)
    meta = {
        "group": reg.group,
        "noisy": reg.noisy,
        "dedup_n": int(np.unique(reg.group).shape[0]),
    }
    return reg.images, reg.labels, meta


def run_plan(
    tasks: list[str],
    ratios: list[float],
    seeds: list[int],
    policies: dict[str, tuple[str, ...]],
    epochs: int,
) -> list[tuple[str, str, float, int]]:
    """(task, policy, ratio, seed) in the order the script runs them, the most needed first:
    seed by seed, task by task; ``full`` once per task (the first seed), then per ratio the
    task's policies (``full_fewer`` where round(r E) >= 1)."""
    out = []
    for seed in seeds:
        for task in tasks:
            if seed == seeds[0]:
                out.append((task, "full", 1.0, seed))
            for r in ratios:
                names = [p for p in policies[task] if p != "full_fewer" or round(r * epochs) >= 1]
                out += [(task, p, r, seed) for p in names]
    return out


def regime_metrics(
    class_correct: np.ndarray,
    class_total: np.ndarray,
    served: list[np.ndarray],
    meta: dict[str, Any],
    labels: np.ndarray,
    epochs: int,
) -> dict[str, Any]:
    """The ``regime`` part of a record: per-class, balanced, head and tail test accuracy, and
    what the selections served (``train_regimes.regime_diagnostics``).

    class_correct, class_total: int (C,); served: the epochs' int64 indices; labels: (n,).
    """
    acc_c = class_correct / np.maximum(class_total, 1)
    out: dict[str, Any] = {
        "class_acc": [round(float(a), 4) for a in acc_c],
        "balanced_acc": float(np.mean(acc_c)),
        "head_acc": float(np.mean(acc_c[list(HEAD_CLASSES)])),
        "tail_acc": float(np.mean(acc_c[list(TAIL_CLASSES)])),
    }
    out.update(regime_diagnostics(served, meta, labels, epochs))
    return out


def render(report: dict[str, Any]) -> str:
    """The markdown block of a ``gpu_train.py`` JSON: per task its table and target lines."""
    runs = [r for r in report["runs"] if r.get("kind") == "run"]
    m = report["machine"]
    a = report["args"]
    failed = report["checks"]["failed"]
    lines = [
        f"Device: {m['device']}, torch {m['torch']}; preset `{a.get('preset') or 'none'}`, "
        f"width {a['width']}, batch {a['batch_size']}, E = {a['epochs']}, "
        f"{len(runs)} runs in {report.get('total_s', float('nan')):.0f} s; checks: "
        f"{'all passed' if not failed else f'FAILED {failed}'}.",
        "",
    ]
    if report.get("skipped"):
        skipped = report["skipped"]
        lines += [f"Not run (budget): {len(skipped)} runs, the first: {skipped[0]}.", ""]
    groups = group_runs(runs)
    for task in [t for t in TASKS if any(k[0] == t for k in groups)]:
        n = report["tasks"][task]["n_train"]
        lines += [f"#### Task `{task}` (GPU, N = {n:,}, E = {a['epochs']})", ""]
        lines += [*task_table(task, groups), ""]
        lines += [*target_check(task, groups), ""]
    return "\n".join(lines).rstrip() + "\n"


def write_doc(block: str, doc: Path = DOC) -> None:
    """Replace the marked block of ``doc`` (ValueError when the markers are missing)."""
    replace_marked(doc, DOC_BEGIN, DOC_END, block)
