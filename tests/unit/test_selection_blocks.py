"""The blocked and threaded selection paths give exactly what the whole-array computation gives.

``factor``'s scores are computed in cache-sized blocks into a shard's reused buffer, the
Gumbel noise in blocks, and the codes' sparse products over row blocks on threads; none of it
may change a served epoch. The pinned digests below were computed by the code before these
paths existed (commit c492c0f): a change that alters what is served fails here, and must then
come with a version bump of the stored job format (a stored job replayed by new code must
refuse to serve rather than silently differ).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import saelect.workers.shard_derived as shard_derived
from saelect.service.policies import PolicyConfig, make_policy
from saelect.service.policies.factor_scores import ScoreTerms, factor_scores
from saelect.service.selection.engine import SelectionEngine, SingleProcessSelector
from saelect.service.selection.hashing import BLOCK, STREAM_GUMBEL, gumbel, gumbel_range
from saelect.service.selection.threshold import local_broadcast
from saelect.workers.selection_shard import SelectionShard
from saelect.workers.selection_state import shard_memory, state_bytes
from saelect.workers.shard_data import ShardData

from tests.unit.test_engine import split


def pinned_data(n: int = 70_000, seed: int = 14) -> ShardData:
    """R (ties: rounded to hundredths), D, 10 classes, k = 8 distinct units of 64 with some
    zero activations and five samples with none."""
    rng = np.random.default_rng(seed)
    units, k = 64, 8
    ids = np.argsort(rng.random((n, units)), axis=1)[:, :k].astype(np.int32)
    values = rng.random((n, k)).astype(np.float16)
    values[rng.random((n, k)) < 0.05] = 0
    values[:5] = 0
    p = np.bincount(ids[values > 0], minlength=units) / n
    return ShardData(
        0,
        n,
        R=rng.random(n).round(2),
        D=rng.random(n),
        labels=rng.integers(0, 10, n),
        code_ids=ids,
        code_values=values,
        p=p,
    )


PINNED = [
    ({}, "c5e13acc6f04f543b6ee"),  # the defaults: Gumbel, class quotas, dynamic coverage
    ({"penalty": "multiplicative", "tau": 0.5}, "c1e1bbf429949b536dab"),
    (
        {"sampling": "topm", "class_quotas": False, "dynamic_coverage": False},
        "d17ed2cee82afa9b47ac",
    ),
]


@pytest.mark.parametrize(("params", "digest"), PINNED)
def test_served_epochs_are_the_ones_served_before_the_blocked_paths(
    params: dict, digest: str
) -> None:
    """N = 70,000 (several score blocks, two row blocks of codes), single process and three
    shards: the sha256 of the 4 epochs' indices equals the pre-change code's."""
    data = pinned_data()
    config = PolicyConfig("factor", 0.3, 4, 7, params)
    single = SingleProcessSelector(make_policy(config), data)
    policy = make_policy(config)
    shards = [SelectionShard(d, policy) for d in split(data, [0, 20_000, 20_001, data.n])]
    sharded = SelectionEngine(policy, local_broadcast(shards))
    for engine in (single, sharded):
        h = hashlib.sha256()
        for _ in range(4):
            h.update(engine.step().indices.tobytes())
        assert h.hexdigest()[:20] == digest, engine


@pytest.mark.parametrize(
    ("lo", "hi"), [(0, BLOCK), (3, 3 + 2 * BLOCK + 17), (2**40 + 1, 2**40 + BLOCK + 2)]
)
def test_blocked_gumbel_equals_the_draws_of_the_index_array(lo: int, hi: int) -> None:
    expect = gumbel(9, 4, STREAM_GUMBEL, np.arange(lo, hi, dtype=np.int64))
    assert np.array_equal(gumbel_range(9, 4, STREAM_GUMBEL, lo, hi), expect)
    out = np.full(hi - lo, np.nan)
    assert gumbel_range(9, 4, STREAM_GUMBEL, lo, hi, out=out) is out
    assert np.array_equal(out, expect)


def whole_array_scores(
    R: np.ndarray,
    D: np.ndarray,
    h: np.ndarray | None,
    usage: np.ndarray,
    fpen: np.ndarray | None,
    terms: ScoreTerms,
    lo: int,
) -> np.ndarray:
    """The unblocked formula, whole arrays at a time, in the documented order."""
    B = R * (1.0 - terms.lam)
    d = D if h is None else np.multiply(D, h, dtype=np.float64)
    B = B + d * terms.lam
    if terms.penalty is None:
        pen = fpen
    else:
        pen = usage * terms.coef
        if terms.penalty == "multiplicative":
            pen = -(np.expm1(pen) * B)
        if fpen is not None:
            pen = pen + fpen
    s = B if pen is None else B - pen
    if terms.noise_seed is not None:
        g = gumbel(terms.noise_seed, terms.epoch, STREAM_GUMBEL, np.arange(lo, lo + len(R)))
        s = s + (g if terms.tau == 1.0 else g * terms.tau)
    return s


@pytest.mark.parametrize(
    ("penalty", "tau", "noisy", "dynamic", "factor_pen"),
    [
        ("additive", 1.0, True, True, False),
        ("additive", 1.0, True, False, True),
        ("multiplicative", 0.5, True, True, True),
        (None, 1.0, False, True, True),
        (None, 1.0, True, False, False),
        ("additive", 1.0, False, False, False),
    ],
)
def test_blocked_scores_equal_the_whole_array_formula(
    penalty: str | None, tau: float, noisy: bool, dynamic: bool, factor_pen: bool
) -> None:
    """Bit for bit, over 2.5 blocks and an offset global range, into a dirty buffer."""
    n, lo = 2 * BLOCK + BLOCK // 2, 12_345
    rng = np.random.default_rng(1)
    R, D = rng.random(n), rng.random(n)
    h = rng.random(n).astype(np.float32) if dynamic else None
    usage = rng.integers(0, 5, n).astype(np.int32)
    fpen = rng.random(n) * 0.3 if factor_pen else None
    coef = -2.0 / (0.3 * 3 + 1.0) if penalty == "multiplicative" else 2.0 / 3
    terms = ScoreTerms(0.37, penalty, coef, 5 if noisy else None, 3, tau)
    out = np.full(n, np.nan)
    got = factor_scores(R, D, h, usage, fpen, terms, lo, out)
    assert got is out
    assert np.array_equal(got, whole_array_scores(R, D, h, usage, fpen, terms, lo))


def test_policy_scores_into_a_buffer_equal_its_fresh_scores() -> None:
    """FactorPolicy.local_scores_into (the shard's buffer) equals local_scores and the
    unblocked path (whole-array passes) after a few epochs of usage and coverage."""
    data = pinned_data(40_000)
    policy = make_policy(PolicyConfig("factor", 0.3, 6, 2, {"factor_gamma": 0.5}))
    sel = SingleProcessSelector(policy, data)
    for _ in range(3):
        sel.step()
    shard = sel.shard
    assert shard is not None
    ctx = policy.context(3, [shard.begin_epoch(3)], None)
    stage = policy.stages(3, ctx)[0]
    fresh = policy.local_scores(stage, 3, ctx, data, shard.counters)
    buffer = np.full(data.n, np.nan)
    into = policy.local_scores_into(stage, 3, ctx, data, shard.counters, buffer)  # type: ignore[attr-defined]
    unblocked = policy._scores_unblocked(3, ctx, data, shard.counters)  # type: ignore[attr-defined]
    assert into is buffer
    assert np.array_equal(fresh, into) and np.array_equal(fresh, unblocked)


@pytest.mark.parametrize(("threads", "max_rows"), [(1, 1 << 24), (2, 1 << 24), (3, 1000)])
def test_sparse_products_do_not_depend_on_threads_or_blocks(
    monkeypatch: pytest.MonkeyPatch, threads: int, max_rows: int
) -> None:
    """profile_dot and unit_counts over 1, 2 or many row blocks (threads, 2**24-row cap) equal
    the one-block results exactly."""
    data = pinned_data(5000)
    rows = np.sort(np.random.default_rng(2).choice(5000, 1500, replace=False))
    g = np.random.default_rng(3).random(64).astype(np.float32)
    one = ShardData(
        **{k: getattr(data, k) for k in ("lo", "hi", "R", "D", "labels")},
        code_ids=data.code_ids,
        code_values=data.code_values,
        p=data.p,
    )
    expect_h, expect_c = one.derived.profile_dot(g), one.derived.unit_counts(rows)
    monkeypatch.setenv("SAELECT_SELECTION_THREADS", str(threads))
    monkeypatch.setattr(shard_derived, "_MIN_SPLIT_ROWS", 100)
    monkeypatch.setattr(shard_derived, "_MAX_BLOCK_ROWS", max_rows)
    derived = data.derived
    blocks = len(derived._codes_blocks().blocks)
    assert blocks == (threads if max_rows > 5000 else 5)
    assert np.array_equal(derived.profile_dot(g), expect_h)
    assert np.array_equal(derived.unit_counts(rows), expect_c)
    assert data.code_ids is not None and data.code_values is not None
    active = data.code_values[rows] > 0
    assert np.array_equal(expect_c, np.bincount(data.code_ids[rows][active], minlength=64))
    assert np.all(expect_h[:5] == 1.0)  # no positive activation: weight 1


def test_selection_threads_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAELECT_SELECTION_THREADS", "3")
    assert shard_derived.selection_threads() == 3
    for bad in ("0", "two"):
        monkeypatch.setenv("SAELECT_SELECTION_THREADS", bad)
        with pytest.raises(ValueError, match="SAELECT_SELECTION_THREADS"):
            shard_derived.selection_threads()
    monkeypatch.delenv("SAELECT_SELECTION_THREADS")
    assert 1 <= shard_derived.selection_threads() <= 2


@pytest.mark.parametrize("k", [8, 32])
def test_state_bytes_covers_what_a_shard_holds_with_its_derived_structures(k: int) -> None:
    """After epochs of the defaults (class layout, both sparse matrices, memoized profiles and
    the score buffer built), the held bytes stay within ``state_bytes``'s estimate, and the
    derived structures are counted (at least 4 k + 25 bytes per sample; every activation is
    positive, so the unit counts read the stored ids)."""
    n, units = 6000, 256
    rng = np.random.default_rng(k)
    ids = np.argsort(rng.random((n, units)), axis=1)[:, :k].astype(np.int32)
    values = (rng.random((n, k)) + 0.01).astype(np.float16)
    data = ShardData(
        0,
        n,
        R=rng.random(n),
        D=rng.random(n),
        labels=rng.integers(0, 10, n),
        code_ids=ids,
        code_values=values,
        p=np.bincount(ids.ravel(), minlength=units) / n,
    )
    sel = SingleProcessSelector(make_policy(PolicyConfig("factor", 0.3, 5, 0)), data)
    for _ in range(4):
        sel.step()
    assert sel.shard is not None
    held = shard_memory(sel.shard)
    assert held["derived"] >= (4 * k + 16 + 4 + 5) * n  # matrix, layout, row pointers, mass
    assert held["score_buffer"] == 8 * n
    assert sum(held.values()) <= state_bytes(n, k, True) - state_bytes(0, k, True)
