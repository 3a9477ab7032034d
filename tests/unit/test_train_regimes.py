"""The training benchmark's data regimes (issue 15): deterministic builders with the stated
shape, their diagnostics and metrics, and the bench's new policies' job specs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import train_runs, train_tasks, train_variants
from benchmarks.train_data import TaskData
from benchmarks.train_regimes import (
    build_regime,
    class_accuracy,
    lt_counts,
    make_dup,
    make_noisy,
    regime_diagnostics,
    stratified_subset,
)


def fake_images(n: int, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), np.arange(n) % classes


def test_stratified_subset_keeps_class_shares() -> None:
    _, labels = fake_images(1000)
    rows = stratified_subset(labels, 200, 0)
    assert rows.shape == (200,) and np.unique(rows).shape == (200,)
    assert np.bincount(labels[rows]).tolist() == [20] * 10
    assert np.array_equal(rows, stratified_subset(labels, 200, 0))


@settings(max_examples=20, deadline=None)
@given(dup=st.sampled_from([0.0, 0.3, 0.5]), src=st.sampled_from([0.02, 0.05, 0.1]))
def test_make_dup_replaces_rows_by_copies_of_sources(dup: float, src: float) -> None:
    images, labels = fake_images(400)
    reg = make_dup(images, labels, dup_share=dup, source_share=src, seed=1)
    n_dup, n_src = round(dup * 400), round(src * 400)
    assert reg.images.shape == images.shape and reg.labels.shape == (400,)
    assert np.unique(reg.group).shape[0] == 400 - n_dup  # deduplicated N
    # copies carry their source's label, and sources get n_dup / n_src (+-1) copies each
    assert np.array_equal(reg.labels, labels[reg.group])
    sizes = np.bincount(reg.group)[np.unique(reg.group)]
    if n_dup:
        big = sizes[sizes > 1] - 1
        assert big.shape[0] == n_src and big.max() - big.min() <= 1
    again = make_dup(images, labels, dup_share=dup, source_share=src, seed=1)
    assert np.array_equal(again.images, reg.images)


def test_dup_copies_are_near_their_source() -> None:
    images = np.zeros((100, 8, 8), dtype=np.uint8)
    images[:, 2:6, 2:6] = 200
    labels = np.zeros(100, dtype=np.int64)
    reg = make_dup(images, labels, dup_share=0.5, source_share=0.05, dup_noise=4.0, seed=0)
    diff = np.abs(reg.images.astype(int) - images[reg.group].astype(int))
    # a shift by (dy, dx) in {-1, 0, 1}^2 changes at most the symmetric difference of the 4x4
    # square and its shifted copy (14 pixels for a diagonal); the noise stays small
    assert np.all((diff > 30).sum(axis=(1, 2)) <= 14)
    assert np.any((diff > 30).sum(axis=(1, 2)) > 0)


def test_lt_profile_and_builder() -> None:
    counts = lt_counts(6000, 10, 100.0)
    assert counts[0] == 6000 and counts[-1] == 60 and np.all(np.diff(counts) < 0)
    images, labels = fake_images(6000)
    reg = build_regime("fmnist-lt", images, labels, base_size=0, imbalance=10.0)
    assert np.bincount(reg.labels).tolist() == lt_counts(600, 10, 10.0).tolist()


def test_make_noisy_flips_exactly_the_share_to_other_classes() -> None:
    _, labels = fake_images(1000)
    noisy_labels, noisy = make_noisy(labels, 10, noise=0.3, seed=2)
    assert noisy.sum() == 300
    assert np.all(noisy_labels[noisy] != labels[noisy])
    assert np.array_equal(noisy_labels[~noisy], labels[~noisy])
    # symmetric: every wrong class is drawn (roughly uniformly)
    wrong = (noisy_labels[noisy] - labels[noisy]) % 10
    assert set(np.unique(wrong).tolist()) == set(range(1, 10))


def test_build_regime_names() -> None:
    images, labels = fake_images(1000)
    ref = build_regime("fmnist-ref", images, labels, base_size=300)
    dup = build_regime("fmnist-dup", images, labels, base_size=300)
    noisy = build_regime("fmnist-noisy", images, labels, base_size=300)
    assert ref.labels.shape == dup.labels.shape == noisy.labels.shape == (300,)
    assert set(dup.group.tolist()) <= set(ref.group.tolist())  # ids index the full set
    assert noisy.noisy.sum() == 90
    with pytest.raises(ValueError, match="unknown regime"):
        build_regime("fmnist-x", images, labels, base_size=10)


def test_regime_diagnostics_count_dedup_noise_and_tail() -> None:
    labels = np.array([0, 0, 9, 9, 1, 1])
    meta = {
        "group": np.array([0, 0, 0, 3, 4, 5]),
        "noisy": np.array([False, True, False, False, False, False]),
        "dedup_n": 4,
    }
    served = [np.array([0, 1, 2]), np.array([3, 4])]
    d = regime_diagnostics(served, meta, labels, epochs=2)
    assert d["sample_fraction_dedup"] == pytest.approx(5 / 8)
    assert d["distinct_images_covered"] == pytest.approx(3 / 4)
    assert d["served_dup_share"] == pytest.approx(3 / 5)
    assert d["served_noisy_share"] == pytest.approx(1 / 5)
    assert d["served_noisy_share_per_epoch"] == [pytest.approx(1 / 3, abs=1e-4), 0.0]
    assert d["served_tail_share"] == pytest.approx(2 / 5)


def test_class_accuracy_matches_the_confusion() -> None:
    class Fixed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(x[:, 0].long(), 3).float()

    x = torch.tensor([[0.0], [1.0], [1.0], [2.0]])
    y = torch.tensor([0, 1, 0, 1])
    acc = class_accuracy(Fixed(), x, y, 3)
    assert acc[0] == 0.5 and acc[1] == 0.5 and np.isnan(acc[2])


def test_regime_tasks_and_new_bench_policies_reach_the_job_spec() -> None:
    task = train_tasks.TASKS["fmnist-dup"]
    assert task.eval_every == 5 and task.data_args == {"base_size": 10000}
    data = TaskData(
        x_train=torch.zeros(4, 1, 2, 2),
        y_train=torch.zeros(4, dtype=torch.long),
        x_test=torch.zeros(1, 1, 2, 2),
        y_test=torch.zeros(1, dtype=torch.long),
        num_classes=10,
        uri="/x.parquet",
        feature={"kind": "pixels", "column": "image", "dim": 8},
    )

    def spec(policy: str, variant: str = "-") -> dict:
        run = train_runs.RunSpec("fmnist-dup", policy, 0.2, 0, 10, variant)
        return run.job_spec(task, data)["policy"]

    assert spec("rs2_prop")["name"] == "rs2"
    assert spec("rs2_prop")["params"] == {"class_quotas": "proportional"}
    assert spec("rs2_equal")["params"] == {"class_quotas": "equal"}
    assert spec("factor_loss")["name"] == "factor_loss"
    assert spec("factor_loss_eq") == {**spec("factor_loss"), "params": {"class_quotas": "equal"}}
    assert spec("factor_loss_clean")["params"] == train_variants.FACTOR_LOSS_CLEAN
    b1 = spec("factor_loss_clean_b1")  # the ablation: the clipped loss without D
    assert b1["name"] == "factor_loss"
    assert b1["params"] == {**train_variants.FACTOR_LOSS_CLEAN, "beta": 1.0}
    both = train_variants.SCORED_POLICIES & train_variants.FEEDBACK_POLICIES
    assert "factor_loss_clean_b1" in both
    # fgamma variants sit on factor's current defaults (not the pinned literal form)
    assert spec("factor", "fgamma1")["params"] == {"factor_gamma": 1.0}
    run = train_runs.RunSpec("fmnist-dup", "factor", 0.2, 0, 10, "selfsup_default")
    assert run.job_spec(task, data)["dataset"]["feature"]["kind"] == "selfsup"
    assert "factor_loss" in train_variants.FEEDBACK_POLICIES
    with pytest.raises(ValueError, match="eval_every"):
        train_tasks.TaskSpec(
            name="x",
            data="fmnist",
            model=task.model,
            augment=None,
            epochs=2,
            optim=task.optim,
            sae={},
            eval_every=0,
        )


def test_regimes_report_tables_and_target_check(tmp_path: Path) -> None:
    from benchmarks import train_regimes_report as rep

    def rec(policy: str, variant: str, ratio: float, seed: int, acc: float) -> dict:
        key = f"fmnist-dup|{policy}|{variant}|r={ratio:g}|seed={seed}|E=10"
        return {
            "kind": "run",
            "key": key,
            "task": "fmnist-dup",
            "policy": policy,
            "variant": variant,
            "ratio": ratio,
            "seed": seed,
            "epochs": 10,
            "final_acc": acc,
            "sample_fraction": ratio,
            "regime": {"sample_fraction_dedup": 2 * ratio, "served_dup_share": 0.5},
        }

    records = []
    for seed, noise in enumerate([0.0, 0.004, -0.004]):
        records.append(rec("rs2", "-", 0.2, seed, 0.80 + noise))
        records.append(rec("full_fewer", "-", 0.2, seed, 0.79 + noise))
        records.append(rec("factor_loss", "-", 0.2, seed, 0.83 + noise))
    records.append(rec("full", "-", 1.0, 0, 0.88))
    for r in records:
        r.update(via="inprocess", served_digest=["a"])
    records.append({**records[0], "via": "http"})
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    block = rep.render(rep.read_results(path))
    assert "#### Task `fmnist-dup`" in block
    assert "| factor_loss | 0.2 | 3 | 83.00 ± 0.40 |" in block
    assert "**beats**" in block and "+3.00 ± 0.00 points" in block
    assert "full data (1 seed(s)): 88.00%" in block
    assert "`rs2` r = 0.2, seed 0: 80.00% (in-process 80.00%, " in block
    assert "served indices identical" in block
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{rep.BEGIN}\nold\n{rep.END}\noutro\n")
    rep.write_doc(block, doc)
    text = doc.read_text()
    assert "old" not in text and text.startswith("intro") and text.endswith("outro\n")
