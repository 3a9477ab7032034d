"""Feature specs, the extractor protocol, and Arrow column -> numpy conversion.

An extractor maps a dataset column to float32 feature vectors h_i in R^d (docs/architecture.md,
The method 1). It is fitted once on a global sample (`Extractor.fit`), its state shipped to every
shard (`Extractor.state_dict`, numpy arrays only, so it stores as ``.npz``), and applied there in
batches (`Extractor.transform`). Every shard therefore maps a row to the same vector.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
from saelect.workers.progress import Progress, batch_ranges

__all__ = [
    "DEFAULT_PIXELS_DIM",
    "KINDS",
    "Extractor",
    "FeatureSpec",
    "as_float_matrix",
    "column_to_numpy",
    "dim_from_state",
    "dim_state",
    "map_batches",
    "require_fitted",
]

KINDS = ("column", "pixels", "selfsup", "text", "module", "image_model")
"""Extractor kinds (the registry `workers.features.EXTRACTORS` has one class per kind)."""
DEFAULT_PIXELS_DIM = 256
"""PCA output dim of the ``pixels`` extractor when the spec gives none."""
IMAGE_LIBRARIES = ("timm", "torchvision", "transformers")
"""Where an ``image_model`` backbone comes from (``FeatureSpec.library``)."""


@dataclass(frozen=True)
class FeatureSpec:
    """How a dataset column becomes feature vectors.

    Example: ``FeatureSpec("pixels", "image", dim=256)``.
    """

    kind: str
    """Extractor: ``column`` (vectors as stored), ``pixels`` (standardize + PCA), ``selfsup``
    (a small conv encoder trained contrastively on the fit sample), ``text`` (a
    sentence-transformers model; the packaged MiniLM-L6 by default), ``module`` (a user's torch
    module) or ``image_model`` (a timm, torchvision or transformers backbone on encoded
    images)."""
    column: str
    """Source column in the Parquet data."""
    dim: int | None = None
    """Output dim. ``pixels``: PCA components (default 256, capped at the input dim and the fit
    sample size); ``selfsup``: encoder features (default 128); ``column``/``module``/``text``: if
    given, the output dim must equal it."""
    module: str | None = None
    """``module`` only: ``"pkg.mod:factory"``, a callable returning an ``nn.Module``."""
    batch_size: int = 1024
    """Rows per transform batch."""
    image_shape: tuple[int, int, int] | None = None
    """``selfsup`` only: (C, H, W) of the images, each row being the flattened channel-first
    array; None infers (1, s, s) from s^2 values per row or (3, s, s) from 3 s^2."""
    model: str | None = None
    """``image_model``: the backbone, by its library's name (``resnet50``) or, for
    ``transformers``, a local model directory or a name in the local Hugging Face cache.
    ``text``: a sentence-transformers model name (local cache) or local directory; None: the
    packaged MiniLM-L6."""
    weights: str | None = None
    """``image_model`` (timm, torchvision): a local weights file (``.safetensors``, ``.pth``,
    ``.pt``, ``.bin``); None: the library's pretrained weights from its local cache."""
    library: str | None = None
    """``image_model``: one of ``IMAGE_LIBRARIES`` (default ``timm``)."""
    image_size: int | None = None
    """``image_model``: images are resized to image_size x image_size (default 224)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"feature kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.column, str) or not self.column:
            raise ValueError(f"feature column must be a non-empty string, got {self.column!r}")
        if self.dim is not None and (isinstance(self.dim, bool) or int(self.dim) < 1):
            raise ValueError(f"feature dim must be None or >= 1, got {self.dim!r}")
        if isinstance(self.batch_size, bool) or int(self.batch_size) < 1:
            raise ValueError(f"feature batch_size must be >= 1, got {self.batch_size!r}")
        if self.image_shape is not None:
            shape = self.image_shape
            if (
                not isinstance(shape, tuple | list)
                or len(shape) != 3
                or not all(
                    isinstance(v, int | np.integer) and not isinstance(v, bool) for v in shape
                )
                or min(shape) < 1
            ):
                raise ValueError(
                    f"image_shape must be None or 3 ints >= 1 (C, H, W), got {shape!r}"
                )
            if self.kind != "selfsup":
                raise ValueError(f"image_shape applies to kind 'selfsup' only, not {self.kind!r}")
            object.__setattr__(self, "image_shape", tuple(int(v) for v in shape))  # list -> tuple
        self._check_model_fields()
        if self.kind == "module":
            if not self.module or ":" not in self.module:
                raise ValueError(
                    f"kind 'module' needs module='pkg.mod:factory', got {self.module!r}"
                )
            mod, _, attr = self.module.partition(":")
            if not mod or not attr:
                raise ValueError(f"module must look like 'pkg.mod:factory', got {self.module!r}")

    def _check_model_fields(self) -> None:
        """``model``, ``weights``, ``library``, ``image_size``: only where they apply."""
        given = {
            k: getattr(self, k)
            for k in ("model", "weights", "library", "image_size")
            if getattr(self, k) is not None
        }
        allowed = {"image_model": set(given), "text": {"model"}}.get(self.kind, set())
        extra = sorted(set(given) - allowed)
        if extra:
            raise ValueError(f"feature field(s) {extra} do not apply to kind {self.kind!r}")
        for key in ("model", "weights"):
            value = given.get(key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"feature {key} must be a non-empty string, got {value!r}")
        if self.kind != "image_model":
            return
        if not self.model:
            raise ValueError("kind 'image_model' needs model (a backbone name or directory)")
        if self.library is not None and self.library not in IMAGE_LIBRARIES:
            raise ValueError(f"library must be one of {IMAGE_LIBRARIES}, got {self.library!r}")
        if self.library == "transformers" and self.weights is not None:
            raise ValueError("library 'transformers' reads its weights from the model directory")
        size = self.image_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 8):
            raise ValueError(f"image_size must be None or an int >= 8, got {size!r}")


@runtime_checkable
class Extractor(Protocol):
    """What every extractor offers (see `workers.features.make_extractor`)."""

    spec: FeatureSpec
    out_dim: int | None  # known after fit() or load_state_dict()

    def fit(self, sample: Any) -> None:
        """Fit on a sample (pixels: standardization + PCA); others: check input, set out_dim."""
        ...

    def transform(self, values: Any, *, progress: bool = True) -> np.ndarray:
        """float32 (n, out_dim) features of ``values`` (ndarray (n, ...) or list[str])."""
        ...

    def state_dict(self) -> dict[str, np.ndarray]:
        """The fitted state as numpy arrays (storable with ``np.savez``)."""
        ...

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore a state from `state_dict` (e.g. on a shard)."""
        ...


