"""Data regimes of the training benchmark (issue 15): redundant, long-tailed, noisy-labelled.

Each regime is built deterministically from Fashion-MNIST with a seed (``REGIME_SEED``); the test
set is always the untouched 10k Fashion-MNIST test set.

- ``fmnist-ref``: the clean reference at the regimes' scale: a class-stratified subset of
  ``base_size`` training images.
- ``fmnist-dup`` (redundancy): the same subset, but ``dup_share`` of its rows are replaced by
  near-duplicates of ``source_share`` of the rows (the sources): each duplicate is a copy of a
  source shifted by (dy, dx) in {-1, 0, 1}^2 with Gaussian pixel noise of std ``dup_noise``
  (grey levels of 255), clipped to [0, 255]. The sources keep their own row; every source gets
  the same number of copies (+-1). Rows are shuffled. ``meta["group"]`` gives each row its
  deduplicated image id, so samples are also reported against the deduplicated N.
- ``fmnist-lt`` (long tail): from the full training set, class c keeps
  floor(n_max imbalance^(-c / (C - 1))) images, n_max = ``head_size`` (exponential profile,
  class 0 the head, class 9 the tail, ``imbalance`` = n_0 / n_9 = 100; the bench uses
  n_max = 3000: 7.4k rows, 30 in the tail class). Head classes for the report: 0-2, tail: 7-9.
- ``fmnist-noisy`` (label noise): the clean subset with ``noise`` of the rows relabelled to a
  class drawn uniformly among the other C - 1 (symmetric noise; exactly round(noise N) rows are
  wrong). ``meta["noisy"]`` marks them.

The pure builders (``stratified_subset``, ``make_dup``, ``make_lt``, ``make_noisy``) take and
return numpy arrays; ``load_regime`` turns them into a ``TaskData`` with its Parquet file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

REGIME_SEED = 15
"""Seed of every regime's construction (issue 15)."""
REGIMES: tuple[str, ...] = ("fmnist-ref", "fmnist-dup", "fmnist-lt", "fmnist-noisy")
HEAD_CLASSES: tuple[int, ...] = (0, 1, 2)
"""Head classes of ``fmnist-lt`` (the three largest)."""
TAIL_CLASSES: tuple[int, ...] = (7, 8, 9)
"""Tail classes of ``fmnist-lt`` (the three smallest)."""


class Regime(NamedTuple):
    """A regime's training rows."""

    images: np.ndarray
    """uint8 (N, H, W)."""
    labels: np.ndarray
    """int64 (N,) training labels (possibly noisy)."""
    group: np.ndarray
    """int64 (N,) deduplicated image id of each row (near-duplicates share their source's)."""
    noisy: np.ndarray
    """bool (N,) rows whose label is wrong."""


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """int64 (size,) sorted row ids: each class keeps its share (largest remainder), at random.

    Raises ValueError when size exceeds the rows.
    """
    from saelect.service.policies.factor import largest_remainder

    if not 0 < size <= labels.shape[0]:
        raise ValueError(f"size={size} must be in [1, {labels.shape[0]}]")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quotas = largest_remainder(size, counts)
    out = [
        rng.choice(np.flatnonzero(labels == c), size=int(q), replace=False)
        for c, q in zip(classes, quotas, strict=True)
    ]
    return np.sort(np.concatenate(out)).astype(np.int64)


