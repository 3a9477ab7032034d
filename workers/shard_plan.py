"""Cut a Parquet dataset into S contiguous global index ranges along row groups.

A dataset is one Parquet file or a directory of them (searched recursively, sorted by path, files
whose name starts with ``_`` or ``.`` skipped), on a local path or any pyarrow filesystem URI
(``s3://bucket/prefix``, ``gs://...``, ``file:///...``). Global index ``i`` is the ``i``-th row of
the concatenation of all files in that order, so every shard count sees the same numbering.

Shard boundaries fall on row-group boundaries whenever the dataset has at least S row groups; with
fewer row groups than shards (a small dataset written as one row group) the boundaries fall inside
row groups and a shard reads its row groups and slices them. Either way the shards are contiguous,
cover ``[0, N)`` exactly once, and are as even as the row groups allow.

Example
-------
>>> plan = plan_shards("/data/fmnist/train.parquet", num_shards=4)   # doctest: +SKIP
>>> table = read_shard(plan.shards[0], ["image", "label"])           # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from saelect.workers.splitmix import GOLDEN, mix64

__all__ = [
    "ShardPiece",
    "ShardPlan",
    "ShardSpec",
    "check_allowed",
    "default_num_shards",
    "plan_shards",
    "read_shard",
    "row_keys",
]


@dataclass(frozen=True)
class ShardPiece:
    """A run of consecutive row groups of one file, sliced to the rows a shard owns."""

    path: str
    """Path of the Parquet file inside the dataset's filesystem."""
    row_groups: tuple[int, ...]
    """Consecutive row-group ids of that file, in order."""
    offset: int
    """First row taken, counted from the start of the first listed row group."""
    length: int
    """Number of rows taken from the concatenation of the listed row groups."""

    def __post_init__(self) -> None:
        if not self.row_groups:
            raise ValueError(f"ShardPiece.row_groups must not be empty for {self.path!r}")
        if self.offset < 0:
            raise ValueError(f"ShardPiece.offset must be >= 0, got {self.offset}")
        if self.length < 1:
            raise ValueError(f"ShardPiece.length must be >= 1, got {self.length}")


@dataclass(frozen=True)
class ShardSpec:
    """One shard: the global rows ``[lo, hi)`` and where they are stored."""

    shard_id: int
    """Position of the shard in the plan, 0..S-1."""
    lo: int
    """First global index of the shard."""
    hi: int
    """One past the last global index of the shard."""
    uri: str
    """The dataset URI the plan was made for (resolves the filesystem on any node)."""
    pieces: tuple[ShardPiece, ...]
    """The file pieces that hold rows ``lo..hi-1``, in global order."""

    def __post_init__(self) -> None:
        if self.shard_id < 0:
            raise ValueError(f"ShardSpec.shard_id must be >= 0, got {self.shard_id}")
        if not 0 <= self.lo < self.hi:
            raise ValueError(f"ShardSpec needs 0 <= lo < hi, got lo={self.lo}, hi={self.hi}")
        if sum(p.length for p in self.pieces) != self.hi - self.lo:
            raise ValueError(
                f"ShardSpec pieces hold {sum(p.length for p in self.pieces)} rows, "
                f"expected hi - lo = {self.hi - self.lo}"
            )

    @property
    def num_rows(self) -> int:
        """Rows in the shard, ``hi - lo``."""
        return self.hi - self.lo


@dataclass(frozen=True)
class ShardPlan:
    """The dataset's files and its cut into shards."""

    uri: str
    """The dataset URI (a local path is made absolute)."""
    files: tuple[str, ...]
    """Parquet files in global order (paths inside the filesystem)."""
    row_group_rows: tuple[tuple[int, ...], ...]
    """Per file, the row count of each row group."""
    columns: tuple[str, ...]
    """Column names of the dataset (the first file's schema)."""
    shards: tuple[ShardSpec, ...]
    """The shards, contiguous and in order; their ranges cover ``[0, num_rows)``."""

    @property
    def num_rows(self) -> int:
        """Total rows N of the dataset."""
        return sum(sum(r) for r in self.row_group_rows)

    @property
    def num_shards(self) -> int:
        """Number of shards S."""
        return len(self.shards)

    def boundaries(self) -> list[int]:
        """``[lo_0, lo_1, ..., lo_{S-1}, N]``: the S + 1 shard boundaries."""
        return [s.lo for s in self.shards] + [self.shards[-1].hi]


