"""Score a dataset in one process, without Ray: the same walk as the pipeline, S = 1.

dataset rows -> extractor fitted on the global fit sample -> SAE trained on the global SAE
sample -> rows featurized and encoded batch by batch -> factor counts, p -> raw R, D -> ranks.

It is the ``S = 1, no Ray`` path of `service.simulate` and the benchmarks, and the reference the
distributed pipeline is compared with (same samples, same arithmetic, any shard count).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
from saelect.workers import scoring_steps as steps
from saelect.workers.codes import SparseCodes
from saelect.workers.factors import factor_counts, factor_frequencies
from saelect.workers.features import FeatureSpec
from saelect.workers.sae import SAEConfig
from saelect.workers.sae_encode import encode
from saelect.workers.scores import ScoreConfig, rank_normalize, score_codes
from saelect.workers.shard_data import ShardData
from saelect.workers.shard_plan import plan_shards, read_shard
from saelect.workers.shard_scoring import column_values, extractor_from_state, sae_from_files

__all__ = ["SingleProcessScores", "score_single_process"]


class SingleProcessScores(NamedTuple):
    """Everything the pipeline computes, computed in one process."""

    R: np.ndarray
    """float64 (N,) rank-normalized representativeness."""
    D: np.ndarray
    """float64 (N,) rank-normalized diversity."""
    labels: np.ndarray | None
    """int64 (N,) labels or None."""
    codes: SparseCodes
    """Sparse codes of all rows."""
    counts: np.ndarray
    """int64 (M,) factor counts."""
    p: np.ndarray
    """float64 (M,) factor frequencies."""
    timings: dict[str, float]
    """Seconds per phase (featurizing, training_sae, encoding, scoring)."""

    def shard_data(self) -> ShardData:
        """The whole dataset as one selection shard [0, N): R, D, labels, codes and p."""
        return ShardData(
            lo=0,
            hi=int(self.R.shape[0]),
            R=self.R,
            D=self.D,
            labels=self.labels,
            code_ids=self.codes.ids,
            code_values=self.codes.values,
            p=self.p,
        )


def score_single_process(
    dataset_uri: str,
    feature_spec: FeatureSpec,
    label_column: str | None,
    sae_config: SAEConfig,
    score_config: ScoreConfig,
    *,
    extractor_fit_samples: int = 20_000,
    encode_batch_size: int = 8192,
) -> SingleProcessScores:
    """Score a Parquet dataset in this process (no Ray).

    Parameters
    ----------
    dataset_uri: Parquet file or directory.
    feature_spec, label_column: how rows become features; the label column or None.
    sae_config, score_config: the SAE and the R/D forms.
    extractor_fit_samples: rows of the extractor's fit sample (the pipeline's option of the name).
    encode_batch_size: rows featurized and encoded at a time.

    Returns
    -------
    `SingleProcessScores`: R, D, labels, codes, counts, p and per-phase seconds.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    columns = [feature_spec.column] + ([label_column] if label_column else [])
    plan = plan_shards(dataset_uri, 1, columns=columns)
    table = read_shard(plan.shards[0], columns)
    values = column_values(table, feature_spec)
    n = plan.num_rows
    fit_seed = steps.sample_seed(sae_config.seed, steps.FIT_STREAM)
    fit_idx = steps.sample_indices(n, min(extractor_fit_samples, n), fit_seed)
    state = steps.fit_extractor_state(feature_spec, steps.take_values(values, fit_idx))
    extractor = extractor_from_state(feature_spec, state)
    timings["featurizing"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sae_seed = steps.sample_seed(sae_config.seed, steps.SAE_STREAM)
    sae_idx = steps.sample_indices(n, steps.sae_train_count(sae_config, n), sae_seed)
    sae_sample = steps.take_values(values, sae_idx)
    sae_feats = np.asarray(extractor.transform(sae_sample, progress=False), dtype=np.float32)
    model = sae_from_files(steps.train_sae_files(sae_feats, sae_config))
    timings["training_sae"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    bs = encode_batch_size
    parts = []
    for start in range(0, n, bs):
        batch = values[start : start + bs]
        feats = np.asarray(extractor.transform(batch, progress=False), dtype=np.float32)
        parts.append(encode(model, feats, batch_size=bs))
    codes = SparseCodes.concat(parts)
    counts = factor_counts(codes, model.units)
    p = np.asarray(factor_frequencies(counts, n), dtype=np.float64)
    timings["encoding"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    raw_r, raw_d = score_codes(codes, p, score_config)
    labels = None
    if label_column:
        labels = np.asarray(table[label_column].to_numpy(), dtype=np.int64)
    r, d = rank_normalize(raw_r), rank_normalize(raw_d)
    timings["scoring"] = time.perf_counter() - t0
    return SingleProcessScores(r, d, labels, codes, counts, p, timings)
