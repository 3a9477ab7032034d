"""The scoring pipeline's Ray tasks: plain functions over one shard or one step.

`remote` wraps each with ``ray.remote`` the first time it is used, and places every call in the
run's reservation (`workers.admission.Reservation`): a bundle's CPUs or GPU are held only while
the task runs. `workers.pipeline.run_scoring` is the driver that calls them in order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from saelect.workers import ranks, scoring_steps, shard_scoring
from saelect.workers.admission import Reservation
from saelect.workers.features import FeatureSpec
from saelect.workers.sae import SAEConfig
from saelect.workers.scores import ScoreConfig
from saelect.workers.shard_plan import ShardSpec
from saelect.workers.shard_scoring import ShardConfig
from saelect.workers.storage import Storage

RANK_SAMPLE = 1024
"""Sorted raw scores each shard sends for the sample sort's splitters (`workers.ranks`)."""


def node_id() -> str | None:
    """The Ray node this task runs on (None outside Ray): recorded with each encode attempt."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def take_raw(spec: ShardSpec, feature: FeatureSpec, idx: np.ndarray) -> Any:
    """The raw feature values of the shard's local rows idx int64 (n,), for the extractor's fit."""
    return shard_scoring.take_raw(spec, feature, idx)


def fit_extractor(feature: FeatureSpec, *parts: Any) -> dict[str, np.ndarray]:
    """The extractor's fitted state from every shard's sample of raw values."""
    return scoring_steps.fit_extractor_state(feature, shard_scoring.concat_values(parts))


def sample_features(
    spec: ShardSpec, feature: FeatureSpec, state: dict[str, np.ndarray], idx: np.ndarray
) -> np.ndarray:
    """Features float32 (n, d) of the shard's local rows idx (the SAE's training sample)."""
    values = shard_scoring.take_raw(spec, feature, idx)
    if len(values) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    extractor = shard_scoring.extractor_from_state(feature, state)
    return np.asarray(extractor.transform(values, progress=False), dtype=np.float32)


def train_sae(config: SAEConfig, threads: int, *parts: np.ndarray) -> dict[str, bytes]:
    """The SAE's files, trained on the shards' feature samples float32 (n_s, d) stacked."""
    import torch

    torch.set_num_threads(threads)  # the CPUs of its bundle
    feats = np.concatenate([p for p in parts if p.shape[0]])
    return scoring_steps.train_sae_files(feats, config)


def encode(
    spec: ShardSpec,
    storage: Storage,
    config: ShardConfig,
    state: dict[str, np.ndarray],
    sae_files: dict[str, bytes],
) -> np.ndarray:
    """Encode one shard batch by batch into its stored codes; its factor counts int64 (M,)."""
    return shard_scoring.encode_shard(spec, storage, config, state, sae_files, node_id=node_id())


def raw_scores(
    storage: Storage, shard_id: int, p: np.ndarray, score_config: ScoreConfig
) -> tuple[np.ndarray, np.ndarray]:
    """The shard's raw R and D stored; regular samples of each, sorted (the splitters' input)."""
    raw_r, raw_d = shard_scoring.raw_shard_scores(storage, shard_id, p, score_config)
    return (
        ranks.value_sample(np.sort(raw_r), RANK_SAMPLE),
        ranks.value_sample(np.sort(raw_d), RANK_SAMPLE),
    )


def split(
    storage: Storage,
    shard_id: int,
    score_config: ScoreConfig,
    split_r: np.ndarray,
    split_d: np.ndarray,
) -> tuple[Any, ...]:
    """(sizes_r, sizes_d, *R parts, *D parts): the shard's sorted raw scores cut into buckets."""
    raw_r, raw_d = shard_scoring.raw_shard_scores(storage, shard_id, np.zeros(0), score_config)
    parts_r, sizes_r = ranks.split_sorted(np.sort(raw_r), split_r)
    parts_d, sizes_d = ranks.split_sorted(np.sort(raw_d), split_d)
    return (sizes_r, sizes_d, *parts_r, *parts_d)


def bucket(offset: int, total: int, *parts: np.ndarray) -> Any:
    """One sample-sort bucket's ranks, its parts (one per shard) in shard order."""
    out = ranks.bucket_ranks(parts, offset, total)
    return out[0] if len(out) == 1 else tuple(out)


def write_scores(
    storage: Storage, shard_id: int, score_config: ScoreConfig, num_buckets: int, *parts: Any
) -> int:
    """Scatter the buckets' ranks back to the shard's rows and store R, D; the row count."""
    raw_r, raw_d = shard_scoring.raw_shard_scores(storage, shard_id, np.zeros(0), score_config)
    r = ranks.scatter_ranks(raw_r, parts[:num_buckets])
    d = ranks.scatter_ranks(raw_d, parts[num_buckets:])
    shard_scoring.write_shard_scores(storage, shard_id, r, d)
    return int(raw_r.shape[0])


_REMOTE: dict[str, Any] = {}


def remote(fn: Callable[..., Any], reservation: Reservation, retries: int, **kw: Any) -> Any:
    """fn as a Ray remote function placed in the reservation (``gpu``, ``bundle`` in kw)."""
    import ray

    if fn.__name__ not in _REMOTE:
        _REMOTE[fn.__name__] = ray.remote(fn)
    gpu, bundle = kw.pop("gpu", False), kw.pop("bundle", None)
    return _REMOTE[fn.__name__].options(
        max_retries=retries, **reservation.options(gpu=gpu, bundle=bundle), **kw
    )
