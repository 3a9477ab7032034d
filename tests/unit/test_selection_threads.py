"""The threaded and blocked selection pieces give exactly what one thread over whole arrays
gives: unit counts over the selected rows, the per-class top m on the thread pool, and the
shard's cheap eligibility check."""

from __future__ import annotations

import numpy as np
import pytest
import saelect.service.selection.topk as topk
import saelect.workers.shard_derived as shard_derived
from saelect.service.policies import PolicyConfig, make_policy
from saelect.service.selection.pool import run_tasks
from saelect.workers.selection_shard import SelectionShard
from saelect.workers.shard_data import ShardData


def codes_data(n: int, ids_dtype: type, zeros: bool, seed: int = 0) -> ShardData:
    """k = 6 distinct units of 40 per sample; with ``zeros`` some activations are 0 or
    negative (not counted) and sample 0 has none."""
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.random((n, 40)), axis=1)[:, :6].astype(ids_dtype)
    values = (rng.random((n, 6)) + 0.01).astype(np.float16)
    if zeros:
        values[rng.random((n, 6)) < 0.2] = 0
        values[rng.random((n, 6)) < 0.05] = -1
        values[0] = 0
    return ShardData(
        0,
        n,
        R=rng.random(n),
        D=rng.random(n),
        code_ids=ids,
        code_values=values,
        p=np.full(40, 1 / 40),
    )


@pytest.mark.parametrize(
    ("ids_dtype", "zeros", "threads"),
    [(np.int32, False, 1), (np.int32, True, 2), (np.int64, False, 3), (np.int16, True, 2)],
)
def test_unit_counts_over_blocks_and_threads_equal_a_bincount(
    monkeypatch: pytest.MonkeyPatch, ids_dtype: type, zeros: bool, threads: int
) -> None:
    """Blocks of 7 rows (a partial last block), 1 to 3 threads, unsorted rows: the counts of
    the active entries of the selected rows, exactly; the stored int32 ids are read in place
    when every activation is positive."""
    monkeypatch.setattr(shard_derived, "_COUNT_ROWS", 7)
    monkeypatch.setattr(shard_derived, "_MIN_SPLIT_ROWS", 10)
    monkeypatch.setenv("SAELECT_SELECTION_THREADS", str(threads))
    data = codes_data(500, ids_dtype, zeros)
    assert data.code_ids is not None and data.code_values is not None
    rows = np.random.default_rng(1).permutation(500)[:171]
    active = data.code_values[rows] > 0
    expect = np.bincount(data.code_ids[rows][active].astype(np.int64), minlength=40)
    got = data.derived.unit_counts(rows)
    assert got.dtype == np.int64 and np.array_equal(got, expect)
    in_place = np.shares_memory(data.derived._codes_blocks().active_ids, data.code_ids)
    assert in_place == (ids_dtype == np.int32 and not zeros)
    assert np.array_equal(data.derived.unit_counts(rows[:0]), np.zeros(40, dtype=np.int64))
    with pytest.raises(IndexError, match="outside"):
        data.derived.unit_counts(np.array([3, 500]))


def reference_grouped(
    scores: np.ndarray, tb: np.ndarray, labels: np.ndarray, quotas: list[int]
) -> np.ndarray:
    """Every class's top by (score desc, tie-break desc, position asc), by a full sort."""
    out = []
    for c, q in enumerate(quotas):
        mine = np.flatnonzero(labels == c)
        out.append(mine[np.lexsort((mine, ~tb[mine], -scores[mine]))[:q]])
    return np.concatenate(out)


@pytest.mark.parametrize(("classes", "threads"), [(3, 2), (1000, 2), (1000, 3), (7, 1)])
def test_grouped_top_m_on_threads_equals_the_sorted_reference(
    monkeypatch: pytest.MonkeyPatch, classes: int, threads: int
) -> None:
    """Heavy ties, empty classes, -inf samples: the picks of every class (in class order, in
    no particular order within a class), whatever the number of threads."""
    monkeypatch.setattr(topk, "_MIN_SPLIT", 0)
    monkeypatch.setenv("SAELECT_SELECTION_THREADS", str(threads))
    rng = np.random.default_rng(classes)
    n = 20_000
    labels = rng.integers(0, classes, n)
    labels[labels == 1] = 2  # class 1 is empty
    scores = rng.integers(0, 4, n).astype(np.float64)
    scores[rng.random(n) < 0.1] = -np.inf
    tb = rng.integers(0, 3, n).astype(np.uint64)
    data = ShardData(0, n, labels=labels)
    eligible = np.bincount(labels[scores > -np.inf], minlength=classes)
    quotas = [int(rng.integers(0, e + 1)) for e in eligible]
    got = topk.grouped_top_m(scores, lambda p: tb[p], data.derived.label_layout(), quotas)
    expect = reference_grouped(scores, tb, labels, quotas)
    assert np.array_equal(labels[got], labels[expect])  # grouped in class order
    assert np.array_equal(np.sort(got), np.sort(expect))


