"""Hashing, exact top-m, the threshold protocol, shuffle and partition."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from saelect.service.policies.base import Stage
from saelect.service.selection import (
    epoch_permutation,
    global_top_m,
    gumbel,
    hash_u64,
    local_broadcast,
    per_rank_length,
    rank_indices,
    shuffle_epoch,
    top_m,
    uniform01,
)
from saelect.service.selection.hashing import STREAM_TIEBREAK, gumbel_range, hash_range, stream_key
from saelect.service.selection.threshold import grouped_top_m_protocol
from saelect.service.selection.topk import grouped_top_m
from saelect.workers.selection_shard import SelectionShard
from saelect.workers.shard_data import ShardData
from saelect.workers.shard_threshold import score_keys

# ---------------------------------------------------------------------------- hashing


def test_hash_depends_only_on_the_index_not_on_the_batch() -> None:
    idx = np.arange(1000, 3000)
    whole = hash_u64(7, 3, 1, idx)
    parts = np.concatenate([hash_u64(7, 3, 1, idx[a : a + 333]) for a in range(0, 2000, 333)])
    assert np.array_equal(whole, parts)
    assert np.array_equal(hash_u64(7, 3, 1, idx[::-1]), whole[::-1])


def test_hash_streams_differ() -> None:
    idx = np.arange(500)
    base = hash_u64(0, 0, 1, idx)
    assert np.unique(base).shape[0] == 500
    for other in (hash_u64(1, 0, 1, idx), hash_u64(0, 1, 1, idx), hash_u64(0, 0, 2, idx)):
        assert np.mean(other == base) < 0.01


def test_uniform_and_gumbel_distributions() -> None:
    idx = np.arange(200_000)
    u = uniform01(3, 1, 3, idx)
    assert u.min() >= 0.0 and u.max() < 1.0
    counts = np.bincount((u * 20).astype(int), minlength=20)
    chi2 = float(((counts - 10_000) ** 2 / 10_000).sum())
    assert chi2 < 60  # 19 degrees of freedom; p ~ 1e-6 at 60
    g = gumbel(3, 1, 2, idx)
    assert np.all(np.isfinite(g))
    assert abs(g.mean() - np.euler_gamma) < 0.02
    assert abs(g.var() - np.pi**2 / 6) < 0.05


@pytest.mark.parametrize(("lo", "hi"), [(0, 0), (0, 5), (1000, 1700), (2**40, 2**40 + 9)])
def test_range_draws_equal_the_draws_of_the_index_array(lo: int, hi: int) -> None:
    idx = np.arange(lo, hi, dtype=np.int64)
    assert np.array_equal(hash_range(4, 2, STREAM_TIEBREAK, lo, hi), hash_u64(4, 2, 1, idx))
    assert np.array_equal(gumbel_range(4, 2, 2, lo, hi), gumbel(4, 2, 2, idx))


def test_stream_key_rejects_negative() -> None:
    with pytest.raises(ValueError, match="-1"):
        stream_key(-1, 0, 0)


# ---------------------------------------------------------------------------- top_m


def reference_top(scores: np.ndarray, tb: np.ndarray, m: int) -> np.ndarray:
    """Sorted positions of the m best by (score desc, tiebreak desc, position asc), by full sort."""
    pos = np.arange(scores.shape[0])
    order = np.lexsort((pos, ~tb, -scores))
    return np.sort(order[:m])


tie_values = st.sampled_from([-np.inf, -1.0, -0.0, 0.0, 0.25, 0.5, 1.0, np.inf])


@st.composite
def scored(draw: Any) -> tuple[np.ndarray, np.ndarray, int]:
    n = draw(st.integers(0, 300))
    heavy = draw(st.booleans())
    if heavy:
        scores = np.array(draw(st.lists(tie_values, min_size=n, max_size=n)), dtype=np.float64)
    else:
        seed = draw(st.integers(0, 2**31))
        scores = np.random.default_rng(seed).normal(size=n).round(draw(st.integers(0, 3)))
    if draw(st.booleans()):  # mostly ineligible, like a class stage: top_m's subset path
        mask_seed = draw(st.integers(0, 2**31))
        scores[np.random.default_rng(mask_seed).random(n) < 0.8] = -np.inf
    tb_mod = draw(st.sampled_from([2, 5, 2**64]))  # small moduli force tie-break collisions
    tb = hash_u64(draw(st.integers(0, 99)), 0, STREAM_TIEBREAK, np.arange(n))
    if tb_mod < 2**64:
        tb %= np.uint64(tb_mod)
    eligible = int(np.count_nonzero(scores > -np.inf))
    m = draw(st.integers(0, eligible))
    return scores, tb, m


@settings(max_examples=80, deadline=None)
@given(case=scored())
def test_top_m_equals_full_sort(case: tuple[np.ndarray, np.ndarray, int]) -> None:
    scores, tb, m = case
    expect = reference_top(scores + 0.0, tb, m)
    got = np.sort(top_m(scores, tb, m))
    assert np.array_equal(got, expect)
    assert np.array_equal(np.sort(top_m(scores, lambda p: tb[p], m)), expect)


def test_top_m_refuses_too_few_eligible() -> None:
    with pytest.raises(ValueError, match="m=3"):
        top_m(np.array([1.0, -np.inf, 2.0]), np.zeros(3, dtype=np.uint64), 3)
    with pytest.raises(ValueError, match="m=2 exceeds the 1 eligible"):
        top_m(np.array([-np.inf, -np.inf, 2.0, -np.inf]), np.zeros(4, dtype=np.uint64), 2)
    with pytest.raises(ValueError, match="m=-1"):
        top_m(np.zeros(3), np.zeros(3, dtype=np.uint64), -1)


@pytest.mark.parametrize("scores", [[np.nan, 1.0], [np.nan, -np.inf, -np.inf, -np.inf]])
def test_top_m_refuses_nan(scores: list[float]) -> None:
    """NaN is refused on both paths (mostly eligible, mostly ineligible)."""
    with pytest.raises(ValueError, match="NaN"):
        top_m(np.array(scores), np.zeros(len(scores), dtype=np.uint64), 1)


def test_score_keys_preserve_order() -> None:
    values = np.array([-np.inf, -1e300, -2.5, -1e-300, 0.0, 1e-300, 3.0, 1e300, np.inf])
    keys = score_keys(values)
    assert keys[0] == 0
    assert np.all(np.diff(keys.astype(object)) > 0)


# ---------------------------------------------------------------------------- threshold protocol


class ScorePolicy:
    """A minimal shard policy whose stage scores are the shard's R column."""

    def __init__(self, tb_mod: int, seed: int) -> None:
        self.tb_mod = tb_mod
        self.seed = seed

    def init_counters(self, n: int) -> dict[str, np.ndarray]:
        return {}

    def local_scores(self, stage: Any, epoch: int, ctx: dict, data: ShardData, counters: dict):
        return data.R.copy()

    def tiebreak(self, epoch: int, global_idx: np.ndarray) -> np.ndarray:
        tb = hash_u64(self.seed, epoch, STREAM_TIEBREAK, global_idx)
        return tb % np.uint64(self.tb_mod) if self.tb_mod < 2**64 else tb

    def local_stats(self, *args: Any) -> dict:
        return {}

    def selection_partials(self, *args: Any) -> dict:
        return {}

    def weights(self, *args: Any) -> None:
        return None