def _shift(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """uint8 (H, W) shifted by (dy, dx) with zero fill."""
    out = np.zeros_like(img)
    h, w = img.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = img[ys, xs]
    return out


def make_dup(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    dup_share: float = 0.5,
    source_share: float = 0.05,
    dup_noise: float = 8.0,
    seed: int = REGIME_SEED,
) -> Regime:
    """Replace ``dup_share`` of the rows by near-duplicates of ``source_share`` of them.

    Parameters
    ----------
    images: uint8 (N, H, W); labels: int64 (N,).
    dup_share: share of the N rows that become duplicates, in [0, 1).
    source_share: share of N used as sources (each keeps its own row), in (0, 1 - dup_share].
    dup_noise: std of the Gaussian pixel noise of a copy, in grey levels.

    Returns
    -------
    Regime with N rows (shuffled), ``group`` the source's id for copies (ids index ``images``).
    """
    n = images.shape[0]
    if not 0.0 <= dup_share < 1.0:
        raise ValueError(f"dup_share={dup_share} outside [0, 1)")
    if not 0.0 < source_share <= 1.0 - dup_share:
        raise ValueError(f"source_share={source_share} outside (0, 1 - dup_share]")
    rng = np.random.default_rng(seed)
    n_dup = round(dup_share * n)
    n_src = max(1, round(source_share * n))
    perm = rng.permutation(n)
    keep = perm[: n - n_dup]  # rows that stay themselves (sources among them)
    sources = keep[:n_src]
    src_of_dup = sources[np.arange(n_dup) % n_src]  # every source gets n_dup / n_src (+-1) copies
    shifts = rng.integers(-1, 2, size=(n_dup, 2))
    noise = rng.normal(0.0, dup_noise, size=(n_dup, *images.shape[1:]))
    copies = np.empty((n_dup, *images.shape[1:]), dtype=np.uint8)
    for i, (src, (dy, dx)) in enumerate(zip(src_of_dup, shifts, strict=True)):
        shifted = _shift(images[src], int(dy), int(dx)).astype(np.float64) + noise[i]
        copies[i] = np.clip(np.rint(shifted), 0, 255).astype(np.uint8)
    imgs = np.concatenate([images[keep], copies])
    labs = np.concatenate([labels[keep], labels[src_of_dup]]).astype(np.int64)
    group = np.concatenate([keep, src_of_dup]).astype(np.int64)
    order = rng.permutation(n)
    return Regime(imgs[order], labs[order], group[order], np.zeros(n, dtype=bool))


def lt_counts(n_max: int, num_classes: int, imbalance: float) -> np.ndarray:
    """int64 (C,) exponential class profile: floor(n_max imbalance^(-c / (C - 1))).

    Example:
        >>> lt_counts(6000, 10, 100.0).tolist()[:3], lt_counts(6000, 10, 100.0).tolist()[-1]
        ([6000, 3597, 2156], 60)
    """
    if imbalance < 1:
        raise ValueError(f"imbalance={imbalance} must be >= 1")
    c = np.arange(num_classes, dtype=np.float64)
    ratio = c / max(num_classes - 1, 1)
    return np.floor(n_max * imbalance ** (-ratio) + 1e-9).astype(np.int64)


def make_lt(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    imbalance: float = 100.0,
    head_size: int | None = None,
    seed: int = REGIME_SEED,
) -> Regime:
    """Keep an exponential class profile (class 0 the head; n_0 / n_{C-1} = imbalance).

    ``head_size``: n_0 (default: the smallest class count, 6000 for Fashion-MNIST).
    """
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    n_max = int(counts.min()) if head_size is None else int(head_size)
    if not 0 < n_max <= int(counts.min()):
        raise ValueError(f"head_size={head_size} must be in [1, {int(counts.min())}]")
    target = lt_counts(n_max, classes.shape[0], imbalance)
    rows = np.sort(
        np.concatenate(
            [
                rng.choice(np.flatnonzero(labels == c), size=int(t), replace=False)
                for c, t in zip(classes, target, strict=True)
            ]
        )
    )
    n = rows.shape[0]
    return Regime(images[rows], labels[rows].astype(np.int64), rows, np.zeros(n, dtype=bool))


def make_noisy(
    labels: np.ndarray, num_classes: int, *, noise: float = 0.3, seed: int = REGIME_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """(labels int64 (N,), noisy bool (N,)): round(noise N) rows get a uniform other class."""
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise={noise} outside [0, 1)")
    rng = np.random.default_rng(seed)
    n = labels.shape[0]
    flip = rng.permutation(n)[: round(noise * n)]
    out = labels.astype(np.int64).copy()
    out[flip] = (out[flip] + rng.integers(1, num_classes, size=flip.shape[0])) % num_classes
    noisy = np.zeros(n, dtype=bool)
    noisy[flip] = True
    return out, noisy


def build_regime(
    name: str, images: np.ndarray, labels: np.ndarray, *, base_size: int, **kwargs: Any
) -> Regime:
    """The regime ``name`` from the full training set (images uint8 (N, H, W), labels (N,))."""
    if name == "fmnist-lt":
        return make_lt(images, labels, **kwargs)
    rows = stratified_subset(labels, base_size, REGIME_SEED)
    imgs, labs = images[rows], labels[rows].astype(np.int64)
    if name == "fmnist-ref":
        return Regime(imgs, labs, rows, np.zeros(rows.shape[0], dtype=bool))
    if name == "fmnist-dup":
        reg = make_dup(imgs, labs, **kwargs)
        return reg._replace(group=rows[reg.group])
    if name == "fmnist-noisy":
        noisy_labels, noisy = make_noisy(labs, int(labels.max()) + 1, **kwargs)
        return Regime(imgs, noisy_labels, rows, noisy)
    raise ValueError(f"unknown regime {name!r}; known: {', '.join(REGIMES)}")


def load_regime(
    name: str, root: Path, *, base_size: int = 20000, pca_dim: int = 256, **kwargs: Any
) -> Any:
    """TaskData of a regime, its Parquet under ``root/<name>-<hash of the args>``.

    ``meta`` holds ``group`` (int64 (N,)), ``noisy`` (bool (N,)), ``dedup_n`` (distinct images).
    """
    from saelect.workers.datasets import load_fashion_mnist

    from benchmarks.train_data import FMNIST_DIR, TaskData, _images_to_tensor, _write_image_parquet

    train = load_fashion_mnist(FMNIST_DIR, "train")
    test = load_fashion_mnist(FMNIST_DIR, "test")
    reg = build_regime(name, train.images, train.labels, base_size=base_size, **kwargs)
    args = json.dumps({"base_size": base_size, **kwargs}, sort_keys=True)
    tag = hashlib.sha256(f"{name}|{REGIME_SEED}|{args}".encode()).hexdigest()[:8]
    path = _write_image_parquet(Path(root) / f"{name}-{tag}", reg.images, reg.labels)
    pixels = reg.images.astype(np.float32) / 255.0
    mean, std = float(pixels.mean()), float(pixels.std())
    return TaskData(
        x_train=_images_to_tensor(reg.images, mean, std),
        y_train=torch.from_numpy(reg.labels),
        x_test=_images_to_tensor(test.images, mean, std),
        y_test=torch.from_numpy(test.labels.astype(np.int64)),
        num_classes=10,
        uri=str(path.resolve()),
        feature={"kind": "pixels", "column": "image", "dim": pca_dim},
        meta={
            "group": reg.group,
            "noisy": reg.noisy,
            "dedup_n": int(np.unique(reg.group).shape[0]),
        },
    )


@torch.no_grad()
def class_accuracy(
    model: torch.nn.Module,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    num_classes: int,
    *,
    batch_size: int = 2048,
) -> np.ndarray:
    """float64 (C,) per-class top-1 test accuracy (NaN for a class absent from the test set)."""
    model.eval()
    correct = np.zeros(num_classes)
    total = np.bincount(y_test.numpy(), minlength=num_classes).astype(np.float64)
    for lo in range(0, x_test.shape[0], batch_size):
        y = y_test[lo : lo + batch_size]
        hit = (model(x_test[lo : lo + batch_size]).argmax(1) == y).numpy()
        correct += np.bincount(y.numpy()[hit], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return correct / total


def regime_diagnostics(
    served: list[np.ndarray], meta: dict[str, Any], labels: np.ndarray, epochs: int
) -> dict[str, Any]:
    """What a run's selections did in the regime: samples against the deduplicated N, share of
    mislabelled and tail-class rows served, distinct images covered."""
    n = labels.shape[0]
    all_idx = np.concatenate(served) if served else np.zeros(0, dtype=np.int64)
    out: dict[str, Any] = {}
    group = meta.get("group")
    if group is not None:
        dedup_n = int(meta["dedup_n"])
        out["dedup_n"] = dedup_n
        out["sample_fraction_dedup"] = all_idx.shape[0] / (dedup_n * epochs)
        out["distinct_images_covered"] = int(np.unique(group[all_idx]).shape[0]) / dedup_n
        dup_rows = np.bincount(group, minlength=int(group.max()) + 1)[group] > 1
        out["dup_row_share"] = float(dup_rows.mean())
        out["served_dup_share"] = float(dup_rows[all_idx].mean()) if all_idx.size else 0.0
    noisy = meta.get("noisy")
    if noisy is not None and noisy.any():
        out["noisy_share"] = float(noisy.mean())
        out["served_noisy_share"] = float(noisy[all_idx].mean()) if all_idx.size else 0.0
        out["served_noisy_share_per_epoch"] = [
            round(float(noisy[i].mean()), 4) if i.size else 0.0 for i in served
        ]
    tail = np.isin(labels, TAIL_CLASSES)
    out["tail_share"] = float(tail.mean())
    out["served_tail_share"] = float(tail[all_idx].mean()) if all_idx.size else 0.0
    out["n"] = n
    return out


def regime_metrics(
    model: torch.nn.Module, data: Any, served: list[np.ndarray], epochs: int
) -> dict[str, Any]:
    """The regime part of a run record: per-class, balanced, head and tail test accuracy of the
    trained ``model``, plus ``regime_diagnostics`` of the served indices (``epochs``: the task's
    E, the denominator of sample fractions)."""
    acc_c = class_accuracy(model, data.x_test, data.y_test, data.num_classes)
    out = {
        "class_acc": [round(float(a), 4) for a in acc_c],
        "balanced_acc": float(np.nanmean(acc_c)),
        "head_acc": float(np.nanmean(acc_c[list(HEAD_CLASSES)])),
        "tail_acc": float(np.nanmean(acc_c[list(TAIL_CLASSES)])),
    }
    out.update(regime_diagnostics(served, data.meta, data.y_train.numpy(), epochs))
    return out
