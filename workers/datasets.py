"""Image datasets for demos, tests and benchmarks, and their Parquet form.

- Fashion-MNIST from its IDX files (gzipped or not), as the Debian package
  ``dataset-fashion-mnist`` installs them in ``/usr/share/datasets/fashion-mnist``;
- scikit-learn's bundled ``load_digits`` (1797 8x8 images, offline), pixels 0..16 rescaled to
  uint8 0..255 (``round(v * 255 / 16)``);
- `write_image_parquet`: ``DIR/train.parquet`` and ``DIR/test.parquet`` with columns ``image``
  (``fixed_size_list<uint8>[H*W]``, the flattened image) and ``label`` (int64), row groups of
  8192 rows. Fashion-MNIST keeps its official 60k/10k split; digits, having none, is split
  80/20 by a permutation seeded with ``seed`` (both parts keep their original row order).

Example:
    >>> data = load_digits()
    >>> data.images.shape, data.images.dtype, data.labels.dtype
    ((1797, 8, 8), dtype('uint8'), dtype('int64'))
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import NamedTuple, overload

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "DATASETS",
    "FMNIST_DIR",
    "ROW_GROUP_SIZE",
    "ImageData",
    "digits_split",
    "image_table",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_image_parquet",
    "read_idx",
    "write_image_parquet",
]

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` puts the IDX files."""
ROW_GROUP_SIZE = 8192
"""Rows per Parquet row group (the unit shards are cut along)."""
DATASETS = ("fashion-mnist", "digits")
"""Names `write_image_parquet` and `load_dataset` accept."""

_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class ImageData(NamedTuple):
    """Images and labels of one split."""

    images: np.ndarray
    """uint8 (N, H, W)."""
    labels: np.ndarray
    """int64 (N,)."""


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """An IDX file (gzipped when the name ends in ``.gz``) as an array of its shape.

    Raises ValueError for a malformed header or a size mismatch.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (header {data[:4]!r})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[data[2]]
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(f"{path}: {len(data) - offset} data bytes, header says {expected}")
    return (
        np.frombuffer(data, dtype=dtype, offset=offset)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def _find(directory: Path, name: str) -> Path:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}(.gz) not found in {directory}: install the Debian package "
        "dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass its directory"
    )


def load_fashion_mnist(
    directory: str | os.PathLike[str] = FMNIST_DIR, split: str = "train"
) -> ImageData:
    """Fashion-MNIST ``split`` (``train``: 60000, ``test``: 10000 images of 28x28).

    Raises
    ------
    FileNotFoundError: the IDX files are missing (names the Debian package).
    ValueError: unknown split or malformed files.
    """
    if split not in _FMNIST_FILES:
        raise ValueError(f"split must be one of {sorted(_FMNIST_FILES)}, got {split!r}")
    img_name, lbl_name = _FMNIST_FILES[split]
    images = read_idx(_find(Path(directory), img_name))
    labels = read_idx(_find(Path(directory), lbl_name)).astype(np.int64)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{img_name}: expected uint8 (N, H, W), got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{lbl_name}: {labels.shape[0]} labels for {images.shape[0]} images")
    return ImageData(images, labels)


def load_digits() -> ImageData:
    """scikit-learn's digits: uint8 (1797, 8, 8) with 0..16 rescaled to 0..255, int64 labels."""
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0))
    return ImageData(images.astype(np.uint8), np.asarray(bunch.target, dtype=np.int64))


def digits_split(seed: int = 0, test_fraction: float = 0.2) -> tuple[ImageData, ImageData]:
    """Digits cut into (train, test) by a permutation seeded with ``seed``.

    ``round(test_fraction * N)`` rows go to test; each part keeps the original row order.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    data = load_digits()
    n = data.labels.shape[0]
    perm = np.random.default_rng(seed).permutation(n)
    n_test = round(test_fraction * n)
    test_rows, train_rows = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return (
        ImageData(data.images[train_rows], data.labels[train_rows]),
        ImageData(data.images[test_rows], data.labels[test_rows]),
    )


def load_dataset(
    name: str, *, directory: str | os.PathLike[str] = FMNIST_DIR, seed: int = 0
) -> tuple[ImageData, ImageData]:
    """(train, test) of ``fashion-mnist`` or ``digits`` (seeded 80/20 split)."""
    if name == "fashion-mnist":
        return load_fashion_mnist(directory, "train"), load_fashion_mnist(directory, "test")
    if name == "digits":
        return digits_split(seed)
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


def image_table(images: np.ndarray, labels: np.ndarray) -> pa.Table:
    """Arrow table: ``image`` fixed_size_list<uint8>[H*W] (flattened rows), ``label`` int64.

    Raises ValueError for non-uint8 images or a label count that differs from the image count.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim < 2:
        raise ValueError(f"images must be uint8 (N, ...), got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
    flat_NP = np.ascontiguousarray(images.reshape(images.shape[0], -1))
    values = pa.array(flat_NP.reshape(-1), type=pa.uint8())
    return pa.table(
        {
            "image": pa.FixedSizeListArray.from_arrays(values, flat_NP.shape[1]),
            "label": pa.array(labels.astype(np.int64), type=pa.int64()),
        }
    )


def _write_table(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE)
    os.replace(tmp, path)  # atomic: a half-written file never has the final name
    return path


@overload
def write_image_parquet(
    out: str | os.PathLike[str], name: str, labels: None = None, *, seed: int = 0
) -> tuple[Path, Path]: ...
@overload
def write_image_parquet(
    out: str | os.PathLike[str], name: np.ndarray, labels: np.ndarray, *, seed: int = 0
) -> Path: ...
def write_image_parquet(
    out: str | os.PathLike[str],
    name: str | np.ndarray,
    labels: np.ndarray | None = None,
    *,
    seed: int = 0,
) -> tuple[Path, Path] | Path:
    """Write a dataset as Parquet (columns ``image``, ``label``; row groups of 8192).

    Two forms:

    - ``write_image_parquet(out_dir, "fashion-mnist" | "digits")`` writes
      ``out_dir/train.parquet`` and ``out_dir/test.parquet`` and returns their paths;
    - ``write_image_parquet(path, images, labels)`` writes one file of uint8 images (N, ...)
      and int64 labels (N,) and returns its path.

    Files are written under a temporary name, then renamed.

    Raises FileNotFoundError (Fashion-MNIST missing), ValueError (unknown name, bad arrays).
    """
    if isinstance(name, str):
        if labels is not None:
            raise ValueError("labels are only given with an images array, not a dataset name")
        train, test = load_dataset(name, seed=seed)
        out_dir = Path(out)
        return (
            _write_table(image_table(train.images, train.labels), out_dir / "train.parquet"),
            _write_table(image_table(test.images, test.labels), out_dir / "test.parquet"),
        )
    if labels is None:
        raise ValueError("write_image_parquet(path, images, labels) needs labels")
    return _write_table(image_table(name, labels), Path(out))


def load_image_parquet(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H*W), labels int64 (N,)) from a file `write_image_parquet` wrote."""
    table = pq.read_table(path, columns=["image", "label"])
    col = table.column("image").combine_chunks()
    if not pa.types.is_fixed_size_list(col.type):
        raise ValueError(f"{path}: column 'image' has type {col.type}, not a fixed_size_list")
    n, d = len(col), col.type.list_size
    images = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.uint8)
    labels = np.asarray(table.column("label").to_numpy(), dtype=np.int64)
    return images.reshape(n, d), labels
