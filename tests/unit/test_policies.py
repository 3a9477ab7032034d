"""Properties of every selection policy, run through the single-process selector."""

from __future__ import annotations

import itertools
import math
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from saelect.service.policies import POLICIES, PolicyConfig, make_policy
from saelect.service.policies.base import Stage
from saelect.service.policies.factor import largest_remainder
from saelect.service.policies.rs2 import round_length
from saelect.service.selection.engine import EpochResult, SingleProcessSelector
from saelect.workers.shard_data import ShardData
from saelect.workers.shard_derived import ShardDerived


def make_data(n: int, seed: int = 0, *, classes: int = 4, codes: bool = False) -> ShardData:
    """Synthetic shard data: R, D uniform in [0, 1], labels, optional sparse codes and p."""
    rng = np.random.default_rng(seed)
    extra = {}
    if codes:
        units, k = 64, 4
        zipf = 1.0 / np.arange(1, units + 1)  # a few frequent units, many rare ones
        ids = np.stack(
            [rng.choice(units, k, replace=False, p=zipf / zipf.sum()) for _ in range(n)]
        ).astype(np.int32)
        values = rng.random((n, k)).astype(np.float16) + np.float16(0.01)
        p = np.bincount(ids.ravel(), minlength=units) / n
        extra = {"code_ids": ids, "code_values": values, "p": p}
    return ShardData(
        0, n, R=rng.random(n), D=rng.random(n), labels=rng.integers(0, classes, n), **extra
    )


def loss_of(indices: np.ndarray, epoch: int) -> np.ndarray:
    """Deterministic synthetic losses for feedback."""
    return 1.0 + np.sin(indices * 0.37 + epoch)


def run(
    name: str,
    data: ShardData,
    *,
    ratio: float = 0.3,
    epochs: int = 6,
    seed: int = 0,
    params: dict | None = None,
) -> tuple[SingleProcessSelector, list[EpochResult]]:
    policy = make_policy(PolicyConfig(name, ratio, epochs, seed, params or {}))
    sel = SingleProcessSelector(policy, data)
    results = []
    for _ in range(epochs):
        r = sel.step()
        results.append(r)
        if policy.needs_feedback:
            sel.feedback(r.indices, loss_of(r.indices, r.epoch))
    return sel, results


ALL = sorted(POLICIES)
FACTOR_VARIANTS = [
    {},
    {"sampling": "gumbel", "tau": 0.2},
    {"penalty": "multiplicative"},
    {"class_quotas": True},
    {"dynamic_coverage": True},
    {"anneal_epochs": 2, "schedule": {"shape": "sigmoid", "warmup_epochs": 1}},
]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("ratio", [0.05, 0.3, 1.0])
def test_every_epoch_has_its_planned_size_and_no_duplicate(name: str, ratio: float) -> None:
    data = make_data(157)
    sel, results = run(name, data, ratio=ratio)
    plan = sel.plan()
    for r in results:
        assert r.indices.shape[0] == plan[r.epoch] == r.stats["size"]
        assert np.unique(r.indices).shape[0] == r.indices.shape[0]
        assert r.indices.min() >= 0 and r.indices.max() < data.n
        if r.weights is not None:
            assert r.weights.shape == r.indices.shape and np.all(r.weights >= 1.0)
        assert sum(r.stats["class_counts"]) == r.indices.shape[0]
    if name not in ("full", "infobatch"):
        m = max(1, math.floor(ratio * data.n + 0.5))
        assert plan == [m] * 6


@pytest.mark.parametrize("params", FACTOR_VARIANTS)
def test_factor_variants_keep_the_plan(params: dict) -> None:
    sel, results = run("factor", make_data(203, codes=True), params=params, epochs=7)
    plan = sel.plan()
    for r in results:
        assert r.indices.shape[0] == plan[r.epoch]
        assert np.unique(r.indices).shape[0] == r.indices.shape[0]
        assert 0.0 <= r.stats["penalty_share"] <= 1.0
        assert 0.0 <= r.stats["factor_coverage"] <= 1.0
    if params.get("anneal_epochs"):
        assert plan[-2:] == [203, 203]


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_epochs_other_seed_other_epochs(name: str) -> None:
    data = make_data(120, seed=3)
    a = run(name, data, seed=11)[1]
    b = run(name, data, seed=11)[1]
    c = run(name, data, seed=12)[1]
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.indices, y.indices)
    assert any(not np.array_equal(x.indices, z.indices) for x, z in zip(a, c, strict=True))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 150), ratio=st.floats(0.02, 1.0), seed=st.integers(0, 100))
