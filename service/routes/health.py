"""``GET /healthz``: liveness, open without a token."""

from __future__ import annotations

from importlib import metadata

from fastapi import APIRouter

from service.models import HealthModel

router = APIRouter(tags=["health"])


def _version() -> str:
    try:
        return metadata.version("saelect")
    except metadata.PackageNotFoundError:
        return "unknown"


VERSION = _version()


@router.get("/healthz", response_model=HealthModel)
async def healthz() -> HealthModel:
    """Liveness: answers while the event loop runs."""
    return HealthModel(version=VERSION)
