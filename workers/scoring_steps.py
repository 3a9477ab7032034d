"""The dataset-wide scoring steps (no Ray): samples, extractor fit, SAE training, fingerprint.

The per-shard steps are in `workers.shard_scoring`. Both the Ray pipeline and the
single-process path call these, so a dataset is scored by the same arithmetic on any shard count:

- the extractor is fitted on the ``extractor_fit_samples`` rows with the smallest counter-based
  keys (`sample_indices`), the SAE trained on the ``max_train_samples`` rows of another key
  stream: both samples are the same for every shard count;
- the trained SAE goes through its file round trip (`sae_to_files`) before anything encodes, so
  every encoder sees bit-identical weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Any

import numpy as np
from saelect.workers.features import FeatureSpec, make_extractor
from saelect.workers.sae import SAEConfig
from saelect.workers.sae_files import save_sae
from saelect.workers.scores import ScoreConfig
from saelect.workers.shard_plan import ShardPlan, row_keys
from saelect.workers.shard_scoring import SAE_FILES, pick_device

__all__ = [
    "FIT_STREAM",
    "FIT_THREADS",
    "FORMAT_VERSION",
    "SAE_STREAM",
    "fingerprint",
    "fit_extractor_state",
    "sae_to_files",
    "sae_train_count",
    "sample_indices",
    "sample_seed",
    "take_values",
    "train_sae_files",
]

FIT_STREAM = 1
"""Sample stream of the extractor fit."""
SAE_STREAM = 2
"""Sample stream of the SAE training set."""
FORMAT_VERSION = 2
"""Version of the scoring outputs; part of the fingerprint, so older outputs are recomputed.
2: features are never stored; a shard featurizes and encodes batch by batch; labels.npy."""


def sample_seed(seed: int, stream: int) -> int:
    """The key seed of one sample stream of an SAE seed."""
    return seed * 1_000_003 + stream


def sample_indices(num_rows: int, count: int, seed: int) -> np.ndarray:
    """Sorted int64 global indices of the ``count`` rows with the smallest keys (all rows if
    ``count >= num_rows``)."""
    if count >= num_rows:
        return np.arange(num_rows, dtype=np.int64)
    keys = row_keys(seed, 0, num_rows)
    return np.sort(np.argpartition(keys, count - 1)[:count]).astype(np.int64)


def sae_train_count(config: SAEConfig, num_rows: int) -> int:
    """Rows the SAE is trained on: ``min(N, max_train_samples)``."""
    limit = getattr(config, "max_train_samples", None)
    return num_rows if limit is None else min(num_rows, int(limit))


def take_values(values: Any, idx: np.ndarray) -> Any:
    """Rows ``idx`` of raw extractor input (an ndarray or a list)."""
    if isinstance(values, np.ndarray):
        return values[idx]
    return [values[int(i)] for i in idx]


FIT_THREADS = 1
"""BLAS and torch threads of the extractor fit, in every process that fits: a PCA's components
differ in their last bits between thread counts, so a fixed count keeps the fit (and everything
downstream) identical wherever it runs: the driver, a scoring task, any cluster."""


def fit_extractor_state(spec: FeatureSpec, sample: Any) -> dict[str, np.ndarray]:
    """Fit an extractor on a sample of raw input; its numpy state (storable with np.savez).

    Runs with `FIT_THREADS` BLAS/torch threads (restored afterwards).
    """
    import torch
    from threadpoolctl import threadpool_limits

    extractor = make_extractor(spec)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(FIT_THREADS)
        with threadpool_limits(limits=FIT_THREADS):
            extractor.fit(sample)
    finally:
        torch.set_num_threads(threads)
    return {k: np.asarray(v) for k, v in extractor.state_dict().items()}


def sae_to_files(model: Any, config: SAEConfig) -> dict[str, bytes]:
    """The bytes of the files `save_sae` writes (name -> content)."""
    with tempfile.TemporaryDirectory(prefix="saelect-sae-") as tmp:
        save_sae(model, tmp, config)
        out = {}
        for name in SAE_FILES:
            with open(os.path.join(tmp, name), "rb") as f:
                out[name] = f.read()
        return out


def train_sae_files(features_ND: np.ndarray, config: SAEConfig) -> dict[str, bytes]:
    """Train the SAE on float32 (n, d) features in this process; its files' bytes.

    Trains on CUDA when this process sees a GPU and the config asks for the CPU default.
    """
    from saelect.workers.sae_train import train_sae_distributed

    if config.device == "cpu" and pick_device() == "cuda":
        config = dataclasses.replace(config, device="cuda")
    model = train_sae_distributed(features_ND, config, num_workers=1, progress=False)
    return sae_to_files(model.cpu(), dataclasses.replace(config, device="cpu"))


def fingerprint(
    plan: ShardPlan,
    feature_spec: FeatureSpec,
    label_column: str | None,
    sae_config: SAEConfig,
    score_config: ScoreConfig,
    fit_samples: int,
) -> str:
    """Content hash of a scoring's inputs; a change makes a rerun recompute everything."""
    doc = {
        "version": FORMAT_VERSION,
        "uri": plan.uri,
        "files": list(plan.files),
        "row_groups": [list(r) for r in plan.row_group_rows],
        "feature": dataclasses.asdict(feature_spec),
        "label": label_column,
        "sae": {k: v for k, v in dataclasses.asdict(sae_config).items() if k != "device"},
        "score": dataclasses.asdict(score_config),
        "fit_samples": fit_samples,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()