def test_class_chunks_cover_the_classes_in_order() -> None:
    sizes = [5, 0, 9, 1, 1, 30, 2]
    for parts in (1, 2, 3, 7, 10):
        chunks = topk._chunks(list(range(7)), sizes, parts)
        assert [c for chunk in chunks for c in chunk] == list(range(7))
        assert 1 <= len(chunks) <= parts and all(chunks)
    assert topk._chunks([], [], 2) == []


def test_run_tasks_returns_results_in_order() -> None:
    assert run_tasks([lambda i=i: i * i for i in range(5)]) == [0, 1, 4, 9, 16]
    assert run_tasks([]) == []


def test_take_local_refuses_positions_outside_or_ineligible() -> None:
    """With no infinite score only the range is checked; once samples are taken (they are
    ineligible in a later stage) every position is checked."""
    rng = np.random.default_rng(0)
    data = ShardData(0, 50, R=rng.random(50), D=rng.random(50))
    params = {"sampling": "topm", "class_quotas": False, "dynamic_coverage": False}
    policy = make_policy(PolicyConfig("factor", 0.3, 2, 0, params))
    shard = SelectionShard(data, policy)
    ctx = policy.context(0, [shard.begin_epoch(0)], None)
    stage = policy.stages(0, ctx)[0]
    shard.begin_stage(stage, 0, ctx)
    for bad in ([50], [-1]):
        with pytest.raises(ValueError, match="outside"):
            shard.take_local(np.array(bad))
    assert shard.take_local(np.array([0, 49])) == 2
    shard.begin_stage(stage, 0, ctx)
    with pytest.raises(ValueError, match="ineligible"):
        shard.take_local(np.array([3, 49]))


def _cases(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    ties = rng.integers(0, 5, n).astype(np.float64)
    inf = rng.random(n)
    inf[rng.random(n) < 0.3] = -np.inf
    inf[:7] = np.inf
    periodic = np.tile(np.arange(n // 1000, dtype=np.float64), 1000)  # period = sample step
    return [rng.random(n), np.sort(rng.random(n)), ties, np.zeros(n), inf, periodic]


@pytest.mark.parametrize("case", range(6))
def test_sampled_mth_largest_equals_the_partition(
    monkeypatch: pytest.MonkeyPatch, case: int
) -> None:
    """Uniform, sorted, heavy ties, constant, +-inf, a period equal to the sample step (the
    bracket misses, so the fallback runs): the value a full partition gives, for m from 1 to
    N; with NaN, top_m does what it does with the full partition (refuses it where the
    boundary shows it)."""
    monkeypatch.setattr(topk, "_SAMPLE_MIN", 1000)
    monkeypatch.setattr(topk, "_SAMPLE", 1000)
    n = 60_000
    scores = _cases(n)[case]
    eligible = int(np.count_nonzero(scores > -np.inf))
    for m in sorted({1, 2, 17, n // 3, eligible // 2, eligible - 1, eligible}):
        expect = np.partition(scores, n - m)[n - m]
        assert topk._mth_largest(scores, m) == expect, m
    tb = np.arange(n, dtype=np.uint64)
    for nans, m in ((slice(None, None, 5), 5), (slice(100, 103), eligible // 3)):
        with_nan = scores.copy()
        with_nan[nans] = np.nan
        outcomes = []
        for sample_min in (1000, n + 1):  # sampled, then the full partition
            monkeypatch.setattr(topk, "_SAMPLE_MIN", sample_min)
            try:
                outcomes.append(np.sort(topk.top_m(with_nan, tb, m)).tolist())
            except ValueError as exc:
                outcomes.append(str(exc))
        assert outcomes[0] == outcomes[1]
        if case in (0, 1, 4):  # continuous scores: the boundary check sees the NaN
            assert outcomes[0] == "scores contain NaN"
