"""The GPU benchmark scripts, run on the CPU in smoke form, report what they really did.

They are meant for one device call on an H200; these tests make sure a lent session finds them
working and that their reports can be trusted: the rows counted equal N, the throughputs are
finite and positive, and the codes and selections equal the CPU path's on the same data,
recomputed here from the library (not read back from the script's own checks). Each script also
checks itself (``"checks"`` in its JSON, exit 1 on a failure), so a device run that goes wrong
says so; the tests require those checks to pass and to be there.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from saelect.service.policies import PolicyConfig, make_policy
from saelect.service.selection.engine import SingleProcessSelector
from saelect.workers.codes import SparseCodes
from saelect.workers.datasets import FMNIST_DIR, load_fashion_mnist, write_image_parquet
from saelect.workers.factors import factor_counts, factor_frequencies
from saelect.workers.features import FeatureSpec
from saelect.workers.sae import SAEConfig
from saelect.workers.sae_encode import encode
from saelect.workers.sae_files import load_sae
from saelect.workers.scores import ScoreConfig, score_codes
from saelect.workers.scoring_local import score_single_process
from saelect.workers.shard_data import ShardData

from benchmarks import gpu_regimes
from benchmarks.gpu_checks import digest
from benchmarks.gpu_scoring import generate
from benchmarks.train_regimes import lt_counts
from tests.optional import requires_fashion_mnist

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(script: str, *args: str, rc: int = 0) -> str:
    cmd = [sys.executable, str(BENCH / script), "--device", "cpu", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == rc, out.stdout[-3000:] + out.stderr[-4000:]
    return out.stdout


def _assert_checks_passed(report: dict[str, Any], expected: set[str]) -> None:
    checks = report["checks"]
    assert checks["ok"] and checks["failed"] == [], checks
    assert expected <= set(checks["checks"]), sorted(checks["checks"])
    assert all(c["ok"] for c in checks["checks"].values())


# --- gpu_scoring.py -----------------------------------------------------------------------

SCORING = {"n": 6000, "d": 32, "units": 128, "k": 8, "atoms": 64, "active": 8, "seed": 0}


def test_gpu_scoring_counts_every_row_and_matches_the_cpu_path(tmp_path: Path) -> None:
    out, saved = tmp_path / "scoring.json", tmp_path / "saved"
    _run("gpu_scoring.py", "--n", "6000", "--d", "32", "--units", "128", "--k", "8",
         "--atoms", "64", "--fit-samples", "3000", "--batch-size", "1024",
         "--encode-batch", "2048", "--check-rows", "1000", "--out", str(out),
         "--save-dir", str(saved))  # fmt: skip
    report = json.loads(out.read_text())
    n, units = SCORING["n"], SCORING["units"]

    # rows counted: every row encoded on the device and copied to the host, every fit row seen
    assert report["n"] == report["encode_rows"] == n
    assert report["encode_rows_device"] == report["encode_rows_host"] == n
    assert report["fit_samples_seen"] == 3000 * report["fit_epochs"]
    rates = {key: v for key, v in report.items() if key.endswith("_per_s")}
    assert {"fit_samples_per_s", "encode_device_samples_per_s", "scores_samples_per_s"} <= set(
        rates
    )
    assert all(math.isfinite(v) and v > 0 for v in rates.values()), rates
    assert report["mse_after"] < report["mse_before"]

    # the CPU path on the same data: regenerate it, encode with the library, score
    codes = SparseCodes.from_bytes((saved / "codes.bin").read_bytes())
    assert codes.num_samples == n
    x_ND = generate(n, SCORING["d"], SCORING["atoms"], SCORING["active"], torch.device("cpu"), 0)
    ref = encode(load_sae(saved), x_ND.numpy())
    assert codes.equals(ref)
    counts = factor_counts(ref, units)
    p = factor_frequencies(counts, n)
    r_ref, d_ref = score_codes(ref, p, ScoreConfig())
    assert report["counted_active_entries"] == int(counts.sum())
    assert report["alive_units"] == int((p > 0).sum())
    assert report["mean_R"] == pytest.approx(float(r_ref.mean()), rel=1e-12)
    assert report["mean_D"] == pytest.approx(float(d_ref.mean()), rel=1e-12)
    r_got, _ = score_codes(codes, p, ScoreConfig())
    m = n // 2
    top = np.argsort(-r_got, kind="stable")[:m]
    assert np.array_equal(top, np.argsort(-r_ref, kind="stable")[:m])  # the same selection

    # the script's own comparison on the CPU is exact, and every self-check is there and passed
    assert report["check_rows"] == 1000
    assert report["cpu_code_agreement"] == report["cpu_selection_overlap"] == 1.0
    assert report["cpu_value_max_rel_diff"] == 0.0
    _assert_checks_passed(
        report,
        {
            "rows_counted",
            "fit_rows_counted",
            "throughput_finite_positive",
            "codes_valid",
            "factor_counts_total",
            "cpu_code_agreement",
            "cpu_selection_overlap",
        },
    )


# --- gpu_train.py -------------------------------------------------------------------------


def _cpu_selection(
    images: np.ndarray, labels: np.ndarray, args: dict[str, Any], tmp: Path
) -> dict[tuple[str, float], list[str]]:
    """Per-epoch index digests of ``full`` and ``factor`` r = 0.5 by the service's CPU path."""
    uri = write_image_parquet(tmp / "smoke.parquet", images, labels)
    sc = score_single_process(
        str(uri),
        FeatureSpec(kind="pixels", column="image", dim=args["pca_dim"]),
        "label",
        SAEConfig(units=args["units"], k=args["k"], epochs=args["sae_epochs"], seed=0),
        ScoreConfig(),
    )
    shard = sc.shard_data()
    out = {}
    for name, ratio in (("full", 1.0), ("factor", 0.5)):
        cfg = PolicyConfig(name=name, ratio=ratio, epochs=args["epochs"], seed=0, params={})
        sel = SingleProcessSelector(make_policy(cfg), shard)
        out[(name, ratio)] = [digest(sel.step().indices) for _ in range(args["epochs"])]
    return out


