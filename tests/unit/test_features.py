"""Feature specs, Arrow column conversion, and the column/pixels/selfsup/text/module extractors."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from saelect.workers.features import (
    EXTRACTORS,
    KINDS,
    ColumnExtractor,
    FeatureSpec,
    ModuleExtractor,
    PixelsExtractor,
    SelfSupExtractor,
    TextExtractor,
    column_to_numpy,
    make_extractor,
)

from tests.optional import requires_text_extra

TINY_MODULE = "tests.unit.test_features:tiny_module"


def tiny_module() -> torch.nn.Module:
    """A fixed linear map R^4 -> R^3 (the factory the module extractor imports by path)."""
    lin = torch.nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(12, dtype=torch.float32).reshape(3, 4) / 10)
        lin.bias.copy_(torch.tensor([1.0, -1.0, 0.5]))
    return lin


class _NaNFeatures(torch.nn.Module):
    def forward(self, x_B4: torch.Tensor) -> torch.Tensor:
        return torch.full((x_B4.shape[0], 3), float("nan"))


def nan_module() -> torch.nn.Module:
    """A module whose features are NaN (the extractor must refuse them)."""
    return _NaNFeatures()


def _npz_round_trip(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    buf = io.BytesIO()
    np.savez(buf, **state)
    buf.seek(0)
    with np.load(buf) as z:
        return {k: z[k] for k in z.files}


# ---------------------------------------------------------------------- spec
def test_spec_validation_and_registry() -> None:
    assert set(EXTRACTORS) == set(KINDS)
    assert isinstance(make_extractor(FeatureSpec("pixels", "image")), PixelsExtractor)
    assert isinstance(make_extractor(FeatureSpec("column", "emb")), ColumnExtractor)
    assert isinstance(make_extractor(FeatureSpec("text", "t")), TextExtractor)
    assert isinstance(
        make_extractor(FeatureSpec("module", "x", module=TINY_MODULE)), ModuleExtractor
    )
    with pytest.raises(ValueError, match="'resnet'"):
        FeatureSpec("resnet", "image")
    with pytest.raises(ValueError, match="dim"):
        FeatureSpec("pixels", "image", dim=0)
    with pytest.raises(ValueError, match="batch_size"):
        FeatureSpec("pixels", "image", batch_size=0)
    with pytest.raises(ValueError, match="module"):
        FeatureSpec("module", "image")
    with pytest.raises(ValueError, match="column"):
        FeatureSpec("pixels", "")


# ---------------------------------------------------------------------- column_to_numpy
@pytest.mark.parametrize(
    "typ", [pa.list_(pa.float32()), pa.large_list(pa.int64()), pa.list_(pa.uint8(), 3)]
)
def test_column_to_numpy_list_types(typ: pa.DataType) -> None:
    rows = [[1, 2, 3], [4, 5, 6]]
    table = pa.table({"v": pa.array(rows, type=typ)})
    out = column_to_numpy(table, "v")
    assert out.dtype == np.float32 and out.tolist() == rows


def test_column_to_numpy_multi_chunk() -> None:
    chunks = pa.chunked_array([pa.array([[1.0, 2.0]]), pa.array([[3.0, 4.0], [5.0, 6.0]])])
    out = column_to_numpy(pa.table({"v": chunks}), "v")
    assert out.tolist() == [[1, 2], [3, 4], [5, 6]]


def test_column_to_numpy_rejects_bad_columns() -> None:
    table = pa.table(
        {
            "ragged": [[1.0, 2.0], [3.0]],
            "nan": [[1.0, float("nan")], [3.0, 4.0]],
            "inf": [[1.0, 2.0], [float("inf"), 4.0]],
            "nulls": pa.array([[1.0, 2.0], None]),
            "inner_null": pa.array([[1.0, None], [1.0, 2.0]]),
            "text": ["a", "b"],
        }
    )
    with pytest.raises(ValueError, match="'missing'"):
        column_to_numpy(table, "missing")
    with pytest.raises(ValueError, match="'ragged' is ragged"):
        column_to_numpy(table, "ragged")
    with pytest.raises(ValueError, match="'nan' has a non-finite value nan in row 0"):
        column_to_numpy(table, "nan")
    with pytest.raises(ValueError, match="'inf' has a non-finite value inf in row 1"):
        column_to_numpy(table, "inf")
    with pytest.raises(ValueError, match="'nulls' has 1 null"):
        column_to_numpy(table, "nulls")
    with pytest.raises(ValueError, match="'inner_null'"):
        column_to_numpy(table, "inner_null")
    with pytest.raises(ValueError, match="'text'"):
        column_to_numpy(table, "text")


# ---------------------------------------------------------------------- column
def test_column_extractor_is_identity_and_checks_dim() -> None:
    x = np.random.default_rng(0).normal(size=(20, 5)).astype(np.float32)
    ex = make_extractor(FeatureSpec("column", "emb"))
    ex.fit(x[:7])
    assert ex.out_dim == 5
    assert np.array_equal(ex.transform(x), x)
    again = make_extractor(FeatureSpec("column", "emb"))
    again.load_state_dict(_npz_round_trip(ex.state_dict()))
    assert again.out_dim == 5 and np.array_equal(again.transform(x), x)
    with pytest.raises(ValueError, match="dim 4"):
        ex.transform(x[:, :4])
    with pytest.raises(ValueError, match="spec says 6"):
        make_extractor(FeatureSpec("column", "emb", dim=6)).fit(x)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="'emb' has a non-finite value nan in row 3"):
        ex.transform(bad)


# ---------------------------------------------------------------------- pixels
def test_pixels_pca_dim_and_fit_once_transform_anywhere(digits_features: np.ndarray) -> None:
    images = digits_features.astype(np.uint8).reshape(-1, 8, 8)  # (n, 8, 8) works like (n, 64)
    spec = FeatureSpec("pixels", "image", dim=20, batch_size=256)
    ex = make_extractor(spec)
    ex.fit(images[:1000])
    assert ex.out_dim == 20
    whole = ex.transform(images)
    assert whole.shape == (1797, 20) and whole.dtype == np.float32
    parts = np.concatenate([ex.transform(images[:333]), ex.transform(images[333:])])
    assert np.array_equal(parts, whole)
    shipped = make_extractor(spec)
    shipped.load_state_dict(_npz_round_trip(ex.state_dict()))
    assert np.array_equal(shipped.transform(images[500:900]), whole[500:900])
    # refitting on the same sample gives the same axes (signs fixed)
    refit = make_extractor(spec)
    refit.fit(images[:1000])
    assert np.array_equal(refit.transform(images), whole)
    # PCA: uncorrelated components with decreasing variance on the fit sample
    fit_feats = whole[:1000].astype(np.float64)
    cov = np.cov(fit_feats, rowvar=False)
    assert np.allclose(cov - np.diag(np.diag(cov)), 0, atol=1e-3)
    assert np.all(np.diff(np.diag(cov)) <= 1e-6)


def test_pixels_dim_is_capped_and_input_checked() -> None:
    x = np.random.default_rng(0).random((50, 10))
    ex = make_extractor(FeatureSpec("pixels", "image"))  # default 256 -> capped at 10 pixels
    ex.fit(x)
    assert ex.out_dim == 10
    with pytest.raises(ValueError, match="fitted on 10"):
        ex.transform(np.zeros((3, 11)))
    with pytest.raises(ValueError, match="not fitted"):
        make_extractor(FeatureSpec("pixels", "image")).transform(x)


# ---------------------------------------------------------------------- text
@requires_text_extra
def test_text_extractor_offline_embeddings() -> None:
    sentences = [
        "A cat is sleeping on the sofa.",
        "On the couch, a cat takes a nap.",
        "The stock market fell sharply on Tuesday.",
    ]
    ex = make_extractor(FeatureSpec("text", "text", batch_size=2))
    ex.fit(sentences)
    emb = ex.transform(sentences, progress=False)
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[1, 2] + 0.2
    with pytest.raises(ValueError, match="row 1 is int"):
        ex.transform(["ok", 3])


# ---------------------------------------------------------------------- module
def test_module_extractor_by_import_path() -> None:
    x = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    spec = FeatureSpec("module", "x", module=TINY_MODULE, batch_size=3)
    ex = make_extractor(spec)
    ex.fit(x[:5])
    assert ex.out_dim == 3
    out = ex.transform(x, progress=False)
    ref = x @ (np.arange(12, dtype=np.float32).reshape(3, 4) / 10).T + [1.0, -1.0, 0.5]
    assert out.shape == (10, 3) and np.allclose(out, ref, atol=1e-5)
    shipped = make_extractor(spec)
    shipped.load_state_dict(_npz_round_trip(ex.state_dict()))
    assert np.array_equal(shipped.transform(x), out)
    with pytest.raises(ValueError, match="no attribute"):
        make_extractor(FeatureSpec("module", "x", module="tests.unit.test_features:nope")).fit(x)
    with pytest.raises(ValueError, match="cannot import"):
        make_extractor(FeatureSpec("module", "x", module="no_such_pkg_xyz:f")).fit(x)
    with pytest.raises(ValueError, match="spec says 7"):
        make_extractor(FeatureSpec("module", "x", module=TINY_MODULE, dim=7)).fit(x)
    with pytest.raises(ValueError, match="non-finite features"):
        make_extractor(
            FeatureSpec("module", "x", module="tests.unit.test_features:nan_module")
        ).fit(x)
    with pytest.raises(ValueError, match="module extractor is not fitted"):
        make_extractor(spec).transform(x)


# ---------------------------------------------------------------------- progress helper
def test_progress_reports_and_batch_ranges() -> None:
    from saelect.workers.progress import Progress, batch_ranges

    seen: list[tuple[int, int]] = []
    with Progress(10, progress=True, on_progress=lambda d, t: seen.append((d, t))) as bar:
        for start, stop in batch_ranges(10, 4):
            bar.update(stop - start)
    assert seen == [(0, 10), (4, 10), (8, 10), (10, 10)]
    assert list(batch_ranges(0, 3)) == []
    with pytest.raises(ValueError, match="batch_size"):
        list(batch_ranges(5, 0))
    with pytest.raises(ValueError, match="total"):
        Progress(-1)


# ---------------------------------------------------------------------- selfsup
SHAPES_12 = 3
"""Classes of `_shapes`: horizontal bar, vertical bar, square blob (chance accuracy 1/3)."""


def _shapes(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, 144) of 12x12 shapes at random positions plus noise, labels (n,).

    The classes survive the augmentations (crops, shifts, horizontal flips), so a contrastive
    encoder can learn them.
    """
    rng = np.random.default_rng(seed)
    y_N = np.arange(n) % SHAPES_12
    img_NHW = rng.normal(60.0, 20.0, (n, 12, 12))
    pos_N, other_N = rng.integers(2, 10, n), rng.integers(3, 9, n)
    for i in range(n):
        p, q = pos_N[i], other_N[i]
        if y_N[i] == 0:
            img_NHW[i, p - 1 : p + 1, 1:11] += 120
        elif y_N[i] == 1:
            img_NHW[i, 1:11, p - 1 : p + 1] += 120
        else:
            img_NHW[i, q - 2 : q + 2, p - 2 : p + 2] += 120
    return np.clip(img_NHW, 0, 255).astype(np.uint8).reshape(n, 144), y_N


