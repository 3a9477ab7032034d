"""The timm and torchvision ``image_model`` checks, run in the vision venv (``.venv-vision``).

PyPI's torchvision (which timm imports) is built against torch's CUDA build and fails to import
beside the CPU-only torch of the project venv, so `tests/unit/test_image_features.py` runs these
checks in a second venv (`make venv-vision`: torch 2.14.1 and torchvision 0.29.1, the CUDA pair,
which runs on the CPU, and timm) as a subprocess:

    .venv-vision/bin/python -m tests.unit.vision_backbones timm IMAGES.parquet WORKDIR

Each check builds resnet18 with seeded random weights (its classifier included), saves them to a
file in WORKDIR and names that file in the `FeatureSpec`. It asserts that the extractor's
features on the Parquet's ``image`` column (Hugging Face ``{"bytes", "path"}`` structs) equal the
saved model run by hand (so the loaded weights are the saved ones, the classifier dropped), then
scores the Parquet in one process (`workers.scoring_local.score_single_process`) and asserts
finite R and D of one value per row. It prints a JSON summary on its last line; any failed check
raises (exit status 1). Only numpy, torch, pyarrow and saelect are imported at the top, so the
project venv can import `reference` from here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from saelect.workers.features import FeatureSpec, make_extractor
from saelect.workers.features.image_model import IMAGENET_MEAN, IMAGENET_STD
from saelect.workers.features.images import decode_images

SIZE = 32
"""Side the images are resized to (small: the checks run on the CPU in seconds)."""
N_FEATURE_ROWS = 6
"""Rows whose features are compared with the saved model run by hand."""
LIBRARIES = ("timm", "torchvision")
RTOL, ATOL = 1e-4, 1e-5


def reference(model: Any, rows: list[Any], pool: Callable[[Any, Any], Any]) -> np.ndarray:
    """float32 (n, F): ``pool(model, x)`` on the n decoded images, resized to `SIZE` and
    normalized with ImageNet's mean and std (x: float32 (n, 3, SIZE, SIZE))."""
    x = torch.from_numpy(decode_images(rows, SIZE))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return pool(model, (x - mean) / std).reshape(len(rows), -1).numpy()


def timm_backbone(workdir: Path, rows: list[Any]) -> tuple[FeatureSpec, np.ndarray]:
    """A timm resnet18 (seed 2) saved to ``resnet18.safetensors``: (its spec, float32 (n, 512)
    features of the saved model run by hand on the n ``rows``)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(2)
    model = timm.create_model("resnet18", pretrained=False).eval()  # with its classifier
    path = workdir / "resnet18.safetensors"
    save_file(model.state_dict(), path)
    spec = FeatureSpec("image_model", "image", model="resnet18", weights=str(path), image_size=SIZE)
    pool = lambda m, x: m.forward_head(m.forward_features(x), pre_logits=True)  # noqa: E731
    return spec, reference(model, rows, pool)


def torchvision_backbone(workdir: Path, rows: list[Any]) -> tuple[FeatureSpec, np.ndarray]:
    """A torchvision resnet18 (seed 3) saved to ``resnet18.pth``: (its spec, float32 (n, 512)
    features of the saved model, classifier replaced by the identity, on the n ``rows``)."""
    from torchvision import models

    torch.manual_seed(3)
    model = models.get_model("resnet18", weights=None).eval()
    path = workdir / "resnet18.pth"
    torch.save(model.state_dict(), path)
    spec = FeatureSpec(
        "image_model", "image", model="resnet18", library="torchvision", weights=str(path),
        image_size=SIZE,
    )  # fmt: skip
    model.fc = torch.nn.Identity()
    return spec, reference(model, rows, lambda m, x: m(x))


def score_and_check(parquet: Path, spec: FeatureSpec, labels: list[int]) -> Any:
    """Score ``parquet`` in one process from ``spec``'s features (a small SAE) and check the
    result: R, D finite of shape (n,), the labels read back, codes for every row. Returns the
    ``ScoringResult``.

    Raises
    ------
    AssertionError
        When any of those fails.
    """
    from saelect.workers.sae import SAEConfig
    from saelect.workers.scores import ScoreConfig
    from saelect.workers.scoring_local import score_single_process

    sc = score_single_process(
        str(parquet),
        spec,
        "label",
        SAEConfig(units=32, k=4, epochs=2, batch_size=16, seed=0),
        ScoreConfig(),
    )
    n = len(labels)
    assert sc.R.shape == sc.D.shape == (n,), (sc.R.shape, sc.D.shape)
    assert np.isfinite(sc.R).all() and np.isfinite(sc.D).all()
    assert sc.labels is not None and sc.labels.tolist() == list(labels)
    assert sc.codes.ids.shape[0] == n and sc.counts.sum() > 0
    return sc


def check(library: str, parquet: Path, workdir: Path) -> dict[str, Any]:
    """Run the checks of ``library`` (one of `LIBRARIES`) on ``parquet``; a summary dict.

    Raises
    ------
    AssertionError
        When the features differ from the saved model's or the scores are wrong.
    """
    table = pq.read_table(parquet)
    rows = table["image"].to_pylist()[:N_FEATURE_ROWS]
    build = {"timm": timm_backbone, "torchvision": torchvision_backbone}[library]
    spec, expected = build(workdir, rows)
    ex = make_extractor(spec)
    ex.fit(rows)
    feats = ex.transform(rows, progress=False)
    assert feats.shape == expected.shape == (N_FEATURE_ROWS, 512), (feats.shape, expected.shape)
    assert feats.dtype == np.float32, feats.dtype
    np.testing.assert_allclose(feats, expected, rtol=RTOL, atol=ATOL)
    sc = score_and_check(parquet, spec, table["label"].to_pylist())
    return {
        "library": library,
        "torch": torch.__version__,
        "features": list(feats.shape),
        "max_abs_diff": float(np.abs(feats - expected).max()),
        "scored_rows": int(sc.R.shape[0]),
    }


def main(argv: list[str] | None = None) -> int:
    """``LIBRARY PARQUET WORKDIR``: run `check`, print its summary as JSON; exit status 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("library", choices=LIBRARIES)
    parser.add_argument("parquet", type=Path)
    parser.add_argument("workdir", type=Path)
    args = parser.parse_args(argv)
    print(json.dumps(check(args.library, args.parquet, args.workdir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
