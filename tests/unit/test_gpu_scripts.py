"""The GPU benchmark scripts stay runnable: each runs end to end on the CPU in smoke form.

They are meant for one device call on an H200; these checks make sure a lent session finds them
working (imports, shapes, the JSON they write), not how fast they are.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _run(script: str, *args: str) -> None:
    cmd = [sys.executable, str(BENCH / script), "--device", "cpu", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]


def test_gpu_scoring_smoke(tmp_path: Path) -> None:
    out = tmp_path / "scoring.json"
    _run("gpu_scoring.py", "--n", "6000", "--d", "32", "--units", "128", "--k", "8",
         "--atoms", "64", "--fit-samples", "3000", "--batch-size", "1024",
         "--encode-batch", "2048", "--out", str(out))  # fmt: skip
    report = json.loads(out.read_text())
    assert report, "the script wrote an empty report"


@pytest.mark.skipif(not FMNIST.exists(), reason="needs the dataset-fashion-mnist package")
def test_gpu_train_smoke(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    _run("gpu_train.py", "--smoke", "--ratios", "0.5", "--policies", "factor",
         "--out", str(out))  # fmt: skip
    report = json.loads(out.read_text())
    runs = {(r["policy"], r["ratio"]) for r in report["runs"]}
    assert runs == {("full", 1.0), ("factor", 0.5)}
    for r in report["runs"]:
        assert 0.0 <= r["final_acc"] <= 1.0 and len(r["acc_per_epoch"]) == 2
    factor = next(r for r in report["runs"] if r["policy"] == "factor")
    assert factor["samples"] == pytest.approx(0.5, abs=0.01)
    assert report["scoring_s"] > 0
