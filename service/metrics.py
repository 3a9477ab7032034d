"""Prometheus text exposition (format 0.0.4) of the service's counters, written by hand.

Counters: requests by method, route template and status; a latency histogram by route; index
responses by format and the number of indices served; feedback samples received. Job phases are a
gauge computed at scrape time from the backend.

Example:
    >>> m = Metrics()
    >>> m.observe_request("GET", "/healthz", 200, 0.002)
    >>> 'saelect_http_requests_total{method="GET",route="/healthz",status="200"} 1' in m.render()
    True
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

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
"""Upper bounds (seconds) of the latency histogram; +Inf is implicit."""

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: Any) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


def _num(v: float) -> str:
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Metrics:
    """In-process counters of one app; safe to update from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = time.time()
        self._requests: dict[tuple[str, str, str], int] = defaultdict(int)
        # route -> (bucket counts (len(LATENCY_BUCKETS_S) + 1,), sum, count)
        self._latency: dict[str, list[Any]] = {}
        self._index_responses: dict[str, int] = defaultdict(int)
        self._indices_served = 0
        self._feedback_samples = 0

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one finished request and its latency."""
        with self._lock:
            self._requests[(method, route, str(status))] += 1
            entry = self._latency.get(route)
            if entry is None:
                entry = self._latency[route] = [[0] * (len(LATENCY_BUCKETS_S) + 1), 0.0, 0]
            entry[0][bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
            entry[1] += seconds
            entry[2] += 1

    def observe_indices(self, fmt: str, count: int) -> None:
        """Count one epoch-indices response of ``count`` indices in format ``fmt``."""
        with self._lock:
            self._index_responses[fmt] += 1
            self._indices_served += count

    def observe_feedback(self, count: int) -> None:
        """Count ``count`` per-sample losses received."""
        with self._lock:
            self._feedback_samples += count

    def request_count(self, route: str | None = None) -> int:
        """Total requests seen (for one route template when given)."""
        with self._lock:
            return sum(n for (_, r, _), n in self._requests.items() if route in (None, r))

    def render(self, job_phases: Mapping[str, int] | None = None) -> str:
        """The exposition text; ``job_phases`` maps phase -> number of jobs in it."""
        out: list[str] = []
        with self._lock:
            out += [
                "# HELP saelect_http_requests_total HTTP requests by method, route and status.",
                "# TYPE saelect_http_requests_total counter",
            ]
            for (method, route, status), n in sorted(self._requests.items()):
                lab = _labels(method=method, route=route, status=status)
                out.append(f"saelect_http_requests_total{lab} {n}")
            out += [
                "# HELP saelect_http_request_duration_seconds HTTP request latency by route.",
                "# TYPE saelect_http_request_duration_seconds histogram",
            ]
            name = "saelect_http_request_duration_seconds"
            for route, (buckets, total, count) in sorted(self._latency.items()):
                cum = 0
                for le, n in zip((*LATENCY_BUCKETS_S, float("inf")), buckets, strict=True):
                    cum += n
                    le_s = "+Inf" if le == float("inf") else repr(le)
                    out.append(f"{name}_bucket{_labels(route=route, le=le_s)} {cum}")
                out.append(f"{name}_sum{_labels(route=route)} {total!r}")
                out.append(f"{name}_count{_labels(route=route)} {count}")
            out += [
                "# HELP saelect_epoch_index_responses_total Epoch index lists served, by format.",
                "# TYPE saelect_epoch_index_responses_total counter",
            ]
            for fmt, n in sorted(self._index_responses.items()):
                out.append(f"saelect_epoch_index_responses_total{_labels(format=fmt)} {n}")
            out += [
                "# HELP saelect_indices_served_total Sample indices sent to trainers.",
                "# TYPE saelect_indices_served_total counter",
                f"saelect_indices_served_total {self._indices_served}",
                "# HELP saelect_feedback_samples_total Per-sample losses received.",
                "# TYPE saelect_feedback_samples_total counter",
                f"saelect_feedback_samples_total {self._feedback_samples}",
                "# HELP saelect_start_time_seconds Unix time the app started.",
                "# TYPE saelect_start_time_seconds gauge",
                f"saelect_start_time_seconds {_num(self._started)}",
            ]
        if job_phases is not None:
            out += [
                "# HELP saelect_jobs Jobs by phase.",
                "# TYPE saelect_jobs gauge",
            ]
            for phase, n in sorted(job_phases.items()):
                out.append(f"saelect_jobs{_labels(phase=phase)} {n}")
        return "\n".join(out) + "\n"


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
