"""``GET /metrics``: Prometheus text, open without a token."""

from __future__ import annotations

from collections import Counter

from fastapi import APIRouter
from fastapi.responses import Response

from service.errors import SaelectError
from service.metrics import CONTENT_TYPE
from service.routes import BackendDep, MetricsDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
async def metrics(backend: BackendDep, registry: MetricsDep) -> Response:
    """Request counters, latency histograms, indices served and jobs by phase."""
    try:
        phases: dict[str, int] | None = dict(Counter(j.phase for j in await backend.list_jobs()))
    except SaelectError:
        phases = None
    return Response(registry.render(phases), media_type=CONTENT_TYPE)
