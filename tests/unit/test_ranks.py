"""The sample-sort global ranks equal the single-process ranks bit for bit; admission requests."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from saelect.workers import ranks
from saelect.workers.admission import (
    ResourceRequest,
    ScoringResources,
    describe_resources,
    plan_request,
)
from saelect.workers.scores import rank_normalize


def sharded_ranks(x: np.ndarray, cuts: list[int], buckets: int, sample: int) -> np.ndarray:
    """The pipeline's five steps, in process: every shard's ranks, concatenated."""
    parts = np.split(x, cuts)
    sorted_parts = [np.sort(p) for p in parts]
    splitters = ranks.choose_splitters(
        [ranks.value_sample(s, sample) for s in sorted_parts], buckets
    )
    cut = [ranks.split_sorted(s, splitters) for s in sorted_parts]
    offsets = ranks.bucket_offsets([sizes for _, sizes in cut])
    nb = splitters.shape[0] + 1
    per_bucket = [
        ranks.bucket_ranks([c[0][b] for c in cut], int(offsets[b]), x.shape[0]) for b in range(nb)
    ]
    return np.concatenate(
        [ranks.scatter_ranks(p, [per_bucket[b][s] for b in range(nb)]) for s, p in enumerate(parts)]
    )


@pytest.mark.parametrize("num_shards", [1, 2, 3, 8])
@pytest.mark.parametrize("distinct", [2, 5, 1000, None])
def test_sample_sort_ranks_equal_single_process_ranks(
    num_shards: int, distinct: int | None
) -> None:
    """Heavy ties (2 or 5 distinct values), many values, and continuous scores."""
    rng = np.random.default_rng(num_shards * 31 + (distinct or 0))
    n = 997
    x = rng.random(n) if distinct is None else rng.integers(0, distinct, n) / distinct
    cuts = sorted(rng.choice(np.arange(1, n), num_shards - 1, replace=False).tolist())
    for sample in (1, 7, 1024):  # tiny samples make uneven buckets: the ranks stay exact
        got = sharded_ranks(x, cuts, num_shards, sample)
        np.testing.assert_array_equal(got, rank_normalize(x))


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.integers(-3, 3), min_size=1, max_size=60),
    shards=st.integers(1, 6),
    buckets=st.integers(1, 9),
    sample=st.integers(1, 5),
)
def test_sample_sort_ranks_hold_for_any_split(
    values: list[int], shards: int, buckets: int, sample: int
) -> None:
    x = np.asarray(values, dtype=np.float64) / 3.0
    n = x.shape[0]
    cuts = np.linspace(0, n, shards + 1).round().astype(int)[1:-1].tolist()  # empty shards too
    np.testing.assert_array_equal(sharded_ranks(x, cuts, buckets, sample), rank_normalize(x))


def test_a_bucket_holds_every_copy_of_a_value() -> None:
    sorted_x = np.array([0.0, 1.0, 1.0, 1.0, 2.0, 3.0])
    parts, sizes = ranks.split_sorted(sorted_x, np.array([1.0, 3.0]))
    assert [p.tolist() for p in parts] == [[0.0], [1.0, 1.0, 1.0, 2.0], [3.0]]
    assert sizes.tolist() == [1, 4, 1]
    assert ranks.choose_splitters([np.ones(10)], 4).shape == (0,)  # all tied: one bucket


def test_scatter_rejects_a_wrong_count() -> None:
    with pytest.raises(ValueError, match="2 ranks for 3 values"):
        ranks.scatter_ranks(np.zeros(3), [np.zeros(2)])


@pytest.mark.parametrize(
    ("resources", "cluster", "shards", "want"),
    [
        (ScoringResources(), {"CPU": 2.0}, 4, ResourceRequest(2, 1.0, 0)),
        (ScoringResources(), {"CPU": 16.0}, 4, ResourceRequest(4, 1.0, 0)),
        (ScoringResources(), {"CPU": 2.0, "GPU": 3.0}, 6, ResourceRequest(3, 0.25, 1)),
        (ScoringResources(), {"CPU": 2.0, "GPU": 8.0}, 2, ResourceRequest(2, 0.25, 1)),
        (ScoringResources(gpus=4), {"CPU": 2.0}, 8, ResourceRequest(4, 0.25, 1)),
        (ScoringResources(gpus=0), {"CPU": 4.0, "GPU": 2.0}, 8, ResourceRequest(4, 1.0, 0)),
        (
            ScoringResources(cpu_workers=1, cpus_per_worker=0.5),
            {"CPU": 8.0},
            8,
            ResourceRequest(1, 0.5, 0),
        ),
    ],
)
def test_plan_request_resolves_against_the_cluster(
    resources: ScoringResources, cluster: dict[str, float], shards: int, want: ResourceRequest
) -> None:
    assert plan_request(resources, cluster, shards) == want


def test_request_describes_itself() -> None:
    req = ResourceRequest(3, 0.25, 1)
    assert req.total() == {"CPU": 0.75, "GPU": 3.0}
    assert req.describe() == "3 x {CPU: 0.25, GPU: 1}"
    assert describe_resources({"CPU": 2.0, "memory": 2.0 * 2**30}) == "{CPU: 2, memory: 2.0 GiB}"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gpus": -1}, "gpus"),
        ({"cpu_workers": 0}, "cpu_workers"),
        ({"cpus_per_worker": 0.0}, "cpus_per_worker"),
        ({"placement_timeout_s": 0.0}, "placement_timeout_s"),
    ],
)
def test_scoring_resources_reject_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ScoringResources(**kwargs)
