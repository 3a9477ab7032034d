"""Sparse codes, factor statistics, R and D, and (global) rank normalization."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from saelect.workers.codes import SparseCodes
from saelect.workers.factors import alive_units, factor_counts, factor_frequencies, profiles
from saelect.workers.scores import (
    ScoreConfig,
    diversity,
    global_rank_normalize,
    rank_normalize,
    rarity_weights,
    representativeness,
    score_codes,
)

# Three samples over M = 4 units, k = 2 (unit 3 is dead, sample 2's second entry is inactive
# in the second example below):
#   s0: u0 = 3, u1 = 1      s1: u0 = 1, u1 = 1      s2: u2 = 2, u0 = 2
# counts (3, 2, 1, 0), p = (1, 2/3, 1/3, 0)
HAND = SparseCodes(np.array([[0, 1], [0, 1], [2, 0]]), np.array([[3.0, 1.0], [1.0, 1.0], [2, 2]]))
W1 = np.log(1.5) / np.log(3.0)  # scaled log(1/p) of u1; u0 -> 0, u2 -> 1


def _random_codes(rng: np.random.Generator, n: int, units: int, k: int) -> SparseCodes:
    ids = np.stack([rng.choice(units, size=k, replace=False) for _ in range(n)])
    values = rng.exponential(size=(n, k)) * (rng.random((n, k)) < 0.8)
    return SparseCodes(ids, values)


def test_hand_example_counts_and_frequencies() -> None:
    counts = factor_counts(HAND, 4)
    assert counts.tolist() == [3, 2, 1, 0]
    p = factor_frequencies(counts, 3)
    assert np.allclose(p, [1.0, 2 / 3, 1 / 3, 0.0])
    assert alive_units(p).tolist() == [True, True, True, False]
    assert np.allclose(profiles(HAND), [[0.75, 0.25], [0.5, 0.5], [0.5, 0.5]])
    assert np.allclose(rarity_weights(p), [0.0, W1, 1.0, 0.0])


def test_hand_example_representativeness() -> None:
    p = factor_frequencies(factor_counts(HAND, 4), 3)
    # weighted: sum_j a_ij p_j / max p
    assert np.allclose(
        representativeness(HAND, p), [0.75 + 0.25 * 2 / 3, 0.5 + 0.5 * 2 / 3, 0.5 / 3 + 0.5]
    )
    # frequent_set, q = 0.5: median of (1/3, 2/3, 1) = 2/3 -> u0, u1 frequent
    assert np.allclose(
        representativeness(HAND, p, form="frequent_set", quantile=0.5), [1.0, 1.0, 0.5]
    )
    # q = 0.9: quantile = 2/3 + 0.8 / 3 = 0.9333 -> only u0 frequent
    assert np.allclose(
        representativeness(HAND, p, form="frequent_set", quantile=0.9), [0.75, 0.5, 0.5]
    )


def test_hand_example_diversity() -> None:
    p = factor_frequencies(factor_counts(HAND, 4), 3)
    assert np.allclose(diversity(HAND, p), [0.25 * W1, 0.5 * W1, 0.5])
    assert np.allclose(diversity(HAND, p, form="max"), [W1, W1, 1.0])
    r, d = score_codes(HAND, p, ScoreConfig(diversity="max"))
    assert np.allclose(d, [W1, W1, 1.0]) and np.allclose(r, representativeness(HAND, p))


def test_dead_units_and_inactive_entries_are_dropped() -> None:
    p = np.array([1.0, 2 / 3, 1 / 3, 0.0])
    codes = SparseCodes(
        np.array([[3, 2], [1, 0], [3, 0]]),  # s0 on dead u3; s1's u0 inactive; s2 has nothing
        np.array([[5.0, 1.0], [2.0, 0.0], [1.0, 0.0]]),
    )
    assert np.allclose(representativeness(codes, p), [1 / 3, 2 / 3, 0.0])
    assert np.allclose(diversity(codes, p), [1.0, W1, 0.0])
    assert np.allclose(diversity(codes, p, form="max"), [1.0, W1, 0.0])
    assert np.allclose(representativeness(codes, np.zeros(4)), 0.0)  # no alive unit at all


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 60),
    units=st.integers(2, 40),
    form_r=st.sampled_from(["weighted", "frequent_set"]),
    form_d=st.sampled_from(["weighted", "max"]),
    q=st.floats(0.0, 1.0),
)
def test_scores_lie_in_unit_interval(
    seed: int, n: int, units: int, form_r: str, form_d: str, q: float
) -> None:
    rng = np.random.default_rng(seed)
    codes = _random_codes(rng, n, units, min(3, units))
    p = factor_frequencies(factor_counts(codes, units), n)
    r, d = score_codes(codes, p, ScoreConfig(form_r, form_d, q))
    for x in (r, d):
        assert x.shape == (n,) and x.dtype == np.float64
        assert np.all(x >= -1e-12) and np.all(x <= 1 + 1e-12)
    # the weighted D never exceeds the max form; a sample using only the rarest units has D = 1
    d_w, d_max = diversity(codes, p), diversity(codes, p, form="max")
    assert np.all(d_w <= d_max + 1e-12)
    w = rarity_weights(p)
    active = (codes.values > 0) & (p[codes.ids] > 0)  # (n, k) entries that carry profile mass
    only_rarest = active.any(axis=1) & np.all(~active | (w[codes.ids] == 1.0), axis=1)
    assert np.allclose(d_w[only_rarest], 1.0) and np.allclose(d_max[only_rarest], 1.0)


def test_counts_add_over_shards() -> None:
    rng = np.random.default_rng(0)
    codes = _random_codes(rng, 50, 20, 4)
    parts = [codes.slice(0, 17), codes.slice(17, 30), codes.slice(30, 50)]
    total = sum(factor_counts(c, 20) for c in parts)
    assert np.array_equal(total, factor_counts(codes, 20))
    assert SparseCodes.concat(parts).equals(codes)


def test_sparse_codes_round_trip_and_dense() -> None:
    rng = np.random.default_rng(1)
    codes = _random_codes(rng, 9, 12, 3)
    again = SparseCodes.from_bytes(codes.to_bytes())
    assert again.equals(codes) and again.ids.dtype == np.int32 and again.values.dtype == np.float16
    dense = codes.to_dense(12)
    assert dense.shape == (9, 12)
    assert np.allclose(dense.sum(axis=1), codes.values.astype(np.float32).sum(axis=1))
    assert np.array_equal(codes.take(np.array([4, 2])).ids, codes.ids[[4, 2]])
    with pytest.raises(ValueError, match="shape"):
        SparseCodes(np.zeros((2, 3)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="different k"):
        SparseCodes.concat([codes, SparseCodes(np.zeros((1, 2), np.int32), np.zeros((1, 2)))])
    with pytest.raises(ValueError, match="units=5"):
        factor_counts(codes, 5)


def test_rank_normalize_examples() -> None:
    assert rank_normalize(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [5 / 6, 0.0, 5 / 6, 1 / 3]
    assert rank_normalize(np.array([7.0])).tolist() == [0.5]
    assert rank_normalize(np.array([2.0, 2.0, 2.0])).tolist() == [0.5, 0.5, 0.5]
    assert rank_normalize(np.array([])).shape == (0,)
    with pytest.raises(ValueError, match="nan"):
        rank_normalize(np.array([1.0, np.nan]))


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.integers(0, 6), min_size=1, max_size=80),
    cuts=st.lists(st.integers(0, 80), max_size=5),
)
def test_global_rank_normalize_equals_single_process(values: list[int], cuts: list[int]) -> None:
    x = np.asarray(values, dtype=np.float64) / 3.0  # heavy ties
    single = rank_normalize(x)
    assert np.all((single >= 0) & (single <= 1))
    order = np.argsort(x, kind="stable")
    assert np.all(np.diff(single[order]) >= 0)  # order preserving
    tied = x[:, None] == x[None, :]
    assert np.all((single[:, None] == single[None, :]) == tied)  # equal iff tied
    bounds = sorted({min(c, len(x)) for c in cuts} | {0, len(x)})
    shards = [x[a:b] for a, b in itertools.pairwise(bounds)]
    sorted_parts = [np.sort(s) for s in shards]
    merged = np.concatenate([global_rank_normalize(s, sorted_parts, len(x)) for s in shards])
    assert np.array_equal(merged, single)


def test_validation_errors() -> None:
    with pytest.raises(ValueError, match="representativeness"):
        ScoreConfig(representativeness="mean")
    with pytest.raises(ValueError, match="diversity"):
        ScoreConfig(diversity="sum")
    with pytest.raises(ValueError, match=r"1\.5"):
        ScoreConfig(quantile=1.5)
    with pytest.raises(ValueError, match="len\\(p\\)=2"):
        representativeness(HAND, np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        diversity(HAND, np.array([1.0, 2.0, 0.1, 0.0]))
    with pytest.raises(ValueError, match="total says 5"):
        global_rank_normalize(np.array([1.0]), [np.array([1.0, 2.0])], 5)
    with pytest.raises(ValueError, match="num_samples"):
        factor_frequencies(np.array([1, 2]), 0)
