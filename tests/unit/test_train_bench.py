"""The training benchmark's machinery: the quick digits sweep end to end (in-process engine),
resuming from the JSONL, the LR schedule over the plan's steps, batch augmentation, the run order,
and the report and plots from a tiny results file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import (
    train_bench,
    train_plots,
    train_report,
    train_runs,
    train_tasks,
    train_variants,
)
from benchmarks.train_data import TaskData
from benchmarks.train_loop import OptimConfig, lr_at, steps_per_epoch, train
from benchmarks.train_models import AugmentConfig, augment_batch


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "train.jsonl"
    argv = ["--task", "digits", "--quick", "--via", "inprocess", "--out", str(out)]
    argv += ["--data-root", str(tmp / "data"), "--threads", "1"]
    assert train_bench.main(argv) == 0
    return tmp, train_runs.read_results(out)


def test_quick_digits_records_every_run(quick_run: tuple[Path, list[dict[str, Any]]]) -> None:
    _, records = quick_run
    runs = {r["policy"]: r for r in records if r["kind"] == "run"}
    assert set(runs) == set(train_bench.QUICK["policies"])
    for r in runs.values():
        assert len(r["acc_curve"]) == r["job_epochs"]
        assert 0.0 <= r["final_acc"] <= 1.0
        assert r["best_acc"] == max(r["acc_curve"]) and r["final_acc"] == r["acc_curve"][-1]
        assert r["samples"] == sum(r["epoch_sizes"])
        assert r["train_s"] > 0 and r["select_s"] >= 0
    assert runs["full"]["best_acc"] > 0.3  # 10 classes: full data learns in 2 epochs
    e = runs["full"]["epochs"]
    assert e == 2
    assert runs["full"]["sample_fraction"] == 1.0
    # full data for round(0.3 * 2) = 1 epoch: half the samples of the full run
    assert runs["full_fewer"]["job_epochs"] == 1
    assert runs["full_fewer"]["sample_fraction"] == pytest.approx(0.5)
    n = runs["full"]["epoch_sizes"][0]
    for p in ("rs2", "factor"):
        assert runs[p]["epoch_sizes"] == [round(0.3 * n)] * e
        assert runs[p]["steps"] == runs[p]["planned_steps"]


def test_quick_factor_diagnostics(quick_run: tuple[Path, list[dict[str, Any]]]) -> None:
    _, records = quick_run
    fac = next(r for r in records if r["kind"] == "run" and r["policy"] == "factor")
    eps = fac["diagnostics"]["epochs"]
    assert len(eps) == fac["job_epochs"]
    covs = [x["coverage"] for x in eps]
    assert covs == sorted(covs) and 0 < covs[0] <= 1
    for x in eps:
        assert sum(x["class_share"]) == pytest.approx(1.0, abs=1e-3)
        assert 0.0 <= x["lambda"] <= 1.0
        assert 0.0 <= x["mean_R"] <= 1.0 and 0.0 <= x["mean_D"] <= 1.0
    scoring = [r for r in records if r["kind"] == "scoring"]
    assert len(scoring) == 1 and scoring[0]["key"] == "scoring|" + fac["scoring_key"]
    assert -1.0 <= scoring[0]["spearman_RD"] <= 1.0


def test_resume_skips_done_runs(quick_run: tuple[Path, list[dict[str, Any]]]) -> None:
    tmp, records = quick_run
    out = tmp / "train.jsonl"
    before = out.read_text()
    argv = ["--task", "digits", "--quick", "--via", "inprocess", "--out", str(out)]
    argv += ["--data-root", str(tmp / "data"), "--threads", "1"]
    assert train_bench.main(argv) == 0
    assert out.read_text() == before  # nothing to do, nothing appended
    # a torn last line (crash while writing) is ignored and the done keys stay
    with out.open("a") as f:
        f.write('{"kind": "run", "key": "torn')
    assert train_runs.done_keys(out) == {r["key"] for r in records if r["kind"] == "run"}


def test_plan_runs_order_and_keys() -> None:
    runs = train_runs.plan_runs(
        "fmnist",
        policies=["full", "rs2", "factor", "full_fewer", "infobatch"],
        ratios=[0.5, 0.1, 0.2],
        seeds=[0, 1],
        epochs=4,
        variants=["default", "gamma0"],
    )
    keys = [r.key for r in runs]
    assert len(keys) == len(set(keys))
    assert [r.policy for r in runs[:2]] == ["full", "full"]
    low_core = [
        i
        for i, r in enumerate(runs)
        if r.ratio <= 0.3 and r.policy in ("factor", "rs2", "full_fewer")
    ]
    others = [i for i, r in enumerate(runs) if r.policy == "infobatch" or 0.3 < r.ratio < 1.0]
    assert max(low_core) < min(others)
    # round(0.1 * 4) = 0 epochs: no full_fewer run at r = 0.1
    assert not any(r.policy == "full_fewer" and r.ratio == 0.1 for r in runs)
    assert {r.variant for r in runs if r.policy == "factor"} == {"default", "gamma0"}
    assert {r.variant for r in runs if r.policy != "factor"} == {"-"}


def test_variants_expand_and_reach_the_job_spec() -> None:
    names = train_variants.expand_variants(["default", "beyond", "quotas"])
    assert names[0] == "default" and names.count("quotas") == 1
    with pytest.raises(ValueError, match="unknown variant"):
        train_variants.expand_variants(["nope"])
    task = train_tasks.TASKS["fmnist"]
    data = TaskData(
        x_train=torch.zeros(1),
        y_train=torch.zeros(1),
        x_test=torch.zeros(1),
        y_test=torch.zeros(1),
        num_classes=10,
        uri="/d/train.parquet",
        feature={"kind": "pixels", "column": "image", "dim": 256},
    )
    spec = train_runs.RunSpec("fmnist", "factor_gumbel", 0.2, 1, 20, "pca64").job_spec(task, data)
    assert spec["policy"]["name"] == "factor" and spec["policy"]["params"]["sampling"] == "gumbel"
    assert spec["dataset"]["feature"]["dim"] == 64
    ss = train_runs.RunSpec("fmnist", "factor", 0.1, 0, 20, "qd_selfsup").job_spec(task, data)
    assert ss["dataset"]["feature"] == {"kind": "selfsup", "column": "image", "dim": 128}
    assert ss["policy"]["params"]["class_quotas"] is True
    soft = train_runs.RunSpec("fmnist", "factor", 0.1, 0, 20, "qd_gumbel0.5").job_spec(task, data)
    assert (
        soft["policy"]["params"]["sampling"] == "gumbel" and soft["policy"]["params"]["tau"] == 0.5
    )
    for group in ("penalty", "soft", "features"):  # every preset of a group is a known variant
        assert train_variants.expand_variants([group]) == list(train_variants.VARIANT_GROUPS[group])
    fewer = train_runs.RunSpec("fmnist", "full_fewer", 0.3, 0, 20, "-").job_spec(task, data)
    assert fewer["policy"] == {"name": "full", "ratio": 1.0, "epochs": 6, "seed": 0, "params": {}}


# --------------------------------------------------------------------------- LR over the plan
class _FakeSelector:
    """Serves fixed per-epoch sizes; with ``shrink`` the plan changes after each feedback."""

    def __init__(self, sizes: list[int], n: int, shrink: int = 0) -> None:
        self.sizes, self.n, self.shrink = list(sizes), n, shrink

    def plan(self, job_id: str, world_size: int = 1) -> dict[str, Any]:
        return {
            "epochs": [{"epoch": t, "size": s, "per_rank": s} for t, s in enumerate(self.sizes)]
        }

    def indices(self, job_id: str, epoch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        return np.arange(self.sizes[epoch], dtype=np.int64) % self.n

    def feedback(self, job_id: str, epoch: int, indices: np.ndarray, losses: np.ndarray) -> None:
        assert indices.shape == losses.shape and np.all(np.isfinite(losses))
        for t in range(epoch + 1, len(self.sizes)):
            self.sizes[t] = max(1, self.sizes[t] - self.shrink)


def _tiny_train(sel: _FakeSelector, epochs: int, batch: int, feedback: bool) -> Any:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=gen)
    y = (x[:, 0] > 0).long()
    return train(
        model=torch.nn.Linear(3, 2),
        x_train=x,
        y_train=y,
        x_test=x,
        y_test=y,
        selector=sel,
        job="j",
        epochs=epochs,
        optim=OptimConfig(lr=0.2, batch_size=batch, warmup_frac=0.1),
        augment=None,
        seed=0,
        send_feedback=feedback,
    )


@settings(max_examples=15, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 90), min_size=1, max_size=5),
    batch=st.integers(1, 32),
)
def test_lr_schedule_spans_the_planned_steps(sizes: list[int], batch: int) -> None:
    res = _tiny_train(_FakeSelector(sizes, 64), len(sizes), batch, feedback=False)
    expected = sum(math.ceil(s / batch) for s in sizes)
    assert res.total_steps == res.planned_steps == expected == len(res.lr_trace)
    assert res.epoch_sizes == sizes
    assert max(res.lr_trace) == pytest.approx(0.2)
    assert res.lr_trace[-1] == pytest.approx(0.0, abs=1e-12) or expected == 1
    lrs = np.asarray(res.lr_trace)
    peak = int(np.argmax(lrs))
    assert np.all(np.diff(lrs[: peak + 1]) >= -1e-12)  # warm-up rises
    assert np.all(np.diff(lrs[peak:]) <= 1e-12)  # cosine falls


def test_lr_schedule_follows_a_replanned_run() -> None:
    sel = _FakeSelector([40, 40, 40, 40], 64, shrink=15)
    res = _tiny_train(sel, 4, 8, feedback=True)
    assert res.epoch_sizes == [40, 25, 10, 1]
    assert res.total_steps == sum(steps_per_epoch(res.epoch_sizes, 8)) < res.planned_steps
    assert res.lr_trace[-1] == pytest.approx(0.0, abs=1e-12)  # the schedule ends where the run does


@settings(max_examples=30, deadline=None)
@given(total=st.integers(1, 500), warm=st.floats(0.0, 0.5))
def test_lr_at_warms_up_then_decays_to_zero(total: int, warm: float) -> None:
    lrs = [lr_at(s, total, peak=1.0, warmup_frac=warm) for s in range(total)]
    assert all(0.0 <= v <= 1.0 for v in lrs)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) or total == math.ceil(warm * total)
    with pytest.raises(ValueError):
        lr_at(0, 0, peak=1.0, warmup_frac=warm)


# --------------------------------------------------------------------------- augmentation
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), pad=st.integers(0, 3), flip=st.booleans())
def test_augment_is_a_shift_and_optional_flip(seed: int, pad: int, flip: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 2, 7, 7, generator=gen)
    out = augment_batch(x, AugmentConfig(pad=pad, flip=flip), torch.Generator().manual_seed(seed))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    for b in range(6):
        candidates = []
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                crop = padded[b, :, dy : dy + 7, dx : dx + 7]
                candidates.append(crop)
                if flip:
                    candidates.append(crop.flip(-1))
        assert any(torch.equal(out[b], c) for c in candidates)
    if pad == 0 and not flip:
        assert torch.equal(out, x)


# --------------------------------------------------------------------------- report and plots
def _record(policy: str, ratio: float, seed: int, acc: float, frac: float, **kw: Any) -> dict:
    run = train_runs.RunSpec("toy", policy, ratio, seed, 4, kw.pop("variant", "-"))
    rec = {
        "kind": "run",
        "key": run.key,
        "task": "toy",
        "policy": policy,
        "variant": run.variant,
        "ratio": ratio,
        "seed": seed,
        "epochs": 4,
        "job_epochs": run.job_epochs,
        "final_acc": acc,
        "best_acc": acc + 0.001,
        "acc_curve": [acc - 0.02, acc - 0.01, acc, acc][: run.job_epochs],
        "sample_fraction": frac,
        "train_s": 10.0 * frac,
        "select_s": 0.01,
        "via": "inprocess",
        "scoring_key": None,
    }
    rec.update(kw)
    return rec


def _tiny_results() -> list[dict[str, Any]]:
    diag = {
        "epochs": [
            {
                "epoch": t,
                "lambda": t / 3,
                "mean_R": 0.8 - 0.1 * t,
                "mean_D": 0.2 + 0.1 * t,
                "penalty_share": 0.3,
                "factor_coverage": 0.9,
                "coverage": 0.2 * (t + 1),
                "usage_std": 0.1 * t,
                "usage_max": t + 1,
                "class_share": [0.5, 0.5],
            }
            for t in range(4)
        ]
    }
    recs: list[dict[str, Any]] = [{"kind": "env", "machine": "toy", "argv": ["--task", "toy"]}]
    recs.append(
        {
            "kind": "scoring",
            "key": "scoring|abc",
            "scoring_s": 3.0,
            "spearman_RD": -0.9,
            "dead_share": 0.1,
            "feature": {"kind": "pixels"},
            "sae": {},
            "via": "inprocess",
        }
    )
    for seed, (f, fa, rs, fe) in enumerate([(0.90, 0.899, 0.88, 0.87), (0.92, 0.905, 0.89, 0.88)]):
        recs.append(_record("full", 1.0, seed, f, 1.0))
        recs.append(
            _record(
                "factor",
                0.2,
                seed,
                fa,
                0.2,
                diagnostics=diag,
                scoring_key="abc",
                class_prior=[0.5, 0.5],
                variant="default",
            )
        )
        recs.append(_record("factor", 0.2, seed, fa + 0.01, 0.2, variant="gamma0"))
        recs.append(_record("rs2", 0.2, seed, rs, 0.2, diagnostics=diag))
        recs.append(_record("full_fewer", 0.2, seed, fe, 0.2))
    return recs


def test_report_tables_from_tiny_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    for rec in _tiny_results():
        train_runs.append_record(path, rec)
    records = train_runs.read_results(path)
    twin = [dict(r, served_digest=["ab", "cd"]) for r in records if r.get("policy") == "rs2"]
    twin += [dict(r, via="http") for r in twin]
    twin[-1]["served_digest"] = ["ab", "ce"]  # one http run served other indices
    eq = train_report.equivalence_lines(twin)
    assert eq == [
        "- 2 runs were recorded by both paths: 2 had identical accuracy curves; of the 2 with "
        "index digests on both sides, 1 served identical indices in every epoch"
    ]
    text = train_report.render(records)
    assert "| full |" in text and "91.00 ± 1.41 (2)" in text  # mean ± sample std of 0.90, 0.92
    assert "| factor | 90.20 ± 0.42 (2) |" in text
    assert "| factor[gamma0] |" in text
    assert "gap +0.80 points" in text and "not met" in text  # 91.00 - 90.20
    assert "vs rs2: +1.70 points (better, spreads apart" in text
    assert "Spearman(R, D)" in text and "-0.900" in text
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# Title\n\nProse before.\n\n<!-- BEGIN GENERATED -->\nold\n"
        "<!-- END GENERATED -->\n\nProse after.\n"
    )
    train_report.write_doc(doc, text)
    out = doc.read_text()
    assert out.startswith("# Title\n\nProse before.") and out.rstrip().endswith("Prose after.")
    assert "old" not in out and out.count("BEGIN GENERATED") == 1
    assert train_report.main(["--results", str(path), "--doc", str(doc)]) == 0


def test_targets_check_factors_current_default_when_recorded() -> None:
    records = _tiny_results()
    literal = "\n".join(train_report.target_checks(train_report.runs_of(records, "toy")))
    assert "- r = 0.2: factor 90.20%" in literal
    records += [_record("factor", 0.2, s, 0.909, 0.2, variant="service_default") for s in (0, 1)]
    current = "\n".join(train_report.target_checks(train_report.runs_of(records, "toy")))
    assert "- r = 0.2: factor[service_default] 90.90% vs full 91.00%" in current
    assert "gap +0.10 points; target <= 0.20): met" in current


def test_plots_from_tiny_jsonl(tmp_path: Path) -> None:
    files = train_plots.make_plots(_tiny_results(), tmp_path)
    names = {p.name for p in files}
    assert names == {
        "train_toy_inprocess_acc_vs_samples.png",
        "train_toy_inprocess_learning_curves.png",
        "train_toy_inprocess_coverage_usage.png",
        "train_toy_inprocess_lambda_RD.png",
    }
    for p in files:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.dumps(_tiny_results())  # the records are plain JSON


def test_ablation_plot_needs_three_variants(tmp_path: Path) -> None:
    records = _tiny_results()
    path = tmp_path / "ablation.png"
    runs = train_report.runs_of(records, "toy")
    assert not train_plots.plot_ablation(runs, path, "toy")  # default + gamma0 only
    records += [_record("factor", 0.2, s, 0.91, 0.2, variant="service_default") for s in (0, 1)]
    assert train_plots.plot_ablation(train_report.runs_of(records, "toy"), path, "toy")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
