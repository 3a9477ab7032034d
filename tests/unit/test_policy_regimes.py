"""Issue 15's policy options: ``rs2`` class quotas, ``factor``'s factor-level usage penalty and
the ``factor_loss`` hybrid, through the single-process selector (no Ray)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from saelect.service.policies import POLICIES, PolicyConfig, make_policy
from saelect.service.policies.factor_loss import LOSS_BINS, hump, loss_bins
from saelect.service.policies.rs2 import equal_quotas
from saelect.service.selection.engine import SingleProcessSelector
from saelect.workers.shard_data import ShardData


def shard(n: int, seed: int = 0, *, labels: np.ndarray | None = None) -> ShardData:
    """R, D uniform, labels, sparse codes with a few frequent units."""
    rng = np.random.default_rng(seed)
    units, k = 64, 4
    zipf = 1.0 / np.arange(1, units + 1)
    ids = np.stack([rng.choice(units, k, replace=False, p=zipf / zipf.sum()) for _ in range(n)])
    values = rng.random((n, k)).astype(np.float16) + np.float16(0.01)
    p = np.bincount(ids.ravel(), minlength=units) / n
    return ShardData(
        0,
        n,
        R=rng.random(n),
        D=rng.random(n),
        labels=rng.integers(0, 4, n) if labels is None else labels,
        code_ids=ids.astype(np.int32),
        code_values=values,
        p=p,
    )


def run(name: str, data: ShardData, *, ratio: float, epochs: int, **params: object) -> list:
    eng = SingleProcessSelector(make_policy(PolicyConfig(name, ratio, epochs, 3, params)), data)
    return [eng.step().indices for _ in range(epochs)]


# --------------------------------------------------------------------------- rs2 class quotas
@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 50), min_size=1, max_size=8).filter(lambda c: sum(c) > 0),
    frac=st.floats(0.0, 1.0),
)
def test_equal_quotas_are_capped_and_level(counts: list[int], frac: float) -> None:
    c = np.asarray(counts)
    size = round(frac * c.sum())
    q = equal_quotas(size, c)
    assert q.sum() == size and np.all(q <= c) and np.all(q >= 0)
    open_q = q[q < c]  # a class not exhausted is at most one below any class's quota
    if open_q.size:
        assert open_q.min() >= q.max() - 1


@pytest.mark.parametrize("mode", ["proportional", "equal"])
def test_rs2_class_quotas_fix_class_counts_and_rotate(mode: str) -> None:
    labels = np.repeat(np.arange(3), [120, 30, 6])
    epochs = run("rs2", shard(156, labels=labels), ratio=0.25, epochs=8, class_quotas=mode)
    counts = [np.bincount(labels[i], minlength=3).tolist() for i in epochs]
    assert all(c == counts[0] for c in counts)
    if mode == "equal":
        assert counts[0] == [17, 16, 6]  # m = 39: the 6-sample class is capped
    # within a round (K = ceil(120 / q_0) epochs) the head class never repeats a sample
    k = -(-120 // counts[0][0])
    head = np.concatenate([i[labels[i] == 0] for i in epochs[:k]])
    assert np.unique(head).shape[0] == min(head.shape[0], 120)


def test_rs2_quotas_need_labels_and_a_known_mode() -> None:
    with pytest.raises(ValueError, match="class_quotas"):
        make_policy(PolicyConfig("rs2", 0.5, 2, 0, {"class_quotas": "balanced"}))
    data = ShardData(0, 10)
    with pytest.raises(ValueError, match="labels"):
        run("rs2", data, ratio=0.5, epochs=1, class_quotas="equal")


def test_rs2_default_is_unchanged_by_the_option() -> None:
    data = shard(200)
    a = run("rs2", data, ratio=0.3, epochs=4)
    b = run("rs2", data, ratio=0.3, epochs=4, class_quotas="none")
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------- factor_gamma
def test_factor_gamma_zero_is_the_default_selection() -> None:
    data = shard(300)
    a = run("factor", data, ratio=0.2, epochs=5)
    b = run("factor", data, ratio=0.2, epochs=5, factor_gamma=0.0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_factor_gamma_spreads_selections_over_factors() -> None:
    """A strong factor-level penalty avoids samples whose units were just used a lot: the mean
    reuse of units selected in consecutive epochs drops."""
    data = shard(400, seed=1)
    ids = data.code_ids
    assert ids is not None

    def reuse(epochs: list[np.ndarray]) -> float:
        out = []
        for prev, cur in itertools.pairwise(epochs):
            used = np.bincount(ids[prev].ravel(), minlength=64)
            out.append(float(used[ids[cur]].mean()))
        return float(np.mean(out))

    plain = run("factor", data, ratio=0.1, epochs=6, tau=0.0, dynamic_coverage=False)
    pen = run(
        "factor", data, ratio=0.1, epochs=6, tau=0.0, dynamic_coverage=False, factor_gamma=5.0
    )
    assert reuse(pen) < reuse(plain)


def test_factor_gamma_validates_and_needs_codes() -> None:
    with pytest.raises(ValueError, match="factor_gamma"):
        make_policy(PolicyConfig("factor", 0.5, 2, 0, {"factor_gamma": -1.0}))
    rng = np.random.default_rng(0)
    data = ShardData(0, 20, R=rng.random(20), D=rng.random(20))
    with pytest.raises(ValueError, match="factor_gamma"):
        run("factor", data, ratio=0.5, epochs=2, factor_gamma=1.0)


# --------------------------------------------------------------------------- factor_loss
def test_factor_loss_is_registered_and_takes_feedback() -> None:
    assert POLICIES["factor_loss"].needs_feedback


@settings(max_examples=50, deadline=None)
@given(q=st.floats(0.05, 1.0), r=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20))
def test_hump_peaks_at_the_clip_quantile(q: float, r: list[float]) -> None:
    h = hump(np.asarray(r), q)
    assert np.all(h >= 0) and np.all(h <= q + 1e-12)
    below = np.asarray(r) <= q
    assert np.allclose(h[below], np.asarray(r)[below])


def test_loss_bins_are_monotone_and_bounded() -> None:
    losses = np.array([0.0, 0.01, 0.5, 2.0, 49.0, 1e6])
    b = loss_bins(losses)
    assert np.all(np.diff(b) >= 0) and b[0] == 0 and b[-1] == LOSS_BINS - 1


def test_factor_loss_does_not_chase_outlier_losses() -> None:
    """Mislabelled samples keep a very high loss: with the clip they are served less than their
    share; without it (clip_quantile 1) they are served more."""
    n = 600
    data = shard(n, seed=2)
    noisy = np.random.default_rng(5).random(n) < 0.3

    def served_noisy(q: float) -> float:
        pol = make_policy(PolicyConfig("factor_loss", 0.2, 8, 1, {"clip_quantile": q}))
        eng = SingleProcessSelector(pol, data)
        rng = np.random.default_rng(7)
        share = []
        for t in range(8):
            idx = eng.step().indices
            if t >= 2:
                share.append(noisy[idx].mean())
            eng.feedback(idx, np.where(noisy[idx], 4.0, rng.random(idx.shape[0])))
        return float(np.mean(share))

    assert served_noisy(0.6) < noisy.mean() < served_noisy(1.0)


def test_factor_loss_quotas_and_sizes() -> None:
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    data = shard(200, labels=labels)
    for mode, expect in (("auto", [20, 10, 6, 4]), ("equal", [10, 10, 10, 10])):
        pol = make_policy(PolicyConfig("factor_loss", 0.2, 3, 0, {"class_quotas": mode}))
        eng = SingleProcessSelector(pol, data)
        for _ in range(3):
            idx = eng.step().indices
            assert np.bincount(labels[idx], minlength=4).tolist() == expect
            eng.feedback(idx, np.ones(idx.shape[0]))


def test_factor_loss_is_deterministic() -> None:
    data = shard(150)

    def go() -> list[np.ndarray]:
        eng = SingleProcessSelector(make_policy(PolicyConfig("factor_loss", 0.3, 4, 9)), data)
        out = []
        for _ in range(4):
            idx = eng.step().indices
            eng.feedback(idx, (idx % 7).astype(np.float64))
            out.append(idx)
        return out

    assert all(np.array_equal(a, b) for a, b in zip(go(), go(), strict=True))
