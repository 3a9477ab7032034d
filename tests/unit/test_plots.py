"""The per-epoch figure (`service.plots`): `saelect jobs plot` against a live fake service writes a
PNG whose panels show the job's committed epochs, and the figure draws exactly the stats given."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from saelect.client import SelectionClient
from saelect.service.app import create_app
from saelect.service.cli import main
from saelect.service.plots import AXES_TITLES, epoch_figure
from saelect.service.settings import Settings

from tests.unit.fakes import FakeBackend
from tests.unit.test_client import ServerThread, free_socket

SPEC: dict[str, Any] = {
    "name": "plot",
    "dataset": {
        "uri": "/usr/share/datasets/x.parquet",
        "label_column": "label",
        "feature": {"kind": "pixels", "column": "image", "dim": 16},
    },
    "policy": {"name": "rs2", "ratio": 0.25, "epochs": 5, "seed": 3},
}
CLASSES = 4


class LabelledBackend(FakeBackend):
    """The fake service with labels (class = index % 4) in its stats, and a record of the
    epochs whose stats were asked."""

    def __init__(self) -> None:
        super().__init__(400)
        self.asked: list[int] = []

    async def epoch_stats(self, job_id: str, epoch: int) -> dict[str, Any]:
        stats = await super().epoch_stats(job_id, epoch)
        self.asked.append(epoch)
        order = self.epoch_order(self.jobs[job_id].spec, epoch)
        stats["class_counts"] = np.bincount(order % CLASSES, minlength=CLASSES).tolist()
        stats["mean_R"], stats["mean_D"] = 0.25 + 0.1 * epoch, 0.75 - 0.1 * epoch
        return stats


@pytest.fixture
def live() -> Iterator[tuple[str, LabelledBackend]]:
    backend = LabelledBackend()
    settings = Settings(store="/tmp/unused-store", allowed_roots=["/usr/share/datasets"])
    server = ServerThread(create_app(backend, settings), free_socket()).start()
    yield server.url, backend
    server.stop()


def test_jobs_plot_draws_a_live_jobs_committed_epochs_into_a_png(
    live: tuple[str, LabelledBackend], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, backend = live
    client = SelectionClient(url)
    job = client.create_job(SPEC)["id"]
    png = tmp_path / "job.png"
    argv = ["jobs", "plot", job, "--out", str(png), "--url", url]
    assert main(argv) == 2  # nothing committed yet
    assert "no committed epoch" in capsys.readouterr().err and not png.exists()
    client.indices(job, 2, 0, 1)  # the trainer got epoch 2: epochs 0, 1, 2 are committed
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"job": job, "epochs": 3, "plot": str(png.resolve())}
    assert backend.asked == [0, 1, 2]  # never an epoch the trainer has not reached
    assert client.job(job)["epochs_committed"] == 3
    with Image.open(png) as img:
        img.verify()  # a whole, valid PNG
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == (1650, 440)  # 15 x 4 in at 110 dpi
        assert img.text["Description"] == "; ".join(AXES_TITLES)
        assert img.text["Title"] == f"job {job} (plot): 3 epochs committed"
        pixels = np.asarray(img.convert("L"), dtype=np.float64)
    assert pixels.std() > 10  # drawn, not blank


def test_the_figure_draws_each_epochs_stats() -> None:
    import matplotlib.pyplot as plt

    shares = np.array([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]])
    stats = [
        {
            "epoch": t,
            "lambda": float(t),
            "size": 4,
            "coverage": 0.3 + 0.4 * t,
            "usage": {"min": 0, "max": 1 + t, "mean": 0.5},
            "mean_R": 0.9 - t,
            "mean_D": 0.1 + t,
            "class_counts": (shares[t] * 20).astype(int).tolist(),
        }
        for t in range(2)
    ]
    fig = epoch_figure(stats, "two epochs")
    try:
        a, b, c, twin = fig.axes
        assert [ax.get_title() for ax in (a, b, c)] == list(AXES_TITLES)
        lines = {line.get_label(): list(line.get_ydata()) for line in a.get_lines()}
        assert lines == {
            "lambda(t)": pytest.approx([0.0, 1.0]),
            "mean R of selection": pytest.approx([0.9, -0.1]),
            "mean D of selection": pytest.approx([0.1, 1.1]),
        }
        assert list(b.get_lines()[0].get_ydata()) == pytest.approx([0.3, 0.7])
        assert list(twin.get_lines()[0].get_ydata()) == [1, 2]  # usage max - min
        heights = np.array([p.get_height() for p in c.patches]).reshape(3, 2)  # class, epoch
        np.testing.assert_allclose(heights.T, shares)
        assert fig.get_suptitle() == "two epochs"
    finally:
        plt.close(fig)
    unlabelled = epoch_figure([{**stats[0], "class_counts": None}], "no labels")
    try:
        assert [t.get_text() for t in unlabelled.axes[2].texts] == ["no label column"]
        assert not unlabelled.axes[2].patches
    finally:
        plt.close(unlabelled)