def require_fitted(out_dim: int | None, kind: str) -> int:
    """``out_dim`` of a fitted extractor; ValueError naming ``kind`` when it is not fitted."""
    if out_dim is None:
        raise ValueError(f"{kind} extractor is not fitted: call fit() or load_state_dict()")
    return out_dim


def dim_state(out_dim: int | None, kind: str) -> dict[str, np.ndarray]:
    """``{"out_dim": int64 scalar}``: the state of an extractor whose only fitted value is d."""
    return {"out_dim": np.asarray(require_fitted(out_dim, kind), dtype=np.int64)}


def dim_from_state(state: dict[str, np.ndarray]) -> int:
    """The ``out_dim`` of a `dim_state`; ValueError when it is < 1."""
    dim = int(np.asarray(state["out_dim"]))
    if dim < 1:
        raise ValueError(f"extractor state has out_dim={dim}, must be >= 1")
    return dim


def _first_bad_row(vals_ND: np.ndarray) -> tuple[int, float]:
    bad = ~np.isfinite(vals_ND)
    row = int(np.flatnonzero(bad.any(axis=1))[0])
    return row, float(vals_ND[row][bad[row]][0])


def column_to_numpy(table: pa.Table, column: str) -> np.ndarray:
    """A list-typed (or numeric) Arrow column as a float32 matrix (n, d).

    Accepts ``list``, ``large_list`` and ``fixed_size_list`` of numbers (one vector per row),
    or a plain numeric column (d = 1).

    Raises
    ------
    ValueError (naming the column) when the column is missing, has nulls, rows of different
    lengths (ragged), empty rows, a non-numeric type, or NaN/inf values.

    Example:
        >>> t = pa.table({"v": [[1, 2], [3, 4]]})
        >>> column_to_numpy(t, "v").tolist()
        [[1.0, 2.0], [3.0, 4.0]]
    """
    if column not in table.column_names:
        raise ValueError(f"column {column!r} not in table columns {table.column_names}")
    chunked = table.column(column)
    n = len(chunked)
    if chunked.null_count:
        raise ValueError(f"column {column!r} has {chunked.null_count} null rows")
    arr = chunked.combine_chunks() if chunked.num_chunks != 1 else chunked.chunk(0)
    typ = arr.type
    if pa.types.is_fixed_size_list(typ):
        d = typ.list_size
        flat = arr.flatten()
    elif pa.types.is_list(typ) or pa.types.is_large_list(typ):
        offsets = np.asarray(arr.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
        lengths = np.diff(offsets)
        if n and (lengths != lengths[0]).any():
            row = int(np.flatnonzero(lengths != lengths[0])[0])
            raise ValueError(
                f"column {column!r} is ragged: row 0 has {lengths[0]} values, "
                f"row {row} has {lengths[row]}"
            )
        d = int(lengths[0]) if n else 0
        flat = arr.flatten()
    elif pa.types.is_integer(typ) or pa.types.is_floating(typ):
        d = 1
        flat = arr
    else:
        raise ValueError(f"column {column!r} has type {typ}; expected a list of numbers")
    if n and d == 0:
        raise ValueError(f"column {column!r} has empty rows")
    if not (pa.types.is_integer(flat.type) or pa.types.is_floating(flat.type)):
        raise ValueError(f"column {column!r} holds {flat.type} values; expected numbers")
    if flat.null_count:
        raise ValueError(f"column {column!r} has {flat.null_count} null values inside its rows")
    vals_ND = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, d)
    if vals_ND.size and not np.isfinite(vals_ND).all():
        row, value = _first_bad_row(vals_ND)
        raise ValueError(f"column {column!r} has a non-finite value {value} in row {row}")
    return vals_ND


