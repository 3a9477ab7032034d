"""Prometheus metrics on prometheus_client: the series an app exports, parsed back with
``prometheus_client.parser``; the per-app registry; the optional backend hooks; and the Grafana
dashboard in deploy/, whose every expression must name an exported series."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from saelect.service.app import create_app
from saelect.service.backend import PHASES, JobStatus, Progress
from saelect.service.metrics import JobMetrics, Metrics
from saelect.service.settings import Settings

from tests.unit.fakes import FakeBackend

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
SPEC: dict[str, Any] = {
    "name": "m",
    "dataset": {
        "uri": "data/train.parquet",
        "label_column": "label",
        "feature": {"kind": "pixels", "column": "image", "dim": 16},
    },
    "policy": {"name": "rs2", "ratio": 0.25, "epochs": 4, "seed": 1, "params": {}},
}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


def exported_series(metrics: Metrics) -> set[str]:
    """Every sample name the registry can export (counters as ``_total``, histograms in parts)."""
    names = set()
    for family in metrics.registry.collect():
        suffixes = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_sum", "_count"],
        }.get(family.type, [""])
        names |= {family.name + s for s in suffixes}
    return names


class HookedBackend(FakeBackend):
    """The fake backend plus the optional hooks the job manager implements."""

    def __init__(self, num_samples: int = 400) -> None:
        super().__init__(num_samples)
        self.listeners: list[Any] = []
        self.feedback_listeners: list[Any] = []

    def add_epoch_listener(self, fn: Any) -> None:
        self.listeners.append(fn)

    async def epoch_indices(self, job_id: str, epoch: int, rank: int, world_size: int) -> Any:
        computed = self.jobs[job_id].status.epochs_committed
        idx = await super().epoch_indices(job_id, epoch, rank, world_size)
        for t in range(computed, epoch + 1):
            for fn in self.listeners:
                fn(job_id, self.jobs[job_id].spec.policy.name, t, 0.02)
        return idx

    def add_feedback_listener(self, fn: Any) -> None:
        self.feedback_listeners.append(fn)

    async def feedback(self, job_id: str, epoch: int, indices: Any, losses: Any) -> None:
        await super().feedback(job_id, epoch, indices, losses)
        lag = self.jobs[job_id].status.epochs_committed - 1 - epoch
        for fn in self.feedback_listeners:
            fn(job_id, self.jobs[job_id].spec.policy.name, lag, len(indices))

    async def job_metrics(self) -> list[JobMetrics]:
        return [
            JobMetrics(i, j.spec.policy.name, {} if j.status.phase == "ready" else {"CPU": 2.0})
            for i, j in self.jobs.items()
        ]

    async def store_bytes_written(self) -> dict[str, int]:
        """A store that grows by 100 bytes per epoch computed and 1000 per job created."""
        computed = sum(j.status.epochs_committed for j in self.jobs.values())
        return {"jobs": 100 * computed, "scoring": 1000 * len(self.jobs)}


def test_events_and_job_snapshot_render_as_parsable_series() -> None:
    m = Metrics()
    m.observe_request("GET", "/v1/jobs", 200, 0.003)
    m.observe_request("GET", "/v1/jobs", 200, 0.2)
    m.observe_indices("binary", 150)
    m.observe_feedback(7)
    for seconds in (0.02, 0.3):
        m.observe_epoch("a", "factor", 0, seconds)
    statuses = [
        JobStatus("a", "a", "ready", Progress(1, 1), 100, epochs_committed=2),
        JobStatus("b", "b", "encoding", Progress(3, 8), 100),
    ]
    details = [JobMetrics("a", "factor"), JobMetrics("b", "factor", {"CPU": 2.0, "GPU": 1.0})]
    text = m.render(statuses, details)
    get = lambda name, **lab: value(text, name, **lab)  # noqa: E731
    assert get("saelect_http_requests_total", method="GET", route="/v1/jobs", status="200") == 2
    assert get("saelect_http_request_duration_seconds_bucket", route="/v1/jobs", le="0.005") == 1
    assert get("saelect_indices_served_total") == 150
    assert get("saelect_feedback_samples_total") == 7
    assert get("saelect_epochs_computed_total", policy="factor") == 2
    assert get("saelect_epoch_selection_seconds_count", policy="factor") == 2
    assert get("saelect_epoch_selection_seconds_sum", policy="factor") == pytest.approx(0.32)
    assert get("saelect_epoch_selection_seconds_bucket", policy="factor", le="0.025") == 1
    assert {p: get("saelect_jobs", phase=p) for p in PHASES} == {
        p: float(p in ("ready", "encoding")) for p in PHASES
    }
    assert get("saelect_job_progress_done", job="b", phase="encoding") == 3
    assert get("saelect_job_progress_total", job="b", phase="encoding") == 8
    assert get("saelect_job_epochs_committed", job="a", policy="factor") == 2
    assert get("saelect_job_resources_reserved", job="b", resource="GPU") == 1
    assert (
        "saelect_job_resources_reserved",
        frozenset({("job", "a"), ("resource", "CPU")}),
    ) not in (samples(text))
    assert m.request_count() == 2 and m.request_count("/healthz") == 0


def test_per_job_series_follow_the_jobs_that_exist_at_each_scrape() -> None:
    m = Metrics()
    first = m.render([JobStatus("gone", "g", "scoring", Progress(1, 4))], [JobMetrics("gone", "f")])
    assert value(first, "saelect_job_progress_done", job="gone", phase="scoring") == 1
    later = samples(m.render([], []))
    assert not [key for key in later if ("job", "gone") in key[1]]
    assert later[("saelect_jobs", frozenset({("phase", "scoring")}))] == 0


def test_every_app_has_its_own_registry(tmp_path: Path) -> None:
    settings = Settings(store=str(tmp_path / "s"), allowed_roots=[str(tmp_path)])
    one = TestClient(create_app(FakeBackend(100), settings))
    two = TestClient(create_app(FakeBackend(100), settings))
    for _ in range(3):
        one.get("/healthz")
    count = lambda c: value(  # noqa: E731
        c.get("/metrics").text,
        "saelect_http_requests_total",
        method="GET",
        route="/healthz",
        status="200",
    )
    assert count(one) == 3
    assert (
        "saelect_http_requests_total",
        frozenset({("method", "GET"), ("route", "/healthz"), ("status", "200")}),
    ) not in samples(two.get("/metrics").text)


def test_the_app_wires_the_optional_backend_hooks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    backend = HookedBackend()
    settings = Settings(store=str(tmp_path / "s"), allowed_roots=[str(tmp_path)])
    client = TestClient(create_app(backend, settings))
    ready = client.post("/v1/jobs", json=SPEC).json()["id"]
    waiting = client.post("/v1/jobs", json=SPEC).json()["id"]
    backend.set_phase(waiting, "encoding")
    client.get(f"/v1/jobs/{ready}/epochs/1/indices")  # computes epochs 0 and 1
    client.get(f"/v1/jobs/{ready}/epochs/1/indices", params={"rank": 1, "world_size": 2})
    text = client.get("/metrics").text
    assert value(text, "saelect_epochs_computed_total", policy="rs2") == 2
    assert value(text, "saelect_job_epochs_committed", job=ready, policy="rs2") == 2
    assert value(text, "saelect_job_resources_reserved", job=waiting, resource="CPU") == 2
    assert value(text, "saelect_indices_served_total") == 100 + 50
    assert value(text, "saelect_store_bytes_written_total", kind="jobs") == 200
    assert value(text, "saelect_store_bytes_written_total", kind="scoring") == 2000
    ucb = client.post("/v1/jobs", json={**SPEC, "policy": {**SPEC["policy"], "name": "ucb"}})
    job = ucb.json()["id"]
    client.get(f"/v1/jobs/{job}/epochs/2/indices")  # epochs 0..2 committed
    body = {"indices": [1, 2, 3], "losses": [0.5, 0.1, 2.0]}
    assert client.post(f"/v1/jobs/{job}/epochs/0/feedback", json=body).status_code == 200
    assert client.post(f"/v1/jobs/{job}/epochs/2/feedback", json=body).status_code == 200
    text = client.get("/metrics").text
    assert value(text, "saelect_feedback_samples_total") == 6
    assert value(text, "saelect_feedback_lag_epochs_count", policy="ucb") == 2
    assert value(text, "saelect_feedback_lag_epochs_sum", policy="ucb") == 2  # lags 2 and 0
    assert value(text, "saelect_feedback_lag_epochs_bucket", policy="ucb", le="0.0") == 1


def test_the_dashboard_reads_only_exported_series() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    exported = exported_series(Metrics())
    used = {name for e in exprs for name in re.findall(r"\bsaelect_[a-z_]+\b", e)}
    assert used <= exported, used - exported
    assert all(re.search(r"\bsaelect_[a-z_]+\b", e) for e in exprs)
    for family in (
        "saelect_jobs",
        "saelect_epoch_selection_seconds_bucket",
        "saelect_job_progress_done",
        "saelect_job_resources_reserved",
        "saelect_epochs_computed_total",
        "saelect_feedback_samples_total",
        "saelect_store_bytes_written_total",
    ):
        assert family in used, family
