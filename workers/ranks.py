"""Exact global rank normalization in O(N / S) memory per shard: a sample sort.

`workers.scores.global_rank_normalize` ranks a shard's scores against every shard's sorted
scores, so each shard holds all N values (16 bytes x N for R and D: 16 GB at N = 1e9). Here the
values are cut into B value ranges ("buckets") by splitters drawn from per-shard samples; every
bucket is ranked where its values meet, and a value's global rank is the number of values in the
buckets below it plus its rank inside its bucket. Every copy of a value falls in one bucket (the
bucket is a function of the value), so ties share their mean rank exactly as in the
single-process `workers.scores.rank_normalize`, bit for bit.

The steps, each a pure function (the Ray pipeline runs them as tasks):

1. per shard: `value_sample` of its sorted scores;
2. coordinator: `choose_splitters` from all samples;
3. per shard: `split_sorted` cuts its sorted scores at the splitters (B parts, and their sizes);
4. per bucket: `bucket_ranks` merges the S parts of the bucket and ranks them;
5. per shard: `scatter_ranks` puts the B ranked parts back in the shard's row order.

Memory: a shard holds its own n values; a bucket task holds about N / B values (the splitters are
quantiles of a uniform sample, so buckets are even unless one value repeats very often).

Example
-------
>>> import numpy as np
>>> x = np.array([3.0, 1.0, 2.0, 2.0]); parts = [x[:2], x[2:]]
>>> sorted_parts = [np.sort(p) for p in parts]
>>> splits = choose_splitters([value_sample(s, 4) for s in sorted_parts], 2)
>>> cut = [split_sorted(s, splits) for s in sorted_parts]
>>> offsets = bucket_offsets([sizes for _, sizes in cut])
>>> ranked = [bucket_ranks([c[0][b] for c in cut], int(offsets[b]), 4) for b in range(2)]
>>> [scatter_ranks(p, [ranked[b][s] for b in range(2)]).tolist() for s, p in enumerate(parts)]
[[1.0, 0.0], [0.5, 0.5]]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "bucket_offsets",
    "bucket_ranks",
    "choose_splitters",
    "scatter_ranks",
    "split_sorted",
    "value_sample",
]


def value_sample(sorted_x: np.ndarray, count: int) -> np.ndarray:
    """``count`` evenly spaced values of sorted scores (all when shorter): float64 (<=count,).

    Raises ValueError for ``count < 1``.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    x = np.asarray(sorted_x, dtype=np.float64)
    if x.shape[0] <= count:
        return x.copy()
    pos = np.linspace(0, x.shape[0] - 1, count).round().astype(np.int64)
    return x[pos]


def choose_splitters(samples: Sequence[np.ndarray], buckets: int) -> np.ndarray:
    """``buckets - 1`` ascending distinct splitters from the shards' samples: float64 (<= B-1,).

    Bucket b holds the values v with ``splitters[b-1] <= v < splitters[b]`` (open at both ends).
    Duplicate quantiles are dropped, so a heavily tied dataset gets fewer, larger buckets.
    """
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    pool = np.sort(np.concatenate([np.asarray(s, np.float64) for s in samples] or [np.zeros(0)]))
    if buckets == 1 or pool.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    pos = (np.arange(1, buckets) * pool.shape[0]) // buckets
    cuts = np.unique(pool[pos])
    # a splitter equal to the smallest value would leave bucket 0 empty: harmless but useless
    return cuts[cuts > pool[0]]


def split_sorted(
    sorted_x: np.ndarray, splitters: np.ndarray
) -> tuple[list[np.ndarray], np.ndarray]:
    """Cut sorted scores into ``len(splitters) + 1`` buckets.

    Returns
    -------
    (parts, sizes): parts[b] float64 sorted values of bucket b; sizes int64 (B,).
    """
    x = np.asarray(sorted_x, dtype=np.float64)
    cuts = np.searchsorted(x, np.asarray(splitters, np.float64), side="left")
    parts = np.split(x, cuts)
    return parts, np.array([p.shape[0] for p in parts], dtype=np.int64)


def bucket_offsets(sizes: Sequence[np.ndarray]) -> np.ndarray:
    """int64 (B,): number of values in all buckets below b, from every shard's bucket sizes."""
    per_bucket = np.sum(np.stack([np.asarray(s, np.int64) for s in sizes]), axis=0)
    return np.concatenate([[0], np.cumsum(per_bucket)[:-1]]).astype(np.int64)


def bucket_ranks(parts: Sequence[np.ndarray], offset: int, total: int) -> list[np.ndarray]:
    """Normalized global ranks of one bucket's values, one array per shard part.

    Parameters
    ----------
    parts: the bucket's sorted values from every shard, float64 (n_s,) each.
    offset: how many of all ``total`` values lie in lower buckets.
    total: N, the number of values over all shards and buckets.

    Returns
    -------
    float64 (n_s,) per part: the mean 0-based rank of each value among all N (ties share it),
    divided by N - 1; 0.5 when N == 1. The formula of `workers.scores.global_rank_normalize`.
    """
    if total < 1:
        raise ValueError(f"total must be >= 1, got {total}")
    if total == 1:
        return [np.full(p.shape[0], 0.5, dtype=np.float64) for p in parts]
    merged = np.sort(np.concatenate([np.asarray(p, np.float64) for p in parts]))
    out = []
    for p in parts:
        less = offset + np.searchsorted(merged, p, side="left").astype(np.int64)
        leq = offset + np.searchsorted(merged, p, side="right").astype(np.int64)
        out.append((less + leq - 1).astype(np.float64) / float(2 * (total - 1)))
    return out


def scatter_ranks(x: np.ndarray, ranked_parts: Sequence[np.ndarray]) -> np.ndarray:
    """A shard's ranks in row order: float64 (n,), from its B ranked parts in sorted order.

    ``x`` is the shard's raw scores (n,), the array whose sorted copy was split.
    """
    order = np.argsort(np.asarray(x, np.float64), kind="stable")
    sorted_ranks = (
        np.concatenate([np.asarray(p, np.float64) for p in ranked_parts])
        if ranked_parts
        else np.zeros(0)
    )
    if sorted_ranks.shape[0] != order.shape[0]:
        raise ValueError(f"{sorted_ranks.shape[0]} ranks for {order.shape[0]} values")
    out = np.empty(order.shape[0], dtype=np.float64)
    out[order] = sorted_ranks
    return out
