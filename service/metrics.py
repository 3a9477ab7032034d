"""Prometheus metrics of one app, on ``prometheus_client`` with a registry per app.

Counted as they happen: HTTP requests by method, route template and status, and their latency by
route; epoch index responses by format and the indices served; feedback samples received; epochs
computed and their selection seconds, by policy, and how many epochs late feedback arrives (the
job manager reports them through `Metrics.observe_epoch` and `Metrics.observe_feedback_lag`).
Read from the backend at scrape time (`Metrics.render`): jobs by phase, and per job its phase
progress, epochs committed and the cluster resources its scoring reserves; and the bytes the
backend wrote to its store, by kind (the backend keeps the totals).

Why ``prometheus_client`` and not ``ray.util.metrics``: docs/api.md, section Metrics.

Example:
    >>> m = Metrics()
    >>> m.observe_request("GET", "/healthz", 200, 0.002)
    >>> 'saelect_http_requests_total{method="GET",route="/healthz",status="200"} 1.0' in m.render()
    True
"""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from saelect.service.backend import PHASES, JobStatus

prometheus_client.disable_created_metrics()  # no `_created` series next to every counter

LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Upper bounds (seconds) of the HTTP latency histogram; +Inf is implicit."""

SELECTION_BUCKETS_S: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Upper bounds (seconds) of the epoch selection histogram; +Inf is implicit."""

FEEDBACK_LAG_BUCKETS: tuple[float, ...] = (0, 1, 2, 3, 5, 10, 20)
"""Upper bounds (epochs) of the feedback lag histogram; +Inf is implicit."""

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST


@dataclass(frozen=True)
class JobMetrics:
    """What a backend reports about one job at scrape time, beyond its `JobStatus`."""

    id: str
    """Job id."""
    policy: str
    """The job's policy name."""
    resources: Mapping[str, float] = field(default_factory=dict)
    """Cluster resources its scoring holds now, e.g. ``{"CPU": 2.0}``; empty once ready."""


class StoreBytes:
    """``saelect_store_bytes_written_total{kind}``: a counter the backend keeps (its own totals,
    read at scrape time), exported as they were last reported."""

    NAME = "saelect_store_bytes_written"
    HELP = (
        "Bytes written to the store, by kind: jobs (epochs, their stats and weights, feedback, "
        "job state) and scoring (each scoring run's outputs, counted when it completes)."
    )

    def __init__(self) -> None:
        self.values: dict[str, int] = {}

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self.NAME, self.HELP, labels=["kind"])]

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.NAME, self.HELP, labels=["kind"])
        for kind, value in sorted(self.values.items()):
            family.add_metric([kind], float(value))
        yield family