def as_float_matrix(values: Any, what: str = "values") -> np.ndarray:
    """float32 (n, d) view of numeric input (n, ...) flattened per row.

    Raises ValueError for non-numeric input, fewer than 2 dims, or NaN/inf values.
    """
    arr = np.asarray(values)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)
    ):
        raise ValueError(f"{what} must be numeric, got dtype {arr.dtype}")
    if arr.ndim < 2:
        raise ValueError(f"{what} must have shape (n, ...) with >= 2 dims, got {arr.shape}")
    x_ND = np.asarray(arr.reshape(arr.shape[0], -1), dtype=np.float32)
    if x_ND.size and not np.isfinite(x_ND).all():
        row, value = _first_bad_row(x_ND)
        raise ValueError(f"{what} has a non-finite value {value} in row {row}")
    return x_ND


def map_batches(
    fn: Callable[[Any], np.ndarray],
    values: Sequence[Any] | np.ndarray,
    out_dim: int,
    batch_size: int,
    *,
    progress: bool = True,
    desc: str = "features",
) -> np.ndarray:
    """Apply ``fn`` to consecutive batches of ``values``; float32 (n, out_dim).

    Raises ValueError when ``fn`` returns a batch of the wrong shape.
    """
    n = len(values)
    out_ND = np.empty((n, out_dim), dtype=np.float32)
    # a bar only for transforms long enough to be worth one
    with Progress(n, desc=desc, progress=progress and n > 4 * batch_size, unit="rows") as bar:
        for start, stop in batch_ranges(n, batch_size):
            part = np.asarray(fn(values[start:stop]), dtype=np.float32)
            if part.shape != (stop - start, out_dim):
                raise ValueError(
                    f"{desc}: batch [{start}, {stop}) gave shape {part.shape}, "
                    f"expected {(stop - start, out_dim)}"
                )
            out_ND[start:stop] = part
            bar.update(stop - start)
    return out_ND
