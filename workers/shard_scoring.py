"""The scoring steps of one shard, as plain functions over the job storage (no Ray).

A shard is the global rows ``[lo, hi)`` of a `ShardSpec`. Its data path is one straight walk:

    rows --extractor--> features --SAE--> codes (+ factor counts) --p--> raw R, D --ranks--> R, D

`encode_shard` does the first two arrows chunk by chunk (the shard never holds all features),
`raw_shard_scores` the third, and `write_shard_scores` stores the rank-normalized result
(`workers.ranks` computes the exact global ranks). The Ray pipeline (`workers.pipeline`) runs
each step as a task that reserves its GPU or CPU only while it runs; the single-process path
(`workers.scoring_local`) runs the same walk in one process.

Every step reads what it needs from the storage and writes its output atomically, the last file
of a step marking it complete, so a retried task (after its worker died) redoes exactly the
unfinished work:

- ``shards/{s:05d}/codes.npz``, ``labels.npy``, then ``counts.npy`` (encoding complete);
- ``shards/{s:05d}/raw.npz`` (raw R, D), then ``scores.npz`` (R, D, raw, labels);
- ``shards/{s:05d}/encoding.json``: the attempt record (attempt number, rows encoded, pid, node,
  device), updated after every encode batch: it tells when an attempt was interrupted.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from saelect.workers.codes import SparseCodes
from saelect.workers.factors import factor_counts
from saelect.workers.features import FeatureSpec, column_to_numpy, make_extractor
from saelect.workers.scores import ScoreConfig, score_codes
from saelect.workers.shard_plan import ShardSpec, read_shard, row_keys
from saelect.workers.storage import Storage

__all__ = [
    "ENCODING_RECORD",
    "EXTRACTOR_FILE",
    "FACTORS_FILE",
    "SAE_DIR",
    "SAE_FILES",
    "ShardConfig",
    "column_values",
    "concat_values",
    "encode_shard",
    "extractor_from_state",
    "load_shard_codes",
    "load_shard_labels",
    "load_shard_scores",
    "pick_device",
    "raw_shard_scores",
    "read_shard_labels",
    "sae_from_files",
    "sample_keys",
    "shard_dir",
    "take_raw",
    "write_shard_scores",
]

EXTRACTOR_FILE = "features/extractor.npz"
"""Fitted extractor state, relative to the job storage."""
SAE_DIR = "sae"
"""Directory of the trained SAE (safetensors weights + JSON config), relative to the storage."""
SAE_FILES = ("sae.safetensors", "sae.json")
"""The files `workers.sae_files.save_sae` writes."""
FACTORS_FILE = "factors.npy"
"""float64 (M,) global factor frequencies p."""
ENCODING_RECORD = "encoding.json"
"""Per shard: the encode attempts (see the module docstring)."""


def shard_dir(shard_id: int) -> str:
    """The shard's output directory relative to the job storage: ``shards/{s:05d}``."""
    return f"shards/{shard_id:05d}"


@dataclass(frozen=True)
class ShardConfig:
    """How a shard turns rows into features and codes."""

    feature: FeatureSpec
    """Feature extractor spec (column, kind, dim, module)."""
    label_column: str | None = None
    """Integer class-label column, or None."""
    encode_batch_size: int = 8192
    """Rows featurized and encoded at a time (the shard never holds more features)."""
    encode_pause_s: float = 0.0
    """Seconds to sleep after each encode batch: lets tests interrupt an encode in flight."""

    def __post_init__(self) -> None:
        if self.encode_batch_size < 1:
            raise ValueError(f"encode_batch_size must be >= 1, got {self.encode_batch_size}")
        if self.encode_pause_s < 0:
            raise ValueError(f"encode_pause_s must be >= 0, got {self.encode_pause_s}")
        if self.label_column is not None and not self.label_column:
            raise ValueError(f"label_column must be None or non-empty, got {self.label_column!r}")


