"""One shard of the scoring pipeline and of the selection state: `ShardActor`.

A `ShardActor` owns the global rows ``[lo, hi)`` of a `ShardSpec`. Over the pipeline it reads its
rows, extracts features with the coordinator's fitted extractor, encodes them with the SAE,
counts factor activations, computes raw R and D once p is known, and keeps its rank-normalized
R and D. For the selection service it then holds a pure `SelectionShard` and forwards the
threshold protocol to it (`call`).

Everything a method needs that is not in memory is rebuilt from the job storage, so an actor that
Ray restarted after a crash (its constructor runs again with the same arguments, its memory is
gone) answers a retried task exactly like the original one:

- ``features/extractor.npz`` (fitted extractor state) -> features of the shard's rows;
- ``sae/`` (sae.safetensors + sae.json) -> ``shards/{s:05d}/codes.npz`` and ``counts.npy``;
- ``factors.npy`` (p) -> ``shards/{s:05d}/scores.npz`` (R, D rank-normalized, raw, labels).

A shard whose output file exists is not recomputed; `Storage` writes are atomic, so a file that
exists is complete. The class is plain Python (tests use it in-process); `remote_shard_actor`
wraps it with ``ray.remote``.
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

from workers.codes import SparseCodes
from workers.factors import factor_counts
from workers.features import FeatureSpec, column_to_numpy, make_extractor
from workers.scores import ScoreConfig, global_rank_normalize, score_codes
from workers.selection_shard import SelectionShard, ShardData
from workers.shard_plan import ShardSpec, read_shard, row_keys
from workers.storage import Storage

__all__ = [
    "EXTRACTOR_FILE",
    "FACTORS_FILE",
    "SAE_DIR",
    "SAE_FILES",
    "ShardActor",
    "ShardConfig",
    "actor_broadcast",
    "column_values",
    "extractor_from_state",
    "remote_shard_actor",
    "sae_from_files",
    "shard_dir",
]

EXTRACTOR_FILE = "features/extractor.npz"
"""Fitted extractor state, relative to the job storage."""
SAE_DIR = "sae"
"""Directory of the trained SAE (safetensors weights + JSON config), relative to the job storage."""
SAE_FILES = ("sae.safetensors", "sae.json")
"""The files `workers.sae.save_sae` writes."""
FACTORS_FILE = "factors.npy"
"""float64 (M,) global factor frequencies p."""


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
    """Rows per SAE encode batch."""
    device: str = "cpu"
    """Torch device of the feature extractor and the SAE on this shard."""
    encode_pause_s: float = 0.0
    """Seconds to sleep after each encode batch: lets tests interrupt an encode in flight."""
    featurize_chunk: int = 65536
    """Rows converted from the stored column and featurized at a time."""

    def __post_init__(self) -> None:
        if self.encode_batch_size < 1:
            raise ValueError(f"encode_batch_size must be >= 1, got {self.encode_batch_size}")
        if self.featurize_chunk < 1:
            raise ValueError(f"featurize_chunk must be >= 1, got {self.featurize_chunk}")
        if self.encode_pause_s < 0:
            raise ValueError(f"encode_pause_s must be >= 0, got {self.encode_pause_s}")
        if self.label_column is not None and not self.label_column:
            raise ValueError(f"label_column must be None or non-empty, got {self.label_column!r}")


def column_values(table: pa.Table, spec: FeatureSpec) -> Any:
    """The raw input of an extractor: list[str] for ``text``, else an ndarray (n, ...)."""
    if spec.column not in table.column_names:
        raise ValueError(f"feature column {spec.column!r} not in {table.column_names}")
    if spec.kind == "text":
        values = table[spec.column].to_pylist()
        if any(v is None for v in values):
            raise ValueError(f"text column {spec.column!r} has null values")
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
    from workers.sae import load_sae  # torch: imported only by shards that encode

    with tempfile.TemporaryDirectory(prefix="saelect-sae-") as tmp:
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        model = load_sae(tmp)
    return model.to(device).eval()


class ShardActor:
    """The scoring and selection state of one shard (plain class; see `remote_shard_actor`).

    Parameters
    ----------
    spec: the shard (global rows ``[lo, hi)`` and their file pieces).
    storage: the job storage (outputs go below ``shards/{s:05d}``).
    config: feature spec, label column, batch sizes, device.
    """

    def __init__(self, spec: ShardSpec, storage: Storage, config: ShardConfig) -> None:
        self.spec = spec
        self.storage = storage
        self.out = storage.child(shard_dir(spec.shard_id))
        self.config = config
        self._rows: pa.Table | None = None  # the feature column as stored (n rows)
        self._labels: np.ndarray | None = None  # int64 (n,)
        self._features: np.ndarray | None = None  # float32 (n, d)
        self._codes: SparseCodes | None = None  # ids int32 (n, k), values float16 (n, k)
        self._raw: tuple[np.ndarray, np.ndarray] | None = None  # raw R, D float64 (n,)
        self._scores: tuple[np.ndarray, np.ndarray] | None = None  # normalized R, D (n,)
        self._selection: SelectionShard | None = None

    # ------------------------------------------------------------------ getters
    def info(self) -> dict[str, Any]:
        """Shard id, range, the Ray node id (or None outside Ray) and the process id."""
        node = None
        try:
            import ray

            if ray.is_initialized():
                node = ray.get_runtime_context().get_node_id()
        except ImportError:  # pragma: no cover - ray is a dependency
            node = None
        return {
            "shard_id": self.spec.shard_id,
            "lo": self.spec.lo,
            "hi": self.spec.hi,
            "node_id": node,
            "pid": os.getpid(),
        }

    def ping(self) -> int:
        """The shard's row count (a cheap liveness check)."""
        return self.spec.num_rows

    # ------------------------------------------------------------------ rows
    def load(self) -> int:
        """Read the shard's feature and label columns; returns the row count.

        Raises ValueError for a missing or ragged feature column or bad labels.
        """
        if self._rows is not None:
            return self.spec.num_rows
        columns = [self.config.feature.column]
        if self.config.label_column is not None:
            columns.append(self.config.label_column)
        table = read_shard(self.spec, columns)
        labels = None
        if self.config.label_column is not None:
            col = table[self.config.label_column]
            if col.null_count:
                raise ValueError(f"label column {self.config.label_column!r} has nulls")
            labels = np.asarray(col.to_numpy(), dtype=np.int64)
            if labels.shape[0] and labels.min() < 0:
                raise ValueError(f"label column {self.config.label_column!r} has negative labels")
        self._rows, self._labels = table.select([self.config.feature.column]), labels
        return self.spec.num_rows

    def sample_keys(self, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The shard's ``count`` rows with the smallest `row_keys`: (keys uint64, global int64).

        Merging all shards' answers and keeping the ``count`` smallest keys gives the same global
        sample for any number of shards.
        """
        keys = row_keys(seed, self.spec.lo, self.spec.hi)  # (n,)
        if count < keys.shape[0]:
            pos = np.argpartition(keys, count - 1)[:count]
        else:
            pos = np.arange(keys.shape[0])
        return keys[pos], pos.astype(np.int64) + self.spec.lo

    def _local(self, global_idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(global_idx, dtype=np.int64)
        if idx.shape[0] and (idx.min() < self.spec.lo or idx.max() >= self.spec.hi):
            raise ValueError(f"indices outside shard range [{self.spec.lo}, {self.spec.hi})")
        return idx - self.spec.lo

    def take_raw(self, global_idx: np.ndarray) -> Any:
        """Raw extractor input of the given global rows (for fitting the extractor)."""
        self.load()
        assert self._rows is not None
        return column_values(self._rows.take(self._local(global_idx)), self.config.feature)

    # ------------------------------------------------------------------ features
    def featurize(self, extractor_state: dict[str, np.ndarray] | None = None) -> int:
        """Extract the shard's features (float32 (n, d)); returns n.

        ``extractor_state`` is the fitted extractor's state (None: read it from the storage).
        Skipped when the shard's codes already exist (nothing downstream needs features).
        """
        if self._features is not None or self._codes_done():
            return self.spec.num_rows
        self.load()
        if extractor_state is None:
            extractor_state = self.storage.read_npz(EXTRACTOR_FILE)
        spec = self.config.feature
        extractor = extractor_from_state(spec, extractor_state)
        assert self._rows is not None
        n = self.spec.num_rows
        feats: np.ndarray | None = None  # float32 (n, d)
        # convert the stored column chunk by chunk: the shard never holds all rows as floats
        for start in range(0, n, self.config.featurize_chunk):
            values = column_values(self._rows.slice(start, self.config.featurize_chunk), spec)
            part = np.asarray(extractor.transform(values, progress=False), dtype=np.float32)
            if feats is None:
                feats = np.empty((n, part.shape[1]), dtype=np.float32)
            if part.shape[0] != min(self.config.featurize_chunk, n - start):
                raise ValueError(f"extractor returned {part.shape[0]} rows for a chunk")
            feats[start : start + part.shape[0]] = part
        assert feats is not None
        self._features = feats
        return self.spec.num_rows

    def take_features(self, global_idx: np.ndarray) -> np.ndarray:
        """float32 (len(global_idx), d) features of the given global rows (SAE training sample)."""
        self.featurize()
        if self._features is None:
            raise ValueError("features were dropped after encoding; sample before encoding")
        return self._features[self._local(global_idx)]

    # ------------------------------------------------------------------ codes
    def _codes_done(self) -> bool:
        return self.out.exists("codes.npz") and self.out.exists("counts.npy")

    def encode(self, sae_files: dict[str, bytes] | None = None) -> np.ndarray:
        """Encode the shard with the SAE, store codes and counts; returns int64 (M,) counts.

        ``sae_files`` are the bytes of the files `save_sae` wrote (None: read them from the
        storage). A shard whose codes exist is loaded, not recomputed. Features are dropped once
        the codes are stored.
        """
        if self._codes_done():
            self._load_codes()
            return self.out.read_npy("counts.npy")
        self.featurize()
        if sae_files is None:
            sae_files = {n: self.storage.read_bytes(f"{SAE_DIR}/{n}") for n in SAE_FILES}
        from workers.sae import encode  # torch: imported only by shards that encode

        model = sae_from_files(sae_files, self.config.device)
        assert self._features is not None
        feats = self._features
        bs = self.config.encode_batch_size
        parts = []
        for start in range(0, feats.shape[0], bs):
            parts.append(encode(model, feats[start : start + bs], batch_size=bs))
            if self.config.encode_pause_s:
                time.sleep(self.config.encode_pause_s)
        codes = SparseCodes.concat(parts)
        counts = factor_counts(codes, model.units)
        # codes first, counts last: counts.npy existing means the shard's encoding is complete.
        self.out.write_npz("codes.npz", ids=codes.ids, values=codes.values)
        self.out.write_npy("counts.npy", counts)
        self._codes = codes
        self._features = None
        return counts

    def _load_codes(self) -> SparseCodes:
        if self._codes is None:
            z = self.out.read_npz("codes.npz")
            self._codes = SparseCodes(z["ids"], z["values"])
        return self._codes

    def codes(self) -> SparseCodes:
        """The shard's sparse codes (loaded from storage when not in memory)."""
        return self._load_codes()

    # ------------------------------------------------------------------ scores
    def _scores_done(self) -> bool:
        return self.out.exists("scores.npz")

    def compute_scores(
        self, p: np.ndarray | None, score_config: ScoreConfig
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw R and D of the shard for global frequencies p; returns their sorted copies.

        ``p`` None reads ``factors.npy`` from the storage. The sorted float64 (n,) arrays are the
        shard's part of the global rank normalization (`finalize_scores`).
        """
        if p is None:
            p = self.storage.read_npy(FACTORS_FILE)
        if self._scores_done():
            z = self.out.read_npz("scores.npz")
            raw_r, raw_d = z["R_raw"], z["D_raw"]
        else:
            raw_r, raw_d = score_codes(self._load_codes(), p, score_config)
        self._raw = (np.asarray(raw_r, np.float64), np.asarray(raw_d, np.float64))
        return np.sort(self._raw[0]), np.sort(self._raw[1])

    def finalize_scores(
        self, sorted_r: Sequence[np.ndarray], sorted_d: Sequence[np.ndarray], total: int
    ) -> None:
        """Rank-normalize R and D over all shards' sorted raw scores and store ``scores.npz``."""
        if self._scores_done():
            self._load_scores()
            return
        if self._raw is None:
            raise ValueError("compute_scores must run before finalize_scores")
        raw_r, raw_d = self._raw
        r = global_rank_normalize(raw_r, list(sorted_r), total)
        d = global_rank_normalize(raw_d, list(sorted_d), total)
        labels = self._labels_for_store()
        self.out.write_npz("scores.npz", R=r, D=d, R_raw=raw_r, D_raw=raw_d, labels=labels)
        self._scores = (r, d)

    def finalize_scores_refs(self, total: int, num_shards: int, *parts: np.ndarray) -> int:
        """`finalize_scores` with the sorted parts as flat arguments (R parts, then D parts).

        Ray resolves top-level object-ref arguments only, so the pipeline passes every shard's
        sorted refs flat. Returns the shard's row count (progress weight).
        """
        if len(parts) != 2 * num_shards:
            raise ValueError(f"expected {2 * num_shards} sorted parts, got {len(parts)}")
        self.finalize_scores(parts[:num_shards], parts[num_shards:], total)
        self.release_inputs()
        return self.spec.num_rows

    def _labels_for_store(self) -> np.ndarray:
        if self.config.label_column is None:
            return np.empty(0, dtype=np.int64)
        self.load()
        assert self._labels is not None
        return self._labels

    def _load_scores(self) -> tuple[np.ndarray, np.ndarray]:
        if self._scores is None:
            z = self.out.read_npz("scores.npz")
            self._scores = (z["R"], z["D"])
            if self.config.label_column is not None and self._labels is None:
                self._labels = z["labels"]
        return self._scores

    def scores(self) -> tuple[np.ndarray, np.ndarray]:
        """Rank-normalized R and D, float64 (n,) each (from storage when not in memory)."""
        return self._load_scores()

    def labels(self) -> np.ndarray | None:
        """int64 (n,) labels, or None without a label column."""
        if self.config.label_column is None:
            return None
        if self._labels is None:
            if self._scores_done():
                self._load_scores()
            else:
                self.load()
        return self._labels

    def release_inputs(self) -> None:
        """Drop the raw rows and features (scoring is done; selection needs neither)."""
        if self._labels is None and self.config.label_column is not None:
            self._labels = self.labels()
        self._rows = None
        self._features = None
        self._raw = None

    # ------------------------------------------------------------------ selection
    def shard_data(self, with_codes: bool = True) -> ShardData:
        """The shard's `ShardData` for selection: range, R, D, labels, codes and p."""
        r, d = self._load_scores()
        codes = self._load_codes() if with_codes else None
        p = self.storage.read_npy(FACTORS_FILE) if self.storage.exists(FACTORS_FILE) else None
        return ShardData(
            lo=self.spec.lo,
            hi=self.spec.hi,
            R=r,
            D=d,
            labels=self.labels(),
            code_ids=None if codes is None else codes.ids,
            code_values=None if codes is None else codes.values,
            p=p,
        )

    def attach_selection(self, policy: Any, with_codes: bool = True) -> int:
        """Hold a fresh `SelectionShard` with ``policy`` (passed at run time); returns n."""
        self.release_inputs()
        self._selection = SelectionShard(self.shard_data(with_codes), policy)
        return self.spec.num_rows

    def call(self, method: str, *args: Any) -> Any:
        """Forward ``method(*args)`` to the attached `SelectionShard`."""
        if self._selection is None:
            raise ValueError(f"shard {self.spec.shard_id} has no selection state attached")
        if method.startswith("_"):
            raise ValueError(f"refusing to call private method {method!r}")
        return getattr(self._selection, method)(*args)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held per structure (arrays only; Python object overhead excluded)."""
        out: dict[str, int] = {}
        if self._rows is not None:
            out["rows"] = int(self._rows.nbytes)
        if self._features is not None:
            out["features"] = int(self._features.nbytes)
        if self._codes is not None:
            out["codes"] = int(self._codes.ids.nbytes + self._codes.values.nbytes)
        if self._scores is not None:
            out["scores"] = int(self._scores[0].nbytes + self._scores[1].nbytes)
        if self._labels is not None:
            out["labels"] = int(self._labels.nbytes)
        if self._selection is not None:
            out["counters"] = int(sum(v.nbytes for v in self._selection.counters.values()))
        return out


def remote_shard_actor(
    *,
    use_gpu: bool = False,
    num_cpus: float = 0.25,
    max_restarts: int = 3,
    max_task_retries: int = 3,
    spread: bool = True,
) -> Any:
    """`ShardActor` as a Ray actor class with resource and fault-tolerance options.

    A GPU per shard when ``use_gpu`` (else ``num_cpus``, fractional by default); the actor is
    restarted up to ``max_restarts`` times after it dies and a task on it retried up to
    ``max_task_retries`` times (every method is idempotent, see the module docstring).
    ``spread`` places the shards over the nodes (``SPREAD`` scheduling).
    """
    import ray

    options: dict[str, Any] = {
        "max_restarts": max_restarts,
        "max_task_retries": max_task_retries,
    }
    if use_gpu:
        options.update(num_gpus=1, num_cpus=0)
    else:
        options.update(num_cpus=num_cpus)
    if spread:
        options["scheduling_strategy"] = "SPREAD"
    return ray.remote(**options)(ShardActor)


_PUT_BYTES = 1 << 16
"""Array arguments at least this large are put in the object store once per broadcast."""


def actor_broadcast(actors: Sequence[Any]) -> Callable[..., list[Any]]:
    """A ``broadcast(method, *args)`` over shard actors' attached selection (submit all, get)."""
    import ray

    def broadcast(method: str, *args: Any) -> list[Any]:
        # a large array argument (feedback indices, exact picks) goes to the object store once,
        # not once per actor; Ray resolves top-level refs to their values in the actor
        shared = tuple(
            ray.put(a) if isinstance(a, np.ndarray) and a.nbytes >= _PUT_BYTES else a for a in args
        )
        return ray.get([a.call.remote(method, *shared) for a in actors])

    return broadcast