class Metrics:
    """The series of one app in its own `CollectorRegistry`; safe to update from several threads.

    Parameters
    ----------
    registry:
        Where the series live (default: a new registry, so apps and tests stay isolated).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self._scrape_lock = threading.Lock()
        self._request_series: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._index_series: dict[str, Any] = {}
        self.requests = Counter(
            "saelect_http_requests",
            "HTTP requests by method, route template and status.",
            ["method", "route", "status"],
            registry=reg,
        )
        self.latency = Histogram(
            "saelect_http_request_duration_seconds",
            "HTTP request latency by route template.",
            ["route"],
            buckets=LATENCY_BUCKETS_S,
            registry=reg,
        )
        self.index_responses = Counter(
            "saelect_epoch_index_responses",
            "Epoch index lists served, by format (binary, json).",
            ["format"],
            registry=reg,
        )
        self.indices_served = Counter(
            "saelect_indices_served", "Sample indices sent to trainers.", registry=reg
        )
        self.feedback_samples = Counter(
            "saelect_feedback_samples", "Per-sample losses received.", registry=reg
        )
        self.epochs_computed = Counter(
            "saelect_epochs_computed",
            "Epochs selected and committed by this process, by policy (replays not counted).",
            ["policy"],
            registry=reg,
        )
        self.selection_seconds = Histogram(
            "saelect_epoch_selection_seconds",
            "Seconds to select one epoch over the job's shards, by policy.",
            ["policy"],
            buckets=SELECTION_BUCKETS_S,
            registry=reg,
        )
        self.feedback_lag = Histogram(
            "saelect_feedback_lag_epochs",
            "Epochs committed after the one a feedback's losses are for, by policy.",
            ["policy"],
            buckets=FEEDBACK_LAG_BUCKETS,
            registry=reg,
        )
        start = Gauge("saelect_start_time_seconds", "Unix time the app started.", registry=reg)
        start.set(time.time())
        self.jobs = Gauge("saelect_jobs", "Jobs by phase.", ["phase"], registry=reg)
        self.progress_done = Gauge(
            "saelect_job_progress_done",
            "Units done in the job's current phase (rows, SAE epochs, shards), by job.",
            ["job", "phase"],
            registry=reg,
        )
        self.progress_total = Gauge(
            "saelect_job_progress_total",
            "Units in the job's current phase, by job.",
            ["job", "phase"],
            registry=reg,
        )
        self.epochs_committed = Gauge(
            "saelect_job_epochs_committed",
            "Epochs committed so far, by job and policy.",
            ["job", "policy"],
            registry=reg,
        )
        self.store_bytes = StoreBytes()
        reg.register(self.store_bytes)
        self.resources = Gauge(
            "saelect_job_resources_reserved",
            "Cluster resources the job's scoring reserves now (0 once scored), by job.",
            ["job", "resource"],
            registry=reg,
        )

    # -- events ------------------------------------------------------------------------------
    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one finished request and its latency. The labelled series are looked up once
        per (method, route template, status), a bounded set (unknown paths are one template)."""
        key = (method, route, status)
        series = self._request_series.get(key)
        if series is None:
            series = (self.requests.labels(method, route, str(status)), self.latency.labels(route))
            self._request_series[key] = series
        series[0].inc()
        series[1].observe(seconds)

    def observe_indices(self, fmt: str, count: int) -> None:
        """Count one epoch-indices response of ``count`` indices in format ``fmt``."""
        series = self._index_series.get(fmt)
        if series is None:
            series = self._index_series[fmt] = self.index_responses.labels(fmt)
        series.inc()
        self.indices_served.inc(count)

    def observe_feedback(self, count: int) -> None:
        """Count ``count`` per-sample losses received."""
        self.feedback_samples.inc(count)

    def observe_epoch(self, job_id: str, policy: str, epoch: int, seconds: float) -> None:
        """Count one epoch computed by ``policy`` in ``seconds`` (the job manager's hook)."""
        del job_id, epoch  # by policy only: a label per job would grow without bound
        self.epochs_computed.labels(policy).inc()
        self.selection_seconds.labels(policy).observe(seconds)

    def observe_feedback_lag(self, job_id: str, policy: str, lag: int, samples: int) -> None:
        """Record how late one applied feedback was, in epochs (the job manager's hook)."""
        del job_id, samples  # samples are counted by the route, as they arrive
        self.feedback_lag.labels(policy).observe(lag)

    def request_count(self, route: str | None = None) -> int:
        """Total requests seen (for one route template when given)."""
        total = 0.0
        for family in self.requests.collect():
            for s in family.samples:
                if s.name.endswith("_total") and route in (None, s.labels["route"]):
                    total += s.value
        return int(total)

    # -- scrape ------------------------------------------------------------------------------
    def _set_jobs(
        self, statuses: Sequence[JobStatus] | None, details: Iterable[JobMetrics] | None
    ) -> None:
        for gauge in (self.jobs, self.progress_done, self.progress_total):
            gauge.clear()
        for gauge in (self.epochs_committed, self.resources):
            gauge.clear()
        if statuses is None:
            return
        phases = Tally(s.phase for s in statuses)
        for phase in PHASES:
            self.jobs.labels(phase).set(phases.get(phase, 0))
        for s in statuses:
            self.progress_done.labels(s.id, s.phase).set(s.progress.done)
            self.progress_total.labels(s.id, s.phase).set(s.progress.total)
        committed = {s.id: s.epochs_committed for s in statuses}
        for d in details or ():
            self.epochs_committed.labels(d.id, d.policy).set(committed.get(d.id, 0))
            for resource, amount in d.resources.items():
                self.resources.labels(d.id, resource).set(amount)

    def render(
        self,
        statuses: Sequence[JobStatus] | None = None,
        details: Iterable[JobMetrics] | None = None,
        store_bytes: Mapping[str, int] | None = None,
    ) -> str:
        """The exposition text (format 0.0.4).

        Parameters
        ----------
        statuses:
            Every job's status (jobs by phase, progress by job); None leaves those series out.
        details:
            Per-job policy and reserved resources, from backends that report them.
        store_bytes:
            Bytes written to the store by kind, from backends that count them (the backend's
            running totals); None keeps the last reported ones.
        """
        with self._scrape_lock:  # the per-job gauges are rebuilt for each scrape
            self._set_jobs(statuses, details)
            if store_bytes is not None:
                self.store_bytes.values = dict(store_bytes)
            return generate_latest(self.registry).decode()


class MetricsMiddleware:
    """Pure ASGI middleware timing every HTTP request by its route template (not raw path)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "<unmatched>"
            self.metrics.observe_request(
                scope.get("method", "?"), template, status, time.perf_counter() - start
            )