@settings(max_examples=80, deadline=None)
@given(
    case=scored(),
    cuts=st.lists(st.floats(0, 1), max_size=7),
    bins=st.sampled_from([2, 4, 1024]),
    cap=st.sampled_from([1, 3, 65536]),
    tb_mod=st.sampled_from([3, 2**64]),
)
def test_threshold_protocol_equals_global_top_m(
    case: tuple[np.ndarray, np.ndarray, int], cuts: list[float], bins: int, cap: int, tb_mod: int
) -> None:
    scores, _, m = case
    n = scores.shape[0]
    bounds = sorted({0, n, *(int(c * n) for c in cuts)})
    policy = ScorePolicy(tb_mod, seed=5)
    shards = [
        SelectionShard(ShardData(a, b, R=scores[a:b]), policy)  # type: ignore[arg-type]
        for a, b in itertools.pairwise(bounds)
    ] or [SelectionShard(ShardData(0, 0, R=scores), policy)]  # type: ignore[arg-type]
    for s in shards:
        s.begin_epoch(2)
        s.begin_stage("main", 2, {})
    trace = global_top_m(local_broadcast(shards), m, bins=bins, cap=cap)
    got = np.concatenate([s.finish(2, {})["indices"] for s in shards])
    expect = reference_top(scores + 0.0, policy.tiebreak(2, np.arange(n)), m)
    assert np.array_equal(got, expect)
    assert trace.taken == m
    if tb_mod == 2**64:  # distinct tie-breaks: the boundary set always shrinks to the cap
        assert trace.candidates <= cap