def test_rs2_sees_every_sample_in_every_round(n: int, ratio: float, seed: int) -> None:
    k = round_length(n, ratio)
    epochs = 3 * k
    _, results = run("rs2", make_data(n, seed), ratio=ratio, epochs=epochs, seed=seed)
    for start in range(0, epochs, k):
        seen = np.concatenate([r.indices for r in results[start : start + k]])
        assert np.unique(seen).shape[0] == n


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(5, 150),
    ratio=st.floats(0.05, 0.9),
    gamma=st.floats(0.2, 5.0),
    seed=st.integers(0, 100),
    shape=st.sampled_from(["cosine", "linear", "constant"]),
)
def test_factor_usage_frequencies_stay_within_the_penalty_bound(
    n: int, ratio: float, gamma: float, seed: int, shape: str
) -> None:
    """The method 7 (docs/architecture.md), additive penalty, top-m: after T >= 1 epochs every
    pair of samples has f_i - f_j <= 1/gamma + 1/T, with f = u / T (whenever i is picked over j
    at epoch t, u_i - u_j <= t / gamma, so the gap never exceeds (T - 1) / gamma + 1)."""
    epochs = 12
    policy = make_policy(
        PolicyConfig(
            "factor",
            ratio,
            epochs,
            seed,
            # the penalty alone (class quotas, on by default with labels, bound it per class)
            {
                "gamma": gamma,
                "schedule": shape,
                "class_quotas": False,
                "dynamic_coverage": False,
                "sampling": "topm",  # the hard bound is a property of the ranking
            },
        )
    )
    sel = SingleProcessSelector(policy, make_data(n, seed))
    for t in range(1, epochs + 1):
        sel.step()
        usage = sel.shard.counters["usage"]
        gap = (usage.max() - usage.min()) / t
        assert gap <= 1.0 / gamma + 1.0 / t + 1e-9


def test_factor_without_penalty_and_constant_schedule_is_static() -> None:
    params = {"gamma": 0.0, "schedule": "constant", "sampling": "topm"}
    _, results = run("factor", make_data(300, 4), params=params, epochs=5)
    first = np.sort(results[0].indices)
    for r in results[1:]:
        assert np.array_equal(np.sort(r.indices), first)


def _monotone_trend(values: list[float], sign: float) -> bool:
    return all(sign * (b - a) >= -1e-12 for a, b in itertools.pairwise(values))


@pytest.mark.parametrize("correlation", ["anti", "independent"])
def test_schedule_moves_selection_from_representative_to_diverse(correlation: str) -> None:
    rng = np.random.default_rng(9)
    n = 600
    R = rng.random(n)
    D = (
        np.clip(1.0 - R + 0.1 * rng.normal(size=n), 0, 1)
        if correlation == "anti"
        else rng.random(n)
    )
    data = ShardData(0, n, R=R, D=D)
    _, results = run("factor", data, params={"gamma": 0.0, "sampling": "topm"}, epochs=8)
    mean_r = [r.stats["mean_R"] for r in results]
    mean_d = [r.stats["mean_D"] for r in results]
    assert _monotone_trend(mean_r, -1.0) and _monotone_trend(mean_d, +1.0)
    assert mean_r[0] > mean_r[-1] + 0.2 and mean_d[-1] > mean_d[0] + 0.2
    assert [r.stats["lambda"] for r in results][::7] == [0.0, 1.0]


def test_gumbel_sampling_is_seeded_and_differs_from_ranking() -> None:
    data = make_data(400, 5)
    g = {"sampling": "gumbel", "tau": 0.3}
    a = run("factor", data, params=g, seed=1)[1]
    b = run("factor", data, params=g, seed=1)[1]
    c = run("factor", data, params=g, seed=2)[1]
    plain = run("factor", data, params={"sampling": "topm"}, seed=1)[1]
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.indices, y.indices)
    assert set(a[0].indices.tolist()) != set(plain[0].indices.tolist())
    assert set(a[0].indices.tolist()) != set(c[0].indices.tolist())


