"""Datasets: IDX reader, Fashion-MNIST, digits, and the image Parquet layout."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from saelect.workers.datasets import (
    FMNIST_DIR,
    ROW_GROUP_SIZE,
    load_digits,
    load_fashion_mnist,
    load_image_parquet,
    read_idx,
    write_image_parquet,
)

from tests.optional import requires_fashion_mnist


def test_digits_parquet_round_trip(tmp_path: Path) -> None:
    train_path, test_path = write_image_parquet(tmp_path, "digits")
    assert train_path == tmp_path / "train.parquet" and test_path == tmp_path / "test.parquet"
    full = load_digits()
    tr_img, tr_lbl = load_image_parquet(train_path)
    te_img, te_lbl = load_image_parquet(test_path)
    assert tr_img.shape == (1438, 64) and te_img.shape == (359, 64)
    assert tr_img.dtype == np.uint8 and tr_lbl.dtype == np.int64
    assert set(np.unique(tr_lbl)) == set(range(10))
    # the split is a partition of the rows: every image/label pair appears exactly once
    got = np.concatenate([np.c_[tr_img, tr_lbl], np.c_[te_img, te_lbl]])
    want = np.c_[full.images.reshape(-1, 64), full.labels]
    assert np.array_equal(np.unique(got, axis=0), np.unique(want, axis=0))
    assert got.shape == want.shape
    schema = pq.read_schema(train_path)
    assert schema.field("image").type == pa.list_(pa.uint8(), 64)
    assert schema.field("label").type == pa.int64()
    # same seed, same split
    again, _ = write_image_parquet(tmp_path / "again", "digits")
    assert np.array_equal(load_image_parquet(again)[1], tr_lbl)


def test_single_file_form(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(20000, 4, 5), dtype=np.uint8)
    labels = rng.integers(0, 3, size=20000)
    path = write_image_parquet(tmp_path / "x.parquet", images, labels)
    got_img, got_lbl = load_image_parquet(path)
    assert np.array_equal(got_img, images.reshape(20000, 20))
    assert np.array_equal(got_lbl, labels)
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == 3
    assert meta.row_group(0).num_rows == ROW_GROUP_SIZE
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left
    with pytest.raises(ValueError, match="labels"):
        write_image_parquet(tmp_path / "y.parquet", images, labels[:5])
    with pytest.raises(ValueError, match="uint8"):
        write_image_parquet(tmp_path / "y.parquet", images.astype(np.float32), labels)
    with pytest.raises(ValueError, match="'cifar'"):
        write_image_parquet(tmp_path, "cifar")


def test_read_idx_plain_and_gzipped(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    raw += arr.tobytes()
    (tmp_path / "a").write_bytes(raw)
    with gzip.open(tmp_path / "a.gz", "wb") as f:
        f.write(raw)
    assert np.array_equal(read_idx(tmp_path / "a"), arr)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "bad").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="header says 24"):
        read_idx(tmp_path / "bad")


def test_missing_fashion_mnist_names_the_debian_package(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)
    with pytest.raises(ValueError, match="'valid'"):
        load_fashion_mnist(tmp_path, split="valid")


@requires_fashion_mnist
def test_fashion_mnist_reader(tmp_path: Path) -> None:
    train = load_fashion_mnist(FMNIST_DIR, "train")
    test = load_fashion_mnist(FMNIST_DIR, "test")
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == np.uint8
    assert train.labels.shape == (60000,) and test.labels.shape == (10000,)
    assert test.images.shape == (10000, 28, 28)
    assert np.array_equal(np.bincount(train.labels), np.full(10, 6000))
    # uncompressed files read the same
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        src = Path(FMNIST_DIR) / f"{name}.gz"
        if src.exists():
            with gzip.open(src, "rb") as f_in, open(tmp_path / name, "wb") as f_out:
                shutil.copyfileobj(f_in, f_out)
        else:
            shutil.copy(Path(FMNIST_DIR) / name, tmp_path / name)
    plain = load_fashion_mnist(tmp_path, "test")
    assert np.array_equal(plain.images, test.images) and np.array_equal(plain.labels, test.labels)
