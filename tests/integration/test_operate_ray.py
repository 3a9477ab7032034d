"""Operating the service on local Ray: `/metrics` after real epochs, and `saelect jobs wait`
following a job's phases to ready or to its error.

One local Ray and one service for the module; jobs score scikit-learn digits (1797 rows) with a
small SAE, so a job is ready in seconds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from saelect.client import SelectionClient
from saelect.service.backend import PHASES
from saelect.service.cli import main
from saelect.service.server import ServiceHandle, start_service
from saelect.service.settings import Settings
from saelect.workers.datasets import write_image_parquet

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("operate")
    write_image_parquet(root / "digits", "digits")
    return root


def spec(data_dir: Path, column: str = "image", sae_seed: int = 0) -> dict[str, Any]:
    return {
        "name": "digits-ops",
        "dataset": {
            "uri": str(data_dir / "digits" / "train.parquet"),
            "label_column": "label",
            "feature": {"kind": "pixels", "column": column, "dim": 16},
        },
        "policy": {"name": "factor", "ratio": 0.3, "epochs": 4, "seed": 1},
        "sae": {"units": 64, "k": 4, "epochs": 2, "batch_size": 512, "seed": sae_seed},
    }


@pytest.fixture(scope="module")
def service(ray_local: None, data_dir: Path) -> Iterator[ServiceHandle]:
    settings = Settings(
        host="127.0.0.1", port=0, store=str(data_dir / "store"), allowed_roots=[str(data_dir)]
    )
    handle = start_service(settings, name=None)
    yield handle
    handle.stop()


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_after_a_job_served_two_epochs(service: ServiceHandle, data_dir: Path) -> None:
    client = SelectionClient(service.url)
    job = client.create_job(spec(data_dir))["id"]
    client.wait_ready(job, timeout=300, poll=0.2)
    for t in range(2):
        for rank in range(2):
            client.indices(job, t, rank, 2)
    client.indices(job, 1, 0, 1)  # served from memory: no epoch computed
    got = scrape(service.url)

    def series(name: str, **labels: str) -> float:
        return got[(name, frozenset(labels.items()))]

    assert series("saelect_epochs_computed_total", policy="factor") == 2
    assert series("saelect_epoch_selection_seconds_count", policy="factor") == 2
    assert series("saelect_epoch_selection_seconds_sum", policy="factor") > 0
    assert series("saelect_jobs", phase="ready") >= 1
    assert series("saelect_job_epochs_committed", job=job, policy="factor") == 2
    assert series("saelect_job_progress_done", job=job, phase="ready") == 1
    assert not [k for k in got if k[0] == "saelect_job_resources_reserved" and ("job", job) in k[1]]
    per_epoch = client.plan(job, 2)["epochs"][0]["per_rank"]
    single = client.plan(job, 1)["epochs"][1]["per_rank"]
    assert series("saelect_indices_served_total") == 4 * per_epoch + single
    route = "/v1/jobs/{job_id}/epochs/{epoch}/indices"
    assert series("saelect_http_requests_total", method="GET", route=route, status="200") == 5
    store = data_dir / "store"
    stored = lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())  # noqa: E731
    # the one scoring so far, counted once when it completed; every job file written at least once
    assert series("saelect_store_bytes_written_total", kind="scoring") == stored(store / "scoring")
    assert series("saelect_store_bytes_written_total", kind="jobs") >= stored(store / "jobs") > 0
    client.delete(job)
    after = scrape(service.url)
    assert not [k for k in after if ("job", job) in k[1]]
    assert after[("saelect_epochs_computed_total", frozenset({("policy", "factor")}))] == 2


def test_jobs_wait_shows_the_phases_in_order_and_exits_0(
    service: ServiceHandle, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = SelectionClient(service.url).create_job(spec(data_dir, sae_seed=1))["id"]  # scored anew
    assert main(["jobs", "wait", job, "--poll", "0.1", "--url", service.url]) == 0
    captured = capsys.readouterr()
    shown = re.findall(rf"^job {job}: (\w+)$", captured.err, flags=re.M)
    assert shown[-1] == "ready" and len(shown) >= 3, captured.err
    assert [PHASES.index(p) for p in shown] == sorted({PHASES.index(p) for p in shown})
    assert {"training_sae", "encoding", "scoring"} & set(shown), shown
    assert json.loads(captured.out)["phase"] == "ready"


def test_jobs_create_wait_on_a_bad_column_exits_1_with_the_error(
    service: ServiceHandle,
    data_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(spec(data_dir, column="no_such_column")))
    argv = ["jobs", "create", str(path), "--wait", "--poll", "0.1", "--url", service.url]
    assert main(argv) == 1
    captured = capsys.readouterr()
    error = [line for line in captured.err.splitlines() if line.startswith("error: job ")]
    assert len(error) == 1 and "failed: " in error[0] and "no_such_column" in error[0], captured


def test_feedback_lag_counts_epochs_committed_since(service: ServiceHandle, data_dir: Path) -> None:
    client = SelectionClient(service.url)
    body = spec(data_dir)
    body["policy"] = {"name": "ucb", "ratio": 0.3, "epochs": 4, "seed": 1}
    job = client.create_job(body)["id"]  # a loss-based policy: not scored, ready at once
    client.wait_ready(job, timeout=120, poll=0.2)
    idx = client.indices(job, 1)  # epochs 0 and 1 committed
    client.feedback(job, 0, idx[:5], [1.0] * 5)  # one epoch late
    client.feedback(job, 1, idx, [0.5] * idx.size)  # on time
    got = scrape(service.url)
    lag = {k[0]: v for k, v in got.items() if ("policy", "ucb") in k[1] and "le" not in dict(k[1])}
    assert lag["saelect_feedback_lag_epochs_count"] == 2
    assert lag["saelect_feedback_lag_epochs_sum"] == 1
    assert got[("saelect_feedback_samples_total", frozenset())] == 5 + idx.size
    client.delete(job)