def test_threshold_protocol_pulls_few_candidates() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random(200_000)
    bounds = [0, 30_000, 100_000, 200_000]
    policy = ScorePolicy(2**64, seed=1)
    shards = [
        SelectionShard(ShardData(a, b, R=scores[a:b]), policy)  # type: ignore[arg-type]
        for a, b in itertools.pairwise(bounds)
    ]
    for s in shards:
        s.begin_epoch(0)
        s.begin_stage("main", 0, {})
    trace = global_top_m(local_broadcast(shards), 60_000, bins=1024, cap=1000)
    assert trace.candidates <= 1000 and trace.rounds <= 4
    got = np.concatenate([s.finish(0, {})["indices"] for s in shards])
    assert np.array_equal(
        got, reference_top(scores, policy.tiebreak(0, np.arange(200_000)), 60_000)
    )


def test_threshold_protocol_bad_arguments() -> None:
    shard = SelectionShard(ShardData(0, 3, R=np.array([1.0, 2.0, -np.inf])), ScorePolicy(2, 0))  # type: ignore[arg-type]
    shard.begin_epoch(0)
    shard.begin_stage("main", 0, {})
    with pytest.raises(ValueError, match="m=3"):
        global_top_m(local_broadcast([shard]), 3)
    with pytest.raises(ValueError, match="bins=3"):
        global_top_m(local_broadcast([shard]), 1, bins=3)


# ---------------------------------------------------------------------------- class stages


def reference_grouped(
    scores: np.ndarray, tb: np.ndarray, labels: np.ndarray, quotas: list[int]
) -> np.ndarray:
    """Sorted positions of every class's top quotas[c], each class by full sort."""
    picks = [np.empty(0, dtype=np.int64)]
    for c, q in enumerate(quotas):
        mine = np.flatnonzero(labels == c)
        picks.append(mine[reference_top(scores[mine], tb[mine], q)])
    return np.sort(np.concatenate(picks))