@requires_fashion_mnist
def test_gpu_train_counts_every_sample_and_trains_on_the_cpu_paths_selection(
    tmp_path: Path,
) -> None:
    out = tmp_path / "train.json"
    _run("gpu_train.py", "--smoke", "--ratios", "0.5", "--policies", "factor",
         "--out", str(out))  # fmt: skip
    report = json.loads(out.read_text())
    args = report["args"]
    n, epochs = 600, args["epochs"]
    assert (report["tasks"]["fmnist"]["n_train"], report["n_test"], epochs) == (n, 200, 2)
    runs = {(r["policy"], r["ratio"]): r for r in report["runs"]}
    assert set(runs) == {("full", 1.0), ("factor", 0.5)}

    # samples counted: what the batches held, per the plan (m = round(r N) per epoch)
    assert runs[("full", 1.0)]["samples_seen"] == n * epochs
    assert runs[("factor", 0.5)]["samples_seen"] == 300 * epochs
    assert runs[("full", 1.0)]["samples"] == 1.0 and runs[("factor", 0.5)]["samples"] == 0.5
    for r in runs.values():
        assert math.isfinite(r["train_samples_per_s"]) and r["train_samples_per_s"] > 0
        assert all(0.0 <= a <= 1.0 for a in r["acc_per_epoch"]) and len(r["acc_per_epoch"]) == 2
        assert math.isfinite(r["last_loss"])
    assert math.isfinite(report["scoring_s"]) and report["scoring_s"] > 0

    # the selection trained on equals the CPU path's on the same 600 rows
    train = load_fashion_mnist(FMNIST_DIR, "train")
    ref = _cpu_selection(train.images[:n], train.labels[:n], args, tmp_path)
    for key, run in runs.items():
        assert run["epoch_sha256"] == ref[key], key

    _assert_checks_passed(
        report,
        {
            "scored_rows",
            "scored_labels",
            "scores_in_unit_interval",
            "factor_r0.5_s0_samples_counted",
            "factor_r0.5_s0_epoch_sizes",
            "factor_r0.5_s0_reproducible",
            "full_r1_s0_samples_counted",
            "full_s0_accuracy",
        },
    )


# --- gpu_train.py --preset regimes --------------------------------------------------------

SMOKE_ROWS = {"fmnist-noisy": 600, "fmnist-lt": 294, "fmnist-dup": 600}
"""N per regime in the smoke form: 600 base rows; the long tail from a 120-image head."""


def test_gpu_regime_plan_runs_each_regimes_policies_seed_by_seed() -> None:
    tasks = ["fmnist-noisy", "fmnist-lt", "fmnist-dup"]
    plan = gpu_regimes.run_plan(
        tasks, [0.2, 0.3], [0, 1, 2, 3, 4], gpu_regimes.TASK_POLICIES, epochs=20
    )
    assert plan[0] == ("fmnist-noisy", "full", 1.0, 0)
    assert [p for p in plan if p[1] == "full"] == [(t, "full", 1.0, 0) for t in tasks]
    for task in tasks:
        for seed in range(5):
            for r in (0.2, 0.3):
                got = [p[1] for p in plan if p[0] == task and p[2] == r and p[3] == seed]
                assert got == list(gpu_regimes.TASK_POLICIES[task])
    seeds = [p[3] for p in plan]
    assert seeds == sorted(seeds)  # seed by seed: a cut by the budget keeps whole seeds first
    short = gpu_regimes.run_plan(["fmnist-lt"], [0.2], [0], {"fmnist-lt": ("full_fewer",)}, 2)
    assert short == [("fmnist-lt", "full", 1.0, 0)]  # round(0.2 * 2) = 0 epochs: left out