def pick_device() -> str:
    """``cuda`` when this process really sees a GPU, else ``cpu``.

    Never decided from a Ray reservation: a cluster may declare GPUs it does not have, and a
    task that reserved one sees it only through ``CUDA_VISIBLE_DEVICES``.
    """
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def column_values(table: pa.Table, spec: FeatureSpec) -> Any:
    """The raw input of an extractor: list[str] for ``text``, a list of encoded images
    (``{"bytes", "path"}`` dicts or bytes) for ``image_model``, else an ndarray (n, ...)."""
    if spec.column not in table.column_names:
        raise ValueError(f"feature column {spec.column!r} not in {table.column_names}")
    if spec.kind in ("text", "image_model"):
        values = table[spec.column].to_pylist()
        if any(v is None for v in values):
            raise ValueError(f"{spec.kind} column {spec.column!r} has null values")
        return values
    return column_to_numpy(table, spec.column)


def concat_values(parts: Sequence[Any]) -> Any:
    """Concatenate raw extractor inputs of several shards (ndarrays or lists)."""
    if parts and isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    return [v for p in parts for v in p]


def extractor_from_state(spec: FeatureSpec, state: dict[str, np.ndarray]) -> Any:
    """A fitted extractor rebuilt from its ``state_dict``."""
    extractor = make_extractor(spec)
    extractor.load_state_dict(state)
    return extractor


def sae_from_files(files: dict[str, bytes], device: str = "cpu") -> Any:
    """A `TopKSAE` from the bytes of the files `save_sae` wrote (name -> content)."""
    from saelect.workers.sae_files import load_sae  # torch: imported only where an SAE is used

    with tempfile.TemporaryDirectory(prefix="saelect-sae-") as tmp:
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        model = load_sae(tmp)
    return model.to(device).eval()


def _labels(table: pa.Table, column: str | None) -> np.ndarray | None:
    if column is None:
        return None
    col = table[column]
    if col.null_count:
        raise ValueError(f"label column {column!r} has nulls")
    labels = np.asarray(col.to_numpy(), dtype=np.int64)
    if labels.shape[0] and labels.min() < 0:
        raise ValueError(f"label column {column!r} has negative labels")
    return labels


def read_shard_labels(spec: ShardSpec, label_column: str | None) -> np.ndarray | None:
    """int64 (n,) labels of the shard's rows read from the dataset, or None without a column."""
    if label_column is None:
        return None
    return _labels(read_shard(spec, [label_column]), label_column)