def test_class_quotas_keep_class_shares() -> None:
    rng = np.random.default_rng(2)
    n = 500
    labels = rng.choice(5, size=n, p=[0.5, 0.2, 0.15, 0.1, 0.05])
    R = labels / 4 + 0.01 * rng.random(n)  # without quotas the top-R epochs favour class 4
    data = ShardData(0, n, R=R, D=rng.random(n), labels=labels)
    counts = np.bincount(labels, minlength=5)
    _, results = run("factor", data, params={"class_quotas": True}, ratio=0.2)
    m = 100
    for r in results:
        got = np.array(r.stats["class_counts"])
        assert np.array_equal(got, largest_remainder(m, counts))
        assert np.all(np.abs(got - m * counts / n) < 1)
    _, free = run("factor", data, params={"class_quotas": False, "sampling": "topm"}, ratio=0.2)
    assert free[0].stats["class_counts"][4] > 2 * m * counts[4] / n
    _, default = run("factor", data, ratio=0.2)  # default: quotas on because labels exist
    for r in default:
        assert np.array_equal(np.array(r.stats["class_counts"]), largest_remainder(m, counts))
    no_labels = ShardData(0, n, R=R, D=data.D)
    # without labels the quotas switch off: the ranking's first epoch is the top-R samples
    _, literal = run("factor", no_labels, params={"sampling": "topm"}, ratio=0.2)
    assert set(literal[0].indices.tolist()) == set(np.argsort(-R)[:m].tolist())


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(0, 50), min_size=1, max_size=8).filter(lambda c: sum(c) > 0),
    share=st.floats(0, 1),
)
def test_largest_remainder_sums_and_bounds(counts: list[int], share: float) -> None:
    counts_arr = np.array(counts)
    size = int(share * counts_arr.sum())
    q = largest_remainder(size, counts_arr)
    assert q.sum() == size
    assert np.all(q <= counts_arr) and np.all(q >= 0)
    assert np.all(np.abs(q - size * counts_arr / counts_arr.sum()) < 1)


def test_dynamic_coverage_changes_selection() -> None:
    data = make_data(400, 6, codes=True)
    literal = run("factor", data, params={"gamma": 0.5, "dynamic_coverage": False})[1]
    dynamic = run("factor", data, params={"gamma": 0.5, "dynamic_coverage": True})[1]
    auto = run("factor", data, params={"gamma": 0.5})[1]  # default: on, since codes are there
    assert all(np.array_equal(a.indices, b.indices) for a, b in zip(auto, dynamic, strict=True))
    assert np.array_equal(literal[0].indices, dynamic[0].indices)  # no selection yet: same D
    assert any(
        set(a.indices.tolist()) != set(b.indices.tolist())
        for a, b in zip(literal[1:], dynamic[1:], strict=True)
    )
    covs = [r.stats["factor_coverage"] for r in dynamic]
    assert all(b >= a for a, b in itertools.pairwise(covs))


def test_dynamic_coverage_needs_codes() -> None:
    data = ShardData(0, 10, R=np.zeros(10), D=np.zeros(10))
    policy = make_policy(PolicyConfig("factor", 0.5, 2, 0, {"dynamic_coverage": True}))
    with pytest.raises(ValueError, match="dynamic_coverage"):
        SingleProcessSelector(policy, data).step()


@pytest.mark.parametrize("penalty", ["additive", "multiplicative"])
def test_usage_penalty_rotates_samples(penalty: str) -> None:
    """With the deterministic ranking (Gumbel sampling rotates by itself, so it is off), the
    penalty is what makes the selection move on: after 8 epochs at r = 0.3 it has covered at
    least 0.3 more of the data than the same run with gamma = 0 (about 1.0 against 0.53)."""
    data = make_data(300, 8)
    params = {"sampling": "topm", "penalty": penalty}
    on = run("factor", data, params=params, epochs=8)[1]
    off = run("factor", data, params={**params, "gamma": 0.0}, epochs=8)[1]
    assert on[-1].stats["coverage"] >= off[-1].stats["coverage"] + 0.3
    assert on[-1].stats["penalty_share"] > 0.0 and off[-1].stats["penalty_share"] == 0.0


def test_static_random_repeats_its_subset() -> None:
    _, results = run("static_random", make_data(200))
    first = set(results[0].indices.tolist())
    assert all(set(r.indices.tolist()) == first for r in results)
    assert not np.array_equal(results[0].indices, results[1].indices)  # reshuffled


def test_infobatch_prunes_low_loss_and_rescales() -> None:
    n, epochs = 400, 8
    sel, results = run("infobatch", make_data(n), epochs=epochs)
    assert results[0].indices.shape[0] == n  # no loss known yet
    pruning = [r for r in results if r.epoch < 0.875 * epochs and r.epoch > 0]
    assert all(r.indices.shape[0] < n for r in pruning)
    for r in pruning:
        boosted = r.weights == 2.0
        assert boosted.any() and np.all((r.weights == 1.0) | boosted)
    assert results[-1].indices.shape[0] == n and np.all(results[-1].weights == 1.0)
    assert sel.plan() == [r.indices.shape[0] for r in results]