@requires_fashion_mnist
def test_gpu_train_regimes_count_samples_and_serve_what_the_cpu_path_selects(
    tmp_path: Path,
) -> None:
    out = tmp_path / "regimes.json"
    _run("gpu_train.py", "--smoke", "--preset", "regimes", "--policies",
         "rs2_prop,factor_loss_clean", "--out", str(out))  # fmt: skip
    report = json.loads(out.read_text())
    epochs = report["args"]["epochs"]
    assert epochs == 2 and report["n_test"] == 200
    train = load_fashion_mnist(FMNIST_DIR, "train")
    md = out.with_suffix(".md").read_text()
    assert md == gpu_regimes.render(report)  # --render gives back the written block
    for task, n in SMOKE_ROWS.items():
        # the regime's rows, rebuilt here from the library
        _, labels, meta = gpu_regimes.task_data(
            task, train.images, train.labels, base_size=600, head_size=120
        )
        info = report["tasks"][task]
        assert info["n_train"] == labels.shape[0] == n
        assert info["class_counts"] == np.bincount(labels, minlength=10).tolist()
        if task == "fmnist-lt":
            assert info["class_counts"] == lt_counts(120, 10, 100.0).tolist()
        assert info["noisy_rows"] == (180 if task == "fmnist-noisy" else 0)
        rows = {r["policy"]: r for r in report["runs"] if r["task"] == task}
        assert set(rows) == {"full", "rs2_prop", "factor_loss_clean"}, task

        # samples counted: what the batches held; r = 0.5 keeps round(n / 2) rows per epoch
        assert rows["full"]["samples_seen"] == n * epochs
        for name in ("rs2_prop", "factor_loss_clean"):
            assert rows[name]["samples_seen"] == (n // 2) * epochs, (task, name)
            assert rows[name]["sample_fraction"] == 0.5
        for r in rows.values():
            acc = sum(r["class_correct"]) / 200
            assert r["final_acc"] == acc and 0.0 <= acc <= 1.0
            assert math.isfinite(r["train_samples_per_s"]) and r["train_samples_per_s"] > 0

        # the class-balanced rotation trained on the CPU path's selection, and the served shares
        # of the regime's rows are those of these indices
        cfg = PolicyConfig("rs2", 0.5, epochs, 0, {"class_quotas": "proportional"})
        sel = SingleProcessSelector(make_policy(cfg), ShardData(0, n, labels=labels))
        served = [sel.step().indices for _ in range(epochs)]
        reg = rows["rs2_prop"]["regime"]
        assert rows["rs2_prop"]["epoch_sha256"] == [digest(i) for i in served]
        all_idx = np.concatenate(served)
        tail = np.isin(labels, [7, 8, 9])
        assert reg["served_tail_share"] == pytest.approx(float(tail[all_idx].mean()))
        if task == "fmnist-noisy":
            assert reg["served_noisy_share"] == pytest.approx(meta["noisy"][all_idx].mean())
        if task == "fmnist-dup":
            dedup = int(np.unique(meta["group"]).shape[0])
            assert info["dedup_n"] == reg["dedup_n"] == dedup < n
            assert reg["sample_fraction_dedup"] == pytest.approx(all_idx.size / (dedup * epochs))

        # the doc block has the task's table with its rows
        assert f"#### Task `{task}` (GPU, N = {n:,}, E = 2)" in md
        for name in ("rs2_prop", "factor_loss_clean"):
            assert f"| {name} | 0.5 | 1 |" in md, (task, name)
        assert "| full | 1 | 1 |" in md

    _assert_checks_passed(
        report,
        {
            "fmnist-noisy:noisy_rows",
            "fmnist-lt:class_profile",
            "fmnist-dup:dedup_n",
            "fmnist-dup:scored_rows",
            "fmnist-noisy:factor_loss_clean_r0.5_s0_reproducible",
            "fmnist-lt:rs2_prop_r0.5_s0_samples_counted",
            "fmnist-dup:full_s0_accuracy",
            "runs_finished",
        },
    )


@requires_fashion_mnist
def test_gpu_train_budget_starts_nothing_it_cannot_finish_and_fails(tmp_path: Path) -> None:
    out = tmp_path / "none.json"
    _run("gpu_train.py", "--smoke", "--preset", "regimes", "--tasks", "fmnist-lt",
         "--budget-s", "0", "--out", str(out), rc=1)  # fmt: skip
    report = json.loads(out.read_text())
    assert report["runs"] == [] and len(report["skipped"]) == 5
    assert report["checks"]["failed"] == ["runs_finished"]