def grouped_case(
    seed: int, n: int, classes: int, *, heavy: bool, used: float, ineligible: float
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(scores, labels, quotas): labels over a random subset of the classes (the others are
    empty), heavy ties or rounded normal scores, a share of ineligible samples, random quotas."""
    rng = np.random.default_rng(seed)
    if heavy:
        scores = rng.choice(np.array([-1.0, -0.0, 0.0, 0.25, 0.5, np.inf]), n)
    else:
        scores = rng.normal(size=n).round(int(rng.integers(0, 4)))
    scores[rng.random(n) < ineligible] = -np.inf
    present = rng.permutation(classes)[: max(1, int(used * classes))]
    labels = rng.choice(present, n)
    eligible = np.bincount(labels[scores > -np.inf], minlength=classes)
    quotas = [int(rng.integers(0, e + 1)) for e in eligible]
    return scores, labels, quotas


def run_grouped(
    scores: np.ndarray,
    labels: np.ndarray,
    quotas: list[int],
    bounds: list[int],
    *,
    bins: int,
    cap: int,
    tb_mod: int,
) -> tuple[np.ndarray, Any]:
    """Take a class-quota stage over shards cut at ``bounds``; (sorted picks, trace)."""
    policy = ScorePolicy(tb_mod, seed=5)
    stage = Stage("classes", sum(quotas), tuple(quotas))
    shards = [
        SelectionShard(ShardData(a, b, R=scores[a:b], labels=labels[a:b]), policy)  # type: ignore[arg-type]
        for a, b in itertools.pairwise(bounds)
    ]
    broadcast = local_broadcast(shards)
    broadcast("begin_epoch", 2)
    summaries = broadcast("open_stage", stage, 2, {})
    trace = grouped_top_m_protocol(broadcast, quotas, summaries, bins=bins, cap=cap)
    got = np.sort(np.concatenate([p["indices"] for p in broadcast("finish", 2, {})]))
    return got, trace


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 300),
    classes=st.sampled_from([1, 2, 3, 12, 40]),
    heavy=st.booleans(),
    used=st.sampled_from([0.3, 1.0]),
    ineligible=st.sampled_from([0.0, 0.5]),
    cuts=st.lists(st.floats(0, 1), max_size=7),
    bins=st.sampled_from([2, 4, 1024]),
    cap=st.sampled_from([1, 3, 65536]),
    tb_mod=st.sampled_from([3, 2**64]),
)
def test_class_thresholds_in_one_protocol_equal_per_class_top_m(
    seed: int,
    n: int,
    classes: int,
    heavy: bool,
    used: float,
    ineligible: float,
    cuts: list[float],
    bins: int,
    cap: int,
    tb_mod: int,
) -> None:
    scores, labels, quotas = grouped_case(
        seed, n, classes, heavy=heavy, used=used, ineligible=ineligible
    )
    bounds = sorted({0, n, *(int(c * n) for c in cuts)})
    got, trace = run_grouped(scores, labels, quotas, bounds, bins=bins, cap=cap, tb_mod=tb_mod)
    tb = ScorePolicy(tb_mod, seed=5).tiebreak(2, np.arange(n))
    expect = reference_grouped(scores + 0.0, tb, labels, quotas)
    assert np.array_equal(got, expect)
    assert trace.taken == sum(quotas)
    # the single in-process path (argpartition per class) gives the same picks
    layout = ShardData(0, n, labels=labels).derived.label_layout()
    local = grouped_top_m(scores + 0.0, lambda p: tb[p], layout, quotas)
    assert np.array_equal(np.sort(local), expect)


@pytest.mark.parametrize("shards", range(1, 9))
@pytest.mark.parametrize(("classes", "heavy"), [(1000, False), (1000, True), (100, True)])
def test_a_thousand_classes_in_one_protocol_run(shards: int, classes: int, heavy: bool) -> None:
    n = 20_000
    scores, labels, quotas = grouped_case(shards, n, classes, heavy=heavy, used=0.8, ineligible=0.1)
    bounds = np.linspace(0, n, shards + 1).astype(int).tolist()
    got, trace = run_grouped(scores, labels, quotas, bounds, bins=1024, cap=4096, tb_mod=2**64)
    tb = ScorePolicy(2**64, seed=5).tiebreak(2, np.arange(n))
    assert np.array_equal(got, reference_grouped(scores + 0.0, tb, labels, quotas))
    assert trace.calls == trace.rounds + 2  # histogram rounds, one candidate pull, one take


def test_protocol_calls_stay_bounded_for_1_to_1000_classes() -> None:
    """Uniform scores, 4 shards: one class-quota stage costs the same few calls for 1 to 1000
    classes (every class refines in the same histogram rounds; one stage per class cost at
    least 3 calls per class)."""
    n = 60_000
    rng = np.random.default_rng(3)
    scores = rng.random(n)
    calls = {}
    for classes in (1, 10, 100, 1000):
        labels = rng.integers(0, classes, n)
        quotas = [int(0.3 * c) for c in np.bincount(labels, minlength=classes)]
        bounds = [0, 15_000, 30_000, 45_000, n]
        got, trace = run_grouped(scores, labels, quotas, bounds, bins=1024, cap=1024, tb_mod=2**64)
        tb = ScorePolicy(2**64, seed=5).tiebreak(2, np.arange(n))
        assert np.array_equal(got, reference_grouped(scores, tb, labels, quotas))
        calls[classes] = trace.calls + 1  # + open_stage
    assert max(calls.values()) <= 6, calls


# ---------------------------------------------------------------------------- shuffle, partition


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 200), seed=st.integers(0, 1000), epoch=st.integers(0, 50))
def test_shuffle_is_a_seeded_permutation_independent_of_input_order(
    n: int, seed: int, epoch: int
) -> None:
    idx = np.random.default_rng(seed).choice(10 * n + 1, size=n, replace=False)
    order = shuffle_epoch(idx, seed, epoch)
    assert np.array_equal(np.sort(order), np.sort(idx))
    assert np.array_equal(order, shuffle_epoch(idx[::-1], seed, epoch))
    if n >= 20:
        assert not np.array_equal(order, shuffle_epoch(idx, seed, epoch + 1))
        assert not np.array_equal(order, shuffle_epoch(idx, seed + 1, epoch))


def test_epoch_permutation_rejects_negative() -> None:
    with pytest.raises(ValueError, match="-1"):
        epoch_permutation(3, -1, 0)


@settings(max_examples=40, deadline=None)
@given(size=st.integers(0, 100), world_size=st.integers(1, 8))
def test_partition_equal_lengths_cover_the_epoch(size: int, world_size: int) -> None:
    order = np.random.default_rng(size).permutation(1000)[:size]
    parts = [rank_indices(order, r, world_size) for r in range(world_size)]
    length = per_rank_length(size, world_size)
    assert all(p.shape[0] == length for p in parts)
    assert length * world_size - size < world_size or size == 0
    if size:
        assert set(np.concatenate(parts).tolist()) == set(order.tolist())
        # the first `size` interleaved positions are exactly the epoch order
        interleaved = np.stack(parts, axis=1).ravel()
        assert np.array_equal(interleaved[:size], order)
    else:
        assert length == 0


@pytest.mark.parametrize(
    ("rank", "world_size", "needle"), [(0, 0, "world_size=0"), (3, 3, "rank=3"), (-1, 2, "rank=-1")]
)
def test_partition_rejects_bad_rank(rank: int, world_size: int, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        rank_indices(np.arange(5), rank, world_size)