def test_infobatch_weight_cap() -> None:
    policy = make_policy(PolicyConfig("infobatch", 0.5, 4, 0, {"prune_ratio": 0.95}))
    assert policy.keep_weight == 10.0
    policy = make_policy(PolicyConfig("infobatch", 0.5, 4, 0, {"prune_ratio": 0.5}))
    assert policy.keep_weight == 2.0


def test_ucb_visits_unseen_samples_first() -> None:
    n = 100
    _, results = run("ucb", make_data(n), ratio=0.25, epochs=6)
    first_four = np.concatenate([r.indices for r in results[:4]])
    assert np.unique(first_four).shape[0] == n


def test_epsilon_greedy_exploits_high_loss() -> None:
    n = 200
    policy = make_policy(PolicyConfig("epsilon_greedy", 0.5, 3, 0, {"epsilon": 0.2}))
    sel = SingleProcessSelector(policy, make_data(n))
    first = sel.step().indices  # nothing known yet: all 100 explored
    losses = loss_of(first, 0)
    sel.feedback(first, losses)
    second = set(sel.step().indices.tolist())
    exploit = first[np.argsort(-losses)[:80]]  # round((1 - 0.2) * 100) highest losses
    assert set(exploit.tolist()) <= second
    assert len(second - set(first.tolist())) > 0  # the explored 20 reach unseen samples


def test_feedback_refused_by_feedback_free_policy() -> None:
    sel = SingleProcessSelector(make_policy(PolicyConfig("rs2", 0.5, 2)), make_data(10))
    with pytest.raises(ValueError, match="no feedback"):
        sel.feedback(np.array([1]), np.array([0.5]))
    ucb = SingleProcessSelector(make_policy(PolicyConfig("ucb", 0.5, 2)), make_data(10))
    with pytest.raises(ValueError, match="finite"):
        ucb.feedback(np.array([1]), np.array([np.nan]))
    with pytest.raises(ValueError, match="outside"):
        ucb.feedback(np.array([10]), np.array([1.0]))


@pytest.mark.parametrize(
    ("name", "ratio", "epochs", "params", "needle"),
    [
        ("factor", 0.0, 3, {}, "ratio=0.0"),
        ("factor", 1.5, 3, {}, "ratio=1.5"),
        ("factor", 0.5, 0, {}, "epochs=0"),
        ("nope", 0.5, 3, {}, "nope"),
        ("factor", 0.5, 3, {"schedule": "zigzag"}, "zigzag"),
        ("factor", 0.5, 3, {"schedule": {"shape": "linear", "speed": 2}}, "speed"),
        ("factor", 0.5, 3, {"gamma": -1.0}, "gamma=-1.0"),
        ("factor", 0.5, 3, {"gamma": "big"}, "gamma='big'"),
        ("factor", 0.5, 3, {"tau": -0.5}, "tau=-0.5"),
        ("factor", 0.5, 3, {"penalty": "square"}, "square"),
        ("factor", 0.5, 3, {"sampling": "softmax"}, "softmax"),
        ("factor", 0.5, 3, {"anneal_epochs": 4}, "anneal_epochs=4"),
        ("factor", 0.5, 3, {"colour": 1}, "colour"),
        ("rs2", 0.5, 3, {"gamma": 1.0}, "gamma"),
        ("infobatch", 0.5, 3, {"prune_ratio": 1.5}, "prune_ratio=1.5"),
        ("infobatch", 0.5, 3, {"delta": -0.1}, "delta=-0.1"),
        ("infobatch", 0.5, 3, {"max_weight": 0.5}, "max_weight=0.5"),
        ("ucb", 0.5, 3, {"alpha": 0.0}, "alpha=0.0"),
        ("ucb", 0.5, 3, {"c": -1.0}, "c=-1.0"),
        ("epsilon_greedy", 0.5, 3, {"epsilon": 1.5}, "epsilon=1.5"),
    ],
)
def test_bad_config_names_the_offending_value(
    name: str, ratio: float, epochs: int, params: dict, needle: str
) -> None:
    with pytest.raises(ValueError, match=needle):
        make_policy(PolicyConfig(name, ratio, epochs, 0, params))


def test_json_numbers_are_coerced() -> None:
    policy = make_policy(PolicyConfig("factor", 0.5, 3, 0, {"gamma": 1, "anneal_epochs": 1.0}))
    assert policy.params.gamma == 1.0 and isinstance(policy.params.gamma, float)
    assert policy.params.anneal_epochs == 1