def _centroid_accuracy(f_ND: np.ndarray, y_N: np.ndarray, n_train: int) -> float:
    """Nearest-centroid (cosine) accuracy on rows [n_train:], centroids from rows [:n_train]."""
    f_ND = f_ND / np.maximum(np.linalg.norm(f_ND, axis=1, keepdims=True), 1e-8)
    cents_KD = np.stack([f_ND[:n_train][y_N[:n_train] == c].mean(axis=0) for c in range(3)])
    pred_N = np.argmax(f_ND[n_train:] @ cents_KD.T, axis=1)
    return float((pred_N == y_N[n_train:]).mean())


@pytest.fixture(scope="module")
def one_thread() -> Any:
    """torch on one thread (fast and reproducible on a busy machine), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SELFSUP_SPEC = FeatureSpec("selfsup", "image", dim=16, batch_size=64)


@pytest.fixture(scope="module")
def selfsup_fit(one_thread: None) -> tuple[SelfSupExtractor, np.ndarray, np.ndarray]:
    """A selfsup extractor trained 30 epochs on 300 synthetic 12x12 images, and the data."""
    x_ND, y_N = _shapes(300)
    ex = SelfSupExtractor(SELFSUP_SPEC, epochs=30, device="cpu")
    ex.fit(x_ND, progress=False)
    return ex, x_ND, y_N


def test_selfsup_features_shape_and_shipped_state(selfsup_fit: Any) -> None:
    ex, x_ND, _ = selfsup_fit
    assert isinstance(make_extractor(SELFSUP_SPEC), SelfSupExtractor)
    assert ex.out_dim == 16 and ex.image_shape == (1, 12, 12)
    feats = ex.transform(x_ND, progress=False)
    assert feats.shape == (300, 16) and feats.dtype == np.float32 and np.isfinite(feats).all()
    assert np.array_equal(ex.transform(x_ND.reshape(300, 1, 12, 12), progress=False), feats)
    state = _npz_round_trip(ex.state_dict())
    assert not any(k.startswith("head") for k in state)  # the projection head stays behind
    assert state["image_shape"].tolist() == [1, 12, 12] and state["mean"].shape == (1,)
    shipped = make_extractor(SELFSUP_SPEC)
    shipped.load_state_dict(state)
    assert shipped.out_dim == 16
    assert np.array_equal(shipped.transform(x_ND, progress=False), feats)


@pytest.mark.parametrize("batch_size", [1, 7, 300])
def test_selfsup_row_features_do_not_depend_on_the_batch(selfsup_fit: Any, batch_size: int) -> None:
    ex, x_ND, _ = selfsup_fit
    whole = ex.transform(x_ND, progress=False)
    other = make_extractor(FeatureSpec("selfsup", "image", dim=16, batch_size=batch_size))
    other.load_state_dict(ex.state_dict())
    rows = np.random.default_rng(1).permutation(300)[:150]
    assert np.allclose(other.transform(x_ND[rows], progress=False), whole[rows], atol=1e-5)


def test_selfsup_fit_is_deterministic(one_thread: None) -> None:
    x_ND, _ = _shapes(100, seed=3)
    states = []
    for _ in range(2):
        ex = SelfSupExtractor(FeatureSpec("selfsup", "image", dim=8), epochs=2, device="cpu")
        ex.fit(x_ND, progress=False)
        states.append(ex.state_dict())
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert np.array_equal(states[0][key], states[1][key]), key


def test_selfsup_training_separates_classes(selfsup_fit: Any, one_thread: None) -> None:
    ex, x_ND, y_N = selfsup_fit
    trained = _centroid_accuracy(ex.transform(x_ND, progress=False), y_N, 150)
    barely = SelfSupExtractor(SELFSUP_SPEC, epochs=1, device="cpu")
    barely.fit(x_ND, progress=False)
    untrained = _centroid_accuracy(barely.transform(x_ND, progress=False), y_N, 150)
    # chance is 1/3; over 8 data seeds trained gave 0.79-0.99 (this one 0.95), 1 epoch 0.36-0.59
    assert trained >= 0.7 and trained >= untrained + 0.2, (trained, untrained)
    assert ex.losses[-1] < ex.losses[0] - 0.5  # the NT-Xent loss fell


def test_selfsup_image_shape_and_bad_inputs(selfsup_fit: Any, one_thread: None) -> None:
    ex, x_ND, _ = selfsup_fit
    with pytest.raises(ValueError, match=r"not square images.*set the feature spec's image_shape"):
        make_extractor(FeatureSpec("selfsup", "image")).fit(np.zeros((10, 150)))
    with pytest.raises(ValueError, match=r"image_shape \(1, 5, 5\) holds 25 values, the rows"):
        make_extractor(FeatureSpec("selfsup", "image", image_shape=(1, 5, 5))).fit(x_ND)
    with pytest.raises(ValueError, match=r"has 100 values per row.*fitted on images"):
        ex.transform(np.zeros((3, 100)))
    bad = x_ND[:5].astype(np.float32)
    bad[3, 7] = np.nan
    with pytest.raises(ValueError, match="'image' has a non-finite value nan in row 3"):
        ex.transform(bad)
    with pytest.raises(ValueError, match="non-finite value nan in row 3"):
        make_extractor(SELFSUP_SPEC).fit(bad)
    with pytest.raises(ValueError, match="selfsup extractor is not fitted"):
        make_extractor(SELFSUP_SPEC).transform(x_ND)
    with pytest.raises(ValueError, match="image_shape must be None or 3 ints >= 1"):
        FeatureSpec("selfsup", "image", image_shape=(1, 12))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image_shape applies to kind 'selfsup' only"):
        FeatureSpec("pixels", "image", image_shape=(1, 12, 12))
    # a non-square image shape given explicitly (list -> tuple, as from JSON)
    wide = FeatureSpec("selfsup", "image", dim=4, image_shape=[1, 6, 24])  # type: ignore[arg-type]
    assert wide.image_shape == (1, 6, 24)
    ex_wide = SelfSupExtractor(wide, epochs=1, device="cpu")
    ex_wide.fit(x_ND[:40], progress=False)
    assert ex_wide.transform(x_ND[:5], progress=False).shape == (5, 4)


def test_feature_model_accepts_selfsup_and_checks_image_shape() -> None:
    from pydantic import ValidationError
    from saelect.service.models import FeatureModel
    from saelect.service.specs import JobSpec

    model = FeatureModel(kind="selfsup", column="image", dim=64, image_shape=[1, 28, 28])
    body = {
        "name": "a",
        "dataset": {"uri": "/data/x.parquet", "feature": model.model_dump()},
        "policy": {"name": "factor", "ratio": 0.5, "epochs": 3},
    }
    spec = JobSpec.from_dict(body)
    assert spec.dataset.feature == FeatureSpec("selfsup", "image", dim=64, image_shape=(1, 28, 28))
    assert JobSpec.from_dict(spec.to_dict()) == spec
    for bad in ([1, 28], [1, 28, 28, 1], [0, 28, 28], [1, -2, 28]):
        with pytest.raises(ValidationError, match="image_shape"):
            FeatureModel(kind="selfsup", column="image", image_shape=bad)


def test_scoring_key_of_existing_kinds_ignores_the_new_field() -> None:
    import dataclasses
    import hashlib
    import json

    from saelect.service.job_scoring import scoring_key
    from saelect.service.policies import PolicyConfig
    from saelect.service.specs import DatasetSpec, JobSpec

    feature = FeatureSpec("pixels", "image", dim=64)
    spec = JobSpec(
        "a", DatasetSpec("/data/x.parquet", feature, "label"), PolicyConfig("full", 1, 2)
    )
    # the key as computed before FeatureSpec had image_shape (and model, weights, library...)
    original = ("kind", "column", "dim", "module", "batch_size")
    old_feature = {k: v for k, v in dataclasses.asdict(feature).items() if k in original}
    doc = {
        "uri": spec.dataset.uri,
        "feature": old_feature,
        "label": "label",
        "sae": {k: v for k, v in dataclasses.asdict(spec.sae).items() if k != "device"},
        "scores": dataclasses.asdict(spec.scores),
    }
    blob = json.dumps(doc, sort_keys=True, default=str).encode()
    assert scoring_key(spec) == hashlib.sha256(blob).hexdigest()[:20]
    shaped = dataclasses.replace(
        spec,
        dataset=DatasetSpec(
            "/data/x.parquet", FeatureSpec("selfsup", "image", image_shape=(1, 8, 8)), "label"
        ),
    )
    plain = dataclasses.replace(
        spec, dataset=DatasetSpec("/data/x.parquet", FeatureSpec("selfsup", "image"), "label")
    )
    assert scoring_key(shaped) != scoring_key(plain)