def sample_keys(spec: ShardSpec, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The shard's ``count`` rows with the smallest `row_keys`: (keys uint64, global int64).

    Merging all shards' answers and keeping the ``count`` smallest keys gives the same global
    sample for any number of shards.
    """
    keys = row_keys(seed, spec.lo, spec.hi)  # (n,)
    if count < keys.shape[0]:
        pos = np.argpartition(keys, count - 1)[:count]
    else:
        pos = np.arange(keys.shape[0])
    return keys[pos], pos.astype(np.int64) + spec.lo


def take_raw(spec: ShardSpec, feature: FeatureSpec, global_idx: np.ndarray) -> Any:
    """Raw extractor input of the given global rows of this shard (n_idx, ...) or list[str]."""
    idx = np.asarray(global_idx, dtype=np.int64)
    if idx.shape[0] and (idx.min() < spec.lo or idx.max() >= spec.hi):
        raise ValueError(f"indices outside shard range [{spec.lo}, {spec.hi})")
    table = read_shard(spec, [feature.column])
    return column_values(table.take(idx - spec.lo), feature)


# ------------------------------------------------------------------------------ encoding
def _encoding_done(out: Storage) -> bool:
    return out.exists("counts.npy")


def encode_shard(
    spec: ShardSpec,
    storage: Storage,
    config: ShardConfig,
    extractor_state: dict[str, np.ndarray],
    sae_files: dict[str, bytes],
    *,
    node_id: str | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Featurize and encode the shard batch by batch; store codes, labels, counts.

    Returns int64 (M,) factor counts. A shard whose ``counts.npy`` exists is not recomputed.
    Each attempt is recorded in ``encoding.json`` (attempt, rows_done, pid, node_id, device,
    done), rewritten after every batch; ``on_batch(rows_done)`` is called after each batch too.

    Raises ValueError for a missing or ragged feature column or bad labels.
    """
    out = storage.child(shard_dir(spec.shard_id))
    if _encoding_done(out):
        return out.read_npy("counts.npy")
    previous = out.read_json(ENCODING_RECORD) if out.exists(ENCODING_RECORD) else {}
    device = pick_device()
    record: dict[str, Any] = {
        "attempt": int(previous.get("attempt", 0)) + 1,
        "interrupted": list(previous.get("interrupted", []))
        + ([int(previous.get("rows_done", 0))] if previous and not previous.get("done") else []),
        "rows_done": 0,
        "rows": spec.num_rows,
        "pid": os.getpid(),
        "node_id": node_id,
        "device": device,
        "done": False,
    }
    out.write_json(ENCODING_RECORD, record)
    columns = [config.feature.column] + ([config.label_column] if config.label_column else [])
    table = read_shard(spec, columns)
    labels = _labels(table, config.label_column)
    rows = table.select([config.feature.column])
    extractor = extractor_from_state(config.feature, extractor_state)
    model = sae_from_files(sae_files, device)
    from saelect.workers.sae_encode import encode  # torch: imported only where an SAE is used

    n, bs = spec.num_rows, config.encode_batch_size
    parts: list[SparseCodes] = []
    for start in range(0, n, bs):
        values = column_values(rows.slice(start, bs), config.feature)
        feats = np.asarray(extractor.transform(values, progress=False), dtype=np.float32)
        if feats.shape[0] != min(bs, n - start):
            raise ValueError(f"extractor returned {feats.shape[0]} rows for a batch")
        parts.append(encode(model, feats, batch_size=bs))
        record["rows_done"] = start + feats.shape[0]
        out.write_json(ENCODING_RECORD, record)
        if on_batch is not None:
            on_batch(record["rows_done"])
        if config.encode_pause_s:
            time.sleep(config.encode_pause_s)
    codes = SparseCodes.concat(parts)
    counts = factor_counts(codes, model.units)
    # codes and labels first, counts last: counts.npy existing means the encoding is complete
    out.write_npz("codes.npz", ids=codes.ids, values=codes.values)
    out.write_npy("labels.npy", np.empty(0, np.int64) if labels is None else labels)
    out.write_npy("counts.npy", counts)
    record["done"] = True
    out.write_json(ENCODING_RECORD, record)
    return counts


def load_shard_codes(storage: Storage, shard_id: int) -> SparseCodes:
    """The shard's stored codes: ids int32 (n, k), values float16 (n, k)."""
    z = storage.child(shard_dir(shard_id)).read_npz("codes.npz")
    return SparseCodes(z["ids"], z["values"])


def load_shard_labels(storage: Storage, shard_id: int) -> np.ndarray | None:
    """The shard's stored int64 (n,) labels, or None when the job has no label column."""
    out = storage.child(shard_dir(shard_id))
    rel = "scores.npz" if out.exists("scores.npz") else None
    labels = out.read_npz(rel)["labels"] if rel else out.read_npy("labels.npy")
    return labels if labels.shape[0] else None


# ------------------------------------------------------------------------------ scores
def raw_shard_scores(
    storage: Storage, shard_id: int, p: np.ndarray, score_config: ScoreConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Raw R and D, float64 (n,) each, for the global frequencies p; stored in ``raw.npz``.

    Read back from ``scores.npz`` (which keeps them) or ``raw.npz`` when already computed.
    """
    out = storage.child(shard_dir(shard_id))
    for rel in ("scores.npz", "raw.npz"):
        if out.exists(rel):
            z = out.read_npz(rel)
            return z["R_raw"], z["D_raw"]
    raw_r, raw_d = score_codes(load_shard_codes(storage, shard_id), p, score_config)
    raw_r, raw_d = np.asarray(raw_r, np.float64), np.asarray(raw_d, np.float64)
    out.write_npz("raw.npz", R_raw=raw_r, D_raw=raw_d)
    return raw_r, raw_d


def write_shard_scores(storage: Storage, shard_id: int, r: np.ndarray, d: np.ndarray) -> None:
    """Store the rank-normalized R and D (float64 (n,)) with the raw scores and the labels."""
    out = storage.child(shard_dir(shard_id))
    if out.exists("scores.npz"):
        return
    raw = out.read_npz("raw.npz")
    labels = out.read_npy("labels.npy")
    out.write_npz("scores.npz", R=r, D=d, R_raw=raw["R_raw"], D_raw=raw["D_raw"], labels=labels)
    out.delete("raw.npz")


def load_shard_scores(storage: Storage, shard_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The shard's rank-normalized R and D, float64 (n,) each."""
    z = storage.child(shard_dir(shard_id)).read_npz("scores.npz")
    return z["R"], z["D"]