@pytest.mark.parametrize("params", [{}, {"penalty": "multiplicative", "tau": 0.5}])
def test_class_quota_stage_takes_every_class_top_in_one_stage(params: dict) -> None:
    """With quotas an epoch is one stage; it takes, in every class, the top of the whole-shard
    scores by (score desc, tie-break desc, index asc), as many as the class's quota."""
    data = make_data(400, 3, classes=5, codes=True)
    policy = make_policy(PolicyConfig("factor", 0.3, 6, 7, params))
    sel = SingleProcessSelector(policy, data)
    for _ in range(3):  # usage and coverage counters become non-trivial
        sel.step()
    epoch = 3
    shard = sel.shard
    ctx = policy.context(epoch, [shard.begin_epoch(epoch)], None)
    assert ctx["dynamic"] and "quotas" in ctx
    stages = policy.stages(epoch, ctx)
    assert [(s.key, s.quotas) for s in stages] == [("classes", tuple(ctx["quotas"]))]
    scores = policy.local_scores(Stage("main", 1), epoch, ctx, data, shard.counters)
    tb = policy.tiebreak(epoch, np.arange(400))
    labels = data.labels
    assert labels is not None
    expect = []
    for c, q in enumerate(ctx["quotas"]):
        mine = np.flatnonzero(labels == c)
        order = np.lexsort((mine, ~tb[mine], -scores[mine]))
        expect += mine[order[:q]].tolist()
    assert np.array_equal(np.sort(sel.step().indices), np.sort(expect))


def dense_profile_dot(data: ShardData, g: np.ndarray) -> np.ndarray:
    """The dense per-sample computation dynamic coverage used before the sparse product:
    float32 (n,) sum_j a_ij g_j / sum_j a_ij over the clipped activations."""
    assert data.code_values is not None and data.code_ids is not None
    vals = data.code_values.astype(np.float32)
    np.maximum(vals, 0, out=vals)
    mass = vals.sum(axis=1)
    h = (vals * g[data.code_ids]).sum(axis=1)
    return np.divide(h, mass, out=np.ones_like(h), where=mass > 0)


def wide_codes(n: int, seed: int) -> ShardData:
    """k = 32 of 256 units (float32 sums in another order round differently), some zeros and
    three samples with no positive activation."""
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.random((n, 256)), axis=1)[:, :32].astype(np.int32)
    values = rng.random((n, 32)).astype(np.float16)
    values[rng.random((n, 32)) < 0.05] = 0
    values[:3] = 0  # samples without a positive activation keep their diversity (weight 1)
    p = np.bincount(ids[values > 0], minlength=256) / n
    return ShardData(
        0,
        n,
        R=rng.random(n),
        D=rng.random(n),
        labels=rng.integers(0, 5, n),
        code_ids=ids,
        code_values=values,
        p=p,
    )


def test_sparse_dynamic_coverage_equals_the_dense_computation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sparse product gives the dense per-sample weights to float32 tolerance, and the
    epochs selected with it are the ones selected with the dense computation."""
    data = wide_codes(3000, 2)
    rng = np.random.default_rng(0)
    for _ in range(3):
        g = rng.random(256).astype(np.float32)
        np.testing.assert_allclose(data.derived.profile_dot(g), dense_profile_dot(data, g), 2e-6)
    sparse = run("factor", data, epochs=6)[1]
    monkeypatch.setattr(ShardDerived, "profile_dot", lambda self, g: dense_profile_dot(data, g))
    dense = run("factor", data, epochs=6)[1]
    assert sparse[-1].stats["factor_coverage"] is not None
    for a, b in zip(sparse, dense, strict=True):
        assert np.array_equal(a.indices, b.indices)
        assert a.stats["mean_D"] == pytest.approx(b.stats["mean_D"], rel=1e-6)


def test_unit_counts_of_a_selection_count_active_units() -> None:
    data = wide_codes(500, 3)
    rows = np.sort(np.random.default_rng(1).choice(500, 120, replace=False))
    assert data.code_ids is not None and data.code_values is not None
    active = data.code_values[rows] > 0
    expect = np.bincount(data.code_ids[rows][active], minlength=256)
    assert np.array_equal(data.derived.unit_counts(rows), expect)


def test_shard_data_pickles_without_its_derived_structures() -> None:
    data = wide_codes(200, 4)
    data.derived.profile_dot(np.ones(256, dtype=np.float32))  # builds the sparse matrix
    copy = pickle.loads(pickle.dumps(data))
    assert "_derived" not in copy.__dict__ and "_derived" in data.__dict__
    a = run("factor", data, epochs=3)[1]
    b = run("factor", copy, epochs=3)[1]
    assert all(np.array_equal(x.indices, y.indices) for x, y in zip(a, b, strict=True))
