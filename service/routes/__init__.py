"""HTTP routes, one router per resource, and the dependencies they share.

Routes stay thin: they validate and convert the request, call the ``Backend``, and shape the
answer. Every dependency is ``async def``: FastAPI runs a plain ``def`` dependency in a worker
thread, a thread hop per dependency per request that cost the load benchmark a sixth of the
SelectionActor's event-loop time (docs/benchmarks_load.md). Errors are raised as
``service.errors`` exceptions; the app turns them into ``{"error": {"code", "message"}}``
answers.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Path, Request
from saelect.service.backend import Backend
from saelect.service.errors import InvalidRequest, Unauthorized
from saelect.service.metrics import Metrics
from saelect.service.settings import Settings

JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
"""Job ids are path-safe: letters, digits, ``_`` and ``-``."""


async def get_backend(request: Request) -> Backend:
    """The app's Backend (``app.state.backend``)."""
    backend: Backend = request.app.state.backend
    return backend


async def get_settings(request: Request) -> Settings:
    """The app's Settings (``app.state.settings``)."""
    settings: Settings = request.app.state.settings
    return settings


async def get_metrics(request: Request) -> Metrics:
    """The app's metrics registry (``app.state.metrics``)."""
    metrics: Metrics = request.app.state.metrics
    return metrics


async def require_token(request: Request) -> None:
    """Check ``Authorization: Bearer <token>`` in constant time when a token is configured.

    Raises
    ------
    Unauthorized
        When the header is missing, malformed, or carries another token.
    """
    check_token(request.app.state.settings.token, request.headers.get("authorization"))


def check_token(token: str | None, header: str | None) -> None:
    """``require_token`` on a token (None: auth off) and an ``Authorization`` header value.

    Raises
    ------
    Unauthorized
        When the header is missing, malformed, or carries another token.
    """
    if token is None:
        return
    if header is None:
        raise Unauthorized("missing Authorization header; send 'Authorization: Bearer <token>'")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("malformed Authorization header; expected 'Bearer <token>'")
    if not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise Unauthorized("invalid API token")


async def require_token_for_metrics(request: Request) -> None:
    """The token check of ``/metrics``, skipped when ``Settings.metrics_open``."""
    if not request.app.state.settings.metrics_open:
        await require_token(request)


async def require_token_for_docs(request: Request) -> None:
    """The token check of ``/docs``, ``/redoc`` and ``/openapi.json``, skipped when
    ``Settings.docs_open``."""
    if not request.app.state.settings.docs_open:
        await require_token(request)


def check_world_size(world_size: int, settings: Settings) -> None:
    """Refuse a ``world_size`` above ``settings.max_world_size``.

    Raises
    ------
    InvalidRequest
        (400) naming the limit and its setting.
    """
    if world_size > settings.max_world_size:
        raise InvalidRequest(
            f"world_size {world_size} exceeds the service's limit of {settings.max_world_size} "
            "(SAELECT_MAX_WORLD_SIZE)"
        )


BackendDep = Annotated[Backend, Depends(get_backend)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="job id")]
Epoch = Annotated[int, Path(ge=0, description="epoch t, 0-based")]
"""A negative epoch is a bad value (400); one at or past the job's epochs, however large, is the
backend's ``EpochOutOfRange`` (404), as docs/api.md's error table says."""