def default_num_shards(num_cpus: float, num_gpus: float = 0.0, *, per_device: int = 2) -> int:
    """A few shards per available GPU, or per CPU when the cluster has no GPU.

    Parameters
    ----------
    num_cpus, num_gpus: the cluster's resources (``ray.cluster_resources()``).
    per_device: shards per device.

    Returns
    -------
    S >= 1.
    """
    if per_device < 1:
        raise ValueError(f"per_device must be >= 1, got {per_device}")
    devices = int(num_gpus) if num_gpus >= 1 else max(int(num_cpus), 1)
    return max(devices * per_device, 1)


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it for a local path or a filesystem URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise ValueError(f"cannot open dataset URI {uri!r}: {exc}") from exc
    return fs, path


def _normalize_root(root: str) -> str:
    if "://" not in root:
        return os.path.realpath(root)
    scheme, rest = root.split("://", 1)
    return f"{scheme.lower()}://{rest.rstrip('/')}"


def check_allowed(uri: str, allowed_roots: Sequence[str] | None) -> None:
    """Raise ValueError unless ``uri`` lies under one of ``allowed_roots`` (None allows all).

    Local paths are compared after resolving symlinks and ``..``; URIs by scheme and path prefix.
    """
    if allowed_roots is None:
        return
    target = _normalize_root(uri)
    for root in allowed_roots:
        base = _normalize_root(root)
        if target == base or target.startswith(base.rstrip("/") + "/"):
            return
    raise ValueError(f"dataset URI {uri!r} is outside the allowed roots {list(allowed_roots)!r}")


def _list_files(fs: pafs.FileSystem, path: str, uri: str) -> list[str]:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ValueError(f"dataset path does not exist: {uri!r}")
    if info.type == pafs.FileType.File:
        return [path]
    selector = pafs.FileSelector(path, recursive=True)
    files = []
    for entry in fs.get_file_info(selector):
        if entry.type != pafs.FileType.File:
            continue
        rel_parts = entry.path[len(path) :].strip("/").split("/")
        if any(part.startswith(("_", ".")) for part in rel_parts):
            continue
        files.append(entry.path)
    if not files:
        raise ValueError(f"dataset directory {uri!r} contains no files")
    return sorted(files)


def _cut(total: int, num_shards: int, group_ends: np.ndarray) -> list[int]:
    """S + 1 boundaries in [0, total]; on row-group ends when there are enough groups."""
    targets = [round(k * total / num_shards) for k in range(num_shards + 1)]
    if len(group_ends) < num_shards:
        return targets
    # Snap each inner target to the nearest row-group end that keeps every shard non-empty.
    ends = [int(e) for e in group_ends]
    bounds = [0]
    prev = -1  # index in `ends` of the previous boundary
    for k in range(1, num_shards):
        last_allowed = len(ends) - 1 - (num_shards - k)
        allowed = range(prev + 1, last_allowed + 1)
        prev = min(allowed, key=lambda j: (abs(ends[j] - targets[k]), j))
        bounds.append(ends[prev])
    bounds.append(total)
    return bounds


