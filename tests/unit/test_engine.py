"""Selection engine: sharding never changes an epoch, state round-trips, commits are idempotent."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from saelect.service.policies import POLICIES, PolicyConfig, make_policy
from saelect.service.selection.engine import EpochResult, SelectionEngine, SingleProcessSelector
from saelect.service.selection.hashing import STREAM_GUMBEL, STREAM_TIEBREAK, hash_u64
from saelect.service.selection.partition import per_rank_length, rank_indices
from saelect.service.selection.threshold import local_broadcast
from saelect.workers.selection_shard import SelectionShard
from saelect.workers.shard_data import ShardData

N = 240
EPOCHS = 6

VARIANTS = [(name, {}) for name in sorted(POLICIES)] + [
    ("factor", {"sampling": "gumbel", "tau": 0.2}),
    ("factor", {"class_quotas": True, "penalty": "multiplicative"}),
    ("factor", {"dynamic_coverage": True, "anneal_epochs": 1}),
    ("factor", {"gamma": 0.0, "schedule": "constant"}),
]


def full_data(seed: int = 0, n: int = N) -> ShardData:
    rng = np.random.default_rng(seed)
    units, k = 32, 3
    ids = np.stack([rng.choice(units, k, replace=False) for _ in range(n)]).astype(np.int32)
    values = (rng.random((n, k)) + 0.05).astype(np.float16)
    return ShardData(
        0,
        n,
        R=rng.integers(0, 6, n) / 5.0,  # heavy ties exercise the tie-break paths
        D=rng.random(n).round(1),
        labels=rng.integers(0, 3, n),
        code_ids=ids,
        code_values=values,
        p=np.bincount(ids.ravel(), minlength=units) / n,
    )


def split(data: ShardData, bounds: list[int]) -> list[ShardData]:
    def part(arr: np.ndarray | None, a: int, b: int) -> np.ndarray | None:
        return None if arr is None else arr[a:b]

    return [
        ShardData(
            a,
            b,
            R=part(data.R, a, b),
            D=part(data.D, a, b),
            labels=part(data.labels, a, b),
            code_ids=part(data.code_ids, a, b),
            code_values=part(data.code_values, a, b),
            p=data.p,
        )
        for a, b in itertools.pairwise(bounds)
    ]


def engine_over(
    name: str, params: dict, bounds: list[int], *, seed: int = 0, bins: int = 4, cap: int = 5
) -> SelectionEngine:
    policy = make_policy(PolicyConfig(name, 0.3, EPOCHS, seed, params))
    shards = [SelectionShard(d, policy) for d in split(full_data(), bounds)]
    return SelectionEngine(policy, local_broadcast(shards), bins=bins, cap=cap)


def drive(engine: SelectionEngine, epochs: range) -> list[EpochResult]:
    out = []
    for t in epochs:
        r = engine.select(t)
        engine.commit(t)
        out.append(r)
        if engine.policy.needs_feedback:
            engine.feedback(r.indices, 1.0 + np.cos(r.indices * 0.11 + t))
    return out


def assert_same(a: list[EpochResult], b: list[EpochResult]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.epoch == y.epoch
        assert np.array_equal(x.indices, y.indices)
        assert (x.weights is None) == (y.weights is None)
        if x.weights is not None:
            assert np.array_equal(x.weights, y.weights)
        assert x.stats["size"] == y.stats["size"]
        assert x.stats["usage"] == y.stats["usage"]


@pytest.mark.parametrize(("name", "params"), VARIANTS)
def test_sharded_engine_equals_single_process(name: str, params: dict) -> None:
    single = SingleProcessSelector(
        make_policy(PolicyConfig(name, 0.3, EPOCHS, 0, params)), full_data()
    )
    expect = drive(single, range(EPOCHS))
    for bounds in ([0, 1, 100, 101, 180, N], [0, 30, 60, 90, 120, 150, 180, 210, N]):
        assert_same(drive(engine_over(name, params, bounds), range(EPOCHS)), expect)


@settings(max_examples=15, deadline=None)
@given(
    cuts=st.lists(st.integers(0, N), max_size=7),
    variant=st.sampled_from(VARIANTS),
    bins=st.sampled_from([2, 1024]),
    cap=st.sampled_from([1, 65536]),
)
def test_any_sharding_gives_the_same_epochs(
    cuts: list[int], variant: tuple[str, dict], bins: int, cap: int
) -> None:
    name, params = variant
    bounds = sorted({0, N, *cuts})
    one = drive(engine_over(name, params, [0, N]), range(3))
    many = drive(engine_over(name, params, bounds, bins=bins, cap=cap), range(3))
    assert_same(many, one)


@pytest.mark.parametrize(("name", "params"), VARIANTS)
def test_state_mid_run_continues_identically(name: str, params: dict) -> None:
    straight = drive(engine_over(name, params, [0, 100, N]), range(EPOCHS))
    first = engine_over(name, params, [0, 100, N])
    drive(first, range(3))
    state = first.state_dict()
    for bounds in ([0, 100, N], [0, 7, 150, N], [0, N]):  # any sharding can load the state
        fresh = engine_over(name, params, bounds)
        fresh.load_state_dict(state)
        assert_same(drive(fresh, range(3, EPOCHS)), straight[3:])


def test_commit_is_idempotent_and_ordered() -> None:
    engine = engine_over("factor", {}, [0, 120, N])
    with pytest.raises(ValueError, match="not selected"):
        engine.commit(0)
    a = engine.select(0)
    b = engine.select(0)  # repeating a selection before commit gives the same epoch
    assert np.array_equal(a.indices, b.indices)
    engine.commit(0)
    usage = engine.state_dict()["shards"]
    engine.commit(0)  # a repeated commit changes nothing
    again = engine.state_dict()["shards"]
    for x, y in zip(usage, again, strict=True):
        assert np.array_equal(x["counters"]["usage"], y["counters"]["usage"])
    assert sum(int(s["counters"]["usage"].sum()) for s in again) == a.indices.shape[0]
    with pytest.raises(ValueError, match="next epoch is 1"):
        engine.select(2)
    with pytest.raises(ValueError, match="next epoch is 1"):
        engine.select(0)
    drive(engine, range(1, EPOCHS))
    with pytest.raises(ValueError, match=f"outside \\[0, {EPOCHS}\\)"):
        engine.select(EPOCHS)


def test_shard_commit_is_idempotent_per_epoch() -> None:
    policy = make_policy(PolicyConfig("rs2", 0.5, 3))
    shard = SelectionShard(ShardData(0, 10, R=np.zeros(10), D=np.zeros(10)), policy)
    engine = SelectionEngine(policy, [shard])
    r = engine.select(0)
    ctx = engine._pending[1]  # type: ignore[index]
    assert shard.commit(0, ctx) == {}
    assert shard.commit(0, ctx) is None
    assert int(shard.counters["usage"].sum()) == r.indices.shape[0]


def test_stats_track_coverage_and_usage() -> None:
    engine = engine_over("rs2", {}, [0, 50, N])
    results = drive(engine, range(EPOCHS))
    total = 0
    coverage = [r.stats["coverage"] for r in results]
    for r in results:
        total += r.indices.shape[0]
        assert r.stats["usage"]["mean"] == pytest.approx(total / N)
        assert r.stats["size"] == r.indices.shape[0]
    assert all(b >= a for a, b in itertools.pairwise(coverage))
    assert coverage[-1] == 1.0


@pytest.mark.parametrize("world_size", range(1, 9))
def test_partition_of_engine_epochs(world_size: int) -> None:
    r = engine_over("factor", {}, [0, N]).select(0)
    parts = [rank_indices(r.indices, k, world_size) for k in range(world_size)]
    assert {p.shape[0] for p in parts} == {per_rank_length(r.indices.shape[0], world_size)}
    assert set(np.concatenate(parts).tolist()) == set(r.indices.tolist())


def test_shards_must_cover_the_range_in_order() -> None:
    policy = make_policy(PolicyConfig("full", 0.5, 2))
    parts = split(full_data(), [0, 100, N])
    with pytest.raises(ValueError, match="cover"):
        SelectionEngine(policy, [SelectionShard(d, policy) for d in parts[::-1]])
    with pytest.raises(ValueError, match="lo=100"):
        SingleProcessSelector(policy, parts[1])


def test_shard_state_must_cover_the_shard() -> None:
    policy = make_policy(PolicyConfig("full", 0.5, 2))
    a, b = (SelectionShard(d, policy) for d in split(full_data(), [0, 100, N]))
    with pytest.raises(ValueError, match="cover"):
        b.load_state_dict([a.state_dict()])


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"lo": 5, "hi": 2}, "hi=2"),
        ({"lo": 0, "hi": 3, "R": np.zeros(4)}, "R has 4 rows"),
        ({"lo": 0, "hi": 3, "code_ids": np.zeros((3, 2), dtype=np.int32)}, "together"),
    ],
)
def test_shard_data_validation(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ShardData(**kwargs)


def test_nan_scores_are_refused() -> None:
    data = ShardData(0, 4, R=np.array([0.1, np.nan, 0.3, 0.4]), D=np.zeros(4))
    sel = SingleProcessSelector(make_policy(PolicyConfig("factor", 0.5, 2)), data)
    with pytest.raises(ValueError, match="NaN"):
        sel.step()


# ---------------------------------------------------------------------------- from scratch


def reference_factor(
    data: ShardData, ratio: float, epochs: int, seed: int, params: dict
) -> list[np.ndarray]:
    """``factor``'s epochs written from its documented formula, without the engine, the
    policy or the shards: per epoch t, lambda = (1 - cos(pi t / (T - 1))) / 2,
    s = (1 - lambda) R + lambda D(t) - gamma u / max(t, 1) (+ tau Gumbel(seed, t, i)), the top m
    by a full sort on (score desc, tie-break desc, index asc), per class by largest remainder
    when quotas are on, then the sorted pick permuted by default_rng([seed, t]); D(t) = D
    sum_j a_ij g_j / sum_j a_ij with g_j = 1 / (1 + c_j / (p_j S_t)) when coverage is on.
    Only the hash draws come from service/selection/hashing.py."""
    n = data.n
    R, D = data.R, data.D
    assert R is not None and D is not None
    gamma, tau = 2.0, params.get("tau", 1.0) if params.get("sampling") != "topm" else 0.0
    quotas_on = params.get("class_quotas") is not False and data.labels is not None
    dynamic = params.get("dynamic_coverage") is not False and data.code_ids is not None
    m = math.floor(ratio * n + 0.5)
    idx = np.arange(n)
    usage = np.zeros(n, dtype=np.int64)
    covered = np.zeros(0 if data.p is None else data.p.shape[0])  # c_j
    selected_total = 0  # S_t
    out = []
    for t in range(epochs):
        lam = 0.5 * (1.0 - math.cos(math.pi * t / (epochs - 1)))
        d_t = D
        if dynamic and selected_total:
            assert data.code_values is not None and data.code_ids is not None
            a = np.maximum(data.code_values.astype(np.float64), 0.0)  # (n, k)
            expected = data.p * selected_total
            g = 1.0 / (
                1.0 + np.where(expected > 0, covered / np.where(expected > 0, expected, 1), 0)
            )
            mass = a.sum(axis=1)
            d_t = D * np.where(
                mass > 0, (a * g[data.code_ids]).sum(axis=1) / np.where(mass > 0, mass, 1), 1.0
            )
        s = R * (1.0 - lam) + d_t * lam - usage * (gamma / max(t, 1))
        if tau:
            u = ((hash_u64(seed, t, STREAM_GUMBEL, idx) >> np.uint64(11)) + 0.5) / 2.0**53
            s = s + tau * -np.log(-np.log(u))
        order = np.lexsort((idx, ~hash_u64(seed, t, STREAM_TIEBREAK, idx), -s))
        if quotas_on:
            assert data.labels is not None
            counts = np.bincount(data.labels)
            exact = m * counts / n
            q = np.floor(exact).astype(int)
            rest = np.argsort(-(m * counts % n), kind="stable")[: m - q.sum()]
            q[rest] += 1
            ranked = data.labels[order]
            pick = np.concatenate([order[ranked == c][: q[c]] for c in range(len(counts))])
        else:
            pick = order[:m]
        pick = np.sort(pick)
        out.append(pick[np.random.default_rng([seed, t]).permutation(m)])
        usage[pick] += 1
        if dynamic:
            assert data.code_ids is not None and data.code_values is not None
            active = data.code_values[pick] > 0
            covered = covered + np.bincount(data.code_ids[pick][active], minlength=len(covered))
            selected_total += m
    return out


def continuous_data(n: int, seed: int, *, ties: bool) -> ShardData:
    """R, D in [0, 1] (rounded to tenths with ties), 3 classes, k = 4 distinct units of 24."""
    rng = np.random.default_rng(seed)
    units, k = 24, 4
    ids = np.stack([rng.choice(units, k, replace=False) for _ in range(n)]).astype(np.int32)
    values = (rng.random((n, k)) + 0.05).astype(np.float16)
    R, D = rng.random(n), rng.random(n)
    if ties:
        R, D = R.round(1), D.round(1)
    return ShardData(
        0,
        n,
        R=R,
        D=D,
        labels=rng.integers(0, 3, n),
        code_ids=ids,
        code_values=values,
        p=np.bincount(ids.ravel(), minlength=units) / n,
    )


REFERENCE_VARIANTS = [
    ({"sampling": "topm", "class_quotas": False, "dynamic_coverage": False}, True),
    ({"sampling": "topm", "class_quotas": True, "dynamic_coverage": False}, True),
    ({"class_quotas": False, "dynamic_coverage": False}, False),
    ({}, False),  # the defaults: Gumbel sampling, class quotas, dynamic coverage
]


@pytest.mark.parametrize(("params", "ties"), REFERENCE_VARIANTS)
def test_engine_epochs_equal_a_from_scratch_reference(params: dict, ties: bool) -> None:
    """The engine (single process and over shards) against ``reference_factor``, which shares
    no code with it but the hash functions: a bug in the engine, the policy or the shard code
    that both paths share shows here."""
    n, epochs, seed = 200, 5, 4
    data = continuous_data(n, 11, ties=ties)
    expect = reference_factor(data, 0.3, epochs, seed, params)
    config = PolicyConfig("factor", 0.3, epochs, seed, params)
    single = SingleProcessSelector(make_policy(config), data)
    policy = make_policy(config)
    shards = [SelectionShard(d, policy) for d in split(data, [0, 70, 71, 130, n])]
    sharded = SelectionEngine(policy, local_broadcast(shards), bins=4, cap=5)
    for t in range(epochs):
        for engine in (single, sharded):
            got = engine.step()
            assert np.array_equal(got.indices, expect[t]), (t, engine)
