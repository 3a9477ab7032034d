"""``GET /healthz``: liveness, open without a token."""

from __future__ import annotations

from importlib import metadata

from fastapi import APIRouter, Request
from saelect.service.models import HealthModel

router = APIRouter(tags=["health"])


def _version() -> str:
    try:
        return metadata.version("saelect")
    except metadata.PackageNotFoundError:
        return "unknown"


VERSION = _version()


class ServedHealthModel(HealthModel):
    """``/healthz`` answer: status, version, and the URL clients should use."""

    url: str | None = None
    """The advertised URL (``Settings.public_url``); None before the server listens."""


@router.get("/healthz", response_model=ServedHealthModel)
async def healthz(request: Request) -> ServedHealthModel:
    """Liveness: answers while the event loop runs, with the URL clients should use.

    ``url`` is the advertised URL the server set on ``app.state.public_url`` once it listens
    (None for an app not served by the SelectionActor, e.g. in route tests).
    """
    return ServedHealthModel(version=VERSION, url=getattr(request.app.state, "public_url", None))
