"""Self-checks of ``benchmarks/gpu_train.py``: the scoring, every run, and every task's data.

Each check goes into the script's ``Checks`` (``benchmarks/gpu_checks.py``) with its measured
value and expectation; the script exits 1 when one fails. Run checks recompute what they can
from the library instead of trusting the loop: each epoch's size from the policy's plan, the
samples from the plan's sizes, and the selection by a second selector that replays the same
feedback (for a loss-based policy the losses the run posted), which must select the same.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from saelect.service.policies import PolicyConfig, make_policy
from saelect.service.selection.engine import SingleProcessSelector
from saelect.workers.shard_data import ShardData

from benchmarks.gpu_checks import Checks, digest, finite_positive
from benchmarks.train_regimes import lt_counts


def check_scores(
    checks: Checks, shard: ShardData, labels: np.ndarray, units: int, prefix: str = ""
) -> None:
    """The scoring covers every row with its label; R, D finite in [0, 1]; codes valid."""
    n = int(labels.shape[0])
    checks.add(f"{prefix}scored_rows", shard.n == n, value=shard.n, expect=f"== N = {n}")
    same_labels = shard.labels is not None and np.array_equal(shard.labels, labels)
    checks.add(
        f"{prefix}scored_labels",
        same_labels,
        value=same_labels,
        expect="the loaded labels, in order",
    )
    rd = np.concatenate([shard.R, shard.D])
    rd_ok = bool(np.isfinite(rd).all() and rd.min() >= 0.0 and rd.max() <= 1.0)
    checks.add(
        f"{prefix}scores_in_unit_interval", rd_ok, value=rd_ok, expect="R, D finite in [0, 1]"
    )
    ids = np.asarray(shard.code_ids)
    alive = int(np.unique(ids[np.asarray(shard.code_values) > 0]).size)
    codes_ok = bool(ids.shape[0] == n and ids.min() >= 0 and ids.max() < units and alive > 0)
    checks.add(
        f"{prefix}codes_valid",
        codes_ok,
        value={"rows": int(ids.shape[0]), "alive_units": alive},
        expect=f"N rows of ids in [0, {units}), some unit active",
    )


def check_regime(
    checks: Checks,
    task: str,
    labels: np.ndarray,
    meta: dict[str, Any],
    *,
    base_size: int,
    head_size: int,
    noise: float = 0.3,
) -> None:
    """A regime's rows have the stated shape: N, the noisy share, the long-tail class profile,
    the duplicate groups (``benchmarks/train_regimes.py``)."""
    n = int(labels.shape[0])
    if task == "fmnist-lt":
        want = lt_counts(head_size, 10, 100.0).tolist()
        got = np.bincount(labels, minlength=10).tolist()
        checks.add(f"{task}:class_profile", got == want, value=got, expect=f"{want}")
        return
    checks.add(f"{task}:rows", n == base_size, value=n, expect=f"== base_size = {base_size}")
    if task == "fmnist-noisy":
        k = int(meta["noisy"].sum())
        checks.add(f"{task}:noisy_rows", k == round(noise * n), value=k, expect=f"round({noise} N)")
    if task == "fmnist-dup":
        dedup = int(meta["dedup_n"])
        ok = dedup == np.unique(meta["group"]).shape[0] and dedup < n
        checks.add(f"{task}:dedup_n", ok, value=dedup, expect=f"distinct groups, < N = {n}")


def expected_sizes(section: dict[str, Any], n: int) -> list[int]:
    """Each epoch's size as the policy plans it for N = ``n``."""
    return make_policy(PolicyConfig(**section)).plan(n)


def replay(
    section: dict[str, Any], shard: ShardData, losses: list[np.ndarray], epochs_idx: list
) -> list[str]:
    """Digests of a second selector's epochs, given the feedback the run posted (if any)."""
    sel = SingleProcessSelector(make_policy(PolicyConfig(**section)), shard)
    out = []
    for t in range(section["epochs"]):
        out.append(digest(sel.step().indices))
        if losses:
            sel.feedback(epochs_idx[t], losses[t])
    return out


def check_run(
    checks: Checks,
    row: dict[str, Any],
    section: dict[str, Any],
    epochs_idx: list[np.ndarray],
    again: list[str],
    *,
    n: int,
    prefix: str = "",
) -> None:
    """One run's checks: sizes per the plan, distinct in-range indices, samples counted, finite
    figures, the selection drawn twice the same (``again``: the replay's digests)."""
    variant = "" if row["variant"] in ("-", "service_default") else f"[{row['variant']}]"
    name = f"{prefix}{row['policy']}{variant}_r{row['ratio']:g}_s{row['seed']}"
    want = expected_sizes(section, n)
    sizes = [len(e) for e in epochs_idx]
    checks.add(f"{name}_epoch_sizes", sizes == want, value=sizes, expect=f"the plan's {want}")
    valid = all(
        e.size == np.unique(e).size and (e.size == 0 or (e.min() >= 0 and e.max() < n))
        for e in epochs_idx
    )
    checks.add(f"{name}_indices_valid", valid, value=valid, expect=f"distinct, in [0, {n})")
    checks.add(
        f"{name}_samples_counted",
        row["samples_seen"] == sum(want),
        value=row["samples_seen"],
        expect=f"== sum of the plan's sizes = {sum(want)}",
    )
    checks.add(
        f"{name}_throughput",
        finite_positive(row["train_samples_per_s"], row["train_s"]),
        value=row["train_samples_per_s"],
        expect="finite and > 0",
    )
    accs = [*row["acc_per_epoch"], row["last_loss"]]
    finite = all(math.isfinite(a) for a in accs) and all(0 <= a <= 1 for a in row["acc_per_epoch"])
    checks.add(f"{name}_finite", finite, value=accs, expect="accuracies in [0, 1], a finite loss")
    same = again == row["epoch_sha256"]
    checks.add(f"{name}_reproducible", same, value=same, expect="a second draw gives the same")
    reg = row.get("regime")
    if reg is not None:
        shares = [v for k, v in reg.items() if k.startswith("served_") and isinstance(v, float)]
        ok = all(0.0 <= v <= 1.0 for v in shares) and math.isfinite(reg["balanced_acc"])
        checks.add(f"{name}_regime_figures", ok, value=shares, expect="served shares in [0, 1]")
