"""``GET /metrics``: Prometheus text; needs the token (when one is set) unless
``Settings.metrics_open``."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from saelect.service.backend import JobStatus
from saelect.service.errors import SaelectError
from saelect.service.metrics import CONTENT_TYPE, JobMetrics
from saelect.service.models import ErrorModel
from saelect.service.routes import BackendDep, MetricsDep, require_token_for_metrics

router = APIRouter(tags=["metrics"], dependencies=[Depends(require_token_for_metrics)])


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        401: {"model": ErrorModel, "description": "missing or wrong bearer token"},
    },
)
async def metrics(backend: BackendDep, registry: MetricsDep) -> Response:
    """Requests, latency, indices served, epochs and their selection time, jobs by phase, per
    job its progress, epochs committed and reserved resources, and store bytes written."""
    statuses: list[JobStatus] | None
    try:
        statuses = await backend.list_jobs()
    except SaelectError:
        statuses = None
    details: list[JobMetrics] | None = None
    job_metrics = getattr(backend, "job_metrics", None)  # optional: the fake backend has none
    if job_metrics is not None and statuses is not None:
        try:
            details = list(await job_metrics())
        except SaelectError:
            details = None
    store_bytes: dict[str, int] | None = None
    bytes_written = getattr(backend, "store_bytes_written", None)  # optional, like job_metrics
    if bytes_written is not None:
        store_bytes = dict(await bytes_written())
    return Response(registry.render(statuses, details, store_bytes), media_type=CONTENT_TYPE)