def plan_shards(
    uri: str,
    num_shards: int | None = None,
    *,
    columns: Sequence[str] = (),
    allowed_roots: Sequence[str] | None = None,
    num_cpus: float | None = None,
    num_gpus: float = 0.0,
) -> ShardPlan:
    """Plan S contiguous shards of a Parquet dataset.

    Parameters
    ----------
    uri: a Parquet file or directory; local path or pyarrow filesystem URI.
    num_shards: S; None picks `default_num_shards` of the given resources (``num_cpus`` defaults
        to this machine's CPU count). S is capped at N.
    columns: columns that must exist (e.g. the feature and label columns).
    allowed_roots: when given, ``uri`` must lie under one of them.
    num_cpus, num_gpus: the cluster's resources, for the default S.

    Returns
    -------
    The `ShardPlan`.

    Raises
    ------
    ValueError: URI outside the allowed roots, missing path, non-Parquet file, files whose
        columns differ, an empty dataset, a missing column, or ``num_shards < 1``.
    """
    if num_shards is not None and num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    check_allowed(uri, allowed_roots)
    fs, path = _resolve(uri)
    files = _list_files(fs, path, uri)
    row_group_rows: list[tuple[int, ...]] = []
    names: tuple[str, ...] | None = None
    for f in files:
        try:
            with fs.open_input_file(f) as handle:
                meta = pq.ParquetFile(handle).metadata
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"not a Parquet file: {f!r} ({exc})") from exc
        file_names = tuple(meta.schema.to_arrow_schema().names)
        if names is None:
            names = file_names
        elif set(file_names) != set(names):
            raise ValueError(f"Parquet file {f!r} has columns {file_names}, expected {names}")
        row_group_rows.append(tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups)))
    if names is None:  # pragma: no cover - _list_files raises for a dataset without files
        raise ValueError(f"dataset {uri!r} contains no files")
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"column(s) {missing} not in dataset {uri!r}; it has {list(names)}")
    total = sum(sum(r) for r in row_group_rows)
    if total == 0:
        raise ValueError(f"dataset {uri!r} is empty (0 rows)")
    if num_shards is None:
        cpus = float(os.cpu_count() or 1) if num_cpus is None else num_cpus
        num_shards = default_num_shards(cpus, num_gpus)
    num_shards = min(num_shards, total)

    # Global row ranges of every non-empty row group: (file index, group id, start, end).
    groups: list[tuple[int, int, int, int]] = []
    start = 0
    for fi, sizes in enumerate(row_group_rows):
        for g, n in enumerate(sizes):
            if n > 0:
                groups.append((fi, g, start, start + n))
                start += n
    bounds = _cut(total, num_shards, np.array([g[3] for g in groups]))

    display_uri = uri if "://" in uri else path
    shards = []
    for s in range(num_shards):
        lo, hi = bounds[s], bounds[s + 1]
        pieces: list[ShardPiece] = []
        for fi, g, g_lo, g_hi in groups:
            a, b = max(lo, g_lo), min(hi, g_hi)
            if a >= b:
                continue
            last = pieces[-1] if pieces else None
            if last is not None and last.path == files[fi] and last.row_groups[-1] == g - 1:
                # Extend the run of consecutive row groups of the same file.
                pieces[-1] = ShardPiece(
                    last.path, (*last.row_groups, g), last.offset, last.length + (b - a)
                )
            else:
                pieces.append(ShardPiece(files[fi], (g,), a - g_lo, b - a))
        shards.append(ShardSpec(s, lo, hi, display_uri, tuple(pieces)))
    return ShardPlan(display_uri, tuple(files), tuple(row_group_rows), names, tuple(shards))


def read_shard(spec: ShardSpec, columns: Sequence[str]) -> pa.Table:
    """Read the rows ``[spec.lo, spec.hi)`` of ``columns`` as one table (row order preserved).

    Raises ValueError naming a missing column.
    """
    fs, _ = _resolve(spec.uri)
    parts = []
    for piece in spec.pieces:
        with fs.open_input_file(piece.path) as handle:
            pf = pq.ParquetFile(handle)
            names = pf.schema_arrow.names
            missing = [c for c in columns if c not in names]
            if missing:
                raise ValueError(f"column(s) {missing} not in {piece.path!r}; it has {names}")
            table = pf.read_row_groups(list(piece.row_groups), columns=list(columns))
        parts.append(table.slice(piece.offset, piece.length))
    out = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    return out.combine_chunks()


def row_keys(seed: int, lo: int, hi: int) -> np.ndarray:
    """Counter-based uint64 keys of the global rows ``[lo, hi)``: splitmix64(seed, index).

    The k rows with the smallest keys are a seeded uniform sample of the dataset that does not
    depend on how it is sharded (each shard computes its own keys). Shape (hi - lo,).
    """
    z = np.arange(lo, hi, dtype=np.uint64)
    offset = np.uint64(((seed + 1) * GOLDEN) % 2**64)
    with np.errstate(over="ignore"):
        z *= np.uint64(0xD1B54A32D192ED03)
        z += offset
        return mix64(z)
