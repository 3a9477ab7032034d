"""``/v1/jobs``: create, list, inspect, plan and delete jobs."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response, status
from saelect.service.backend import Backend, JobStatus, Plan
from saelect.service.errors import InvalidRequest, TooManyJobs
from saelect.service.models import (
    EpochPlanModel,
    ErrorModel,
    JobListModel,
    JobSpecModel,
    JobStatusModel,
    PlanModel,
    ProgressModel,
)
from saelect.service.routes import BackendDep, JobId, SettingsDep, check_world_size, require_token
from saelect.service.settings import Settings
from saelect.service.specs import JobSpec, job_spec_from_model

ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorModel, "description": "invalid value or malformed body"},
    401: {"model": ErrorModel, "description": "missing or wrong bearer token"},
    404: {"model": ErrorModel, "description": "unknown job"},
    409: {"model": ErrorModel, "description": "job not ready"},
    413: {"model": ErrorModel, "description": "request body too large"},
}
CREATE_ERRORS: dict[int | str, dict[str, object]] = {
    **ERRORS,
    429: {"model": ErrorModel, "description": "the service holds its limit of live jobs"},
}

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_token)])


def status_model(s: JobStatus) -> JobStatusModel:
    """The wire form of a backend ``JobStatus``."""
    return JobStatusModel(
        id=s.id,
        name=s.name,
        phase=s.phase,  # type: ignore[arg-type]
        progress=ProgressModel(done=s.progress[0], total=s.progress[1]),
        num_samples=s.num_samples,
        epochs_committed=s.epochs_committed,
        error=s.error,
        reason=s.reason,
    )


def plan_model(plan: Plan, world_size: int) -> PlanModel:
    """The wire form of a backend ``Plan``."""
    return PlanModel(
        world_size=world_size,
        epochs=[EpochPlanModel(epoch=e, size=n, per_rank=p) for e, n, p in plan.epochs],
        sample_fraction=plan.sample_fraction,
    )


def _create_lock(request: Request) -> asyncio.Lock:
    """The app's lock around counting live jobs and creating one (one per app)."""
    lock: asyncio.Lock | None = getattr(request.app.state, "create_lock", None)
    if lock is None:
        lock = request.app.state.create_lock = asyncio.Lock()
    return lock


async def _create_within_limits(backend: Backend, spec: JobSpec, settings: Settings) -> JobStatus:
    """Create the job unless its epochs or the number of live jobs exceed the settings.

    Raises
    ------
    InvalidRequest
        ``policy.epochs`` above ``settings.max_epochs`` (400).
    TooManyJobs
        ``settings.max_jobs`` jobs not ``failed`` exist already (429).
    """
    if spec.policy.epochs > settings.max_epochs:
        raise InvalidRequest(
            f"policy.epochs {spec.policy.epochs} exceeds the service's limit of "
            f"{settings.max_epochs} (SAELECT_MAX_EPOCHS)"
        )
    live = sum(1 for s in await backend.list_jobs() if s.phase != "failed")
    if live >= settings.max_jobs:
        raise TooManyJobs(
            f"the service holds {live} live jobs, its limit (SAELECT_MAX_JOBS = "
            f"{settings.max_jobs}); delete one first"
        )
    return await backend.create_job(spec)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobStatusModel,
    responses=CREATE_ERRORS,
)
async def create_job(
    body: JobSpecModel,
    backend: BackendDep,
    settings: SettingsDep,
    request: Request,
    response: Response,
) -> JobStatusModel:
    """Register a job; scoring starts on the cluster. Answers 202 with its id and phase."""
    spec = job_spec_from_model(body, settings)
    async with _create_lock(request):
        created = await _create_within_limits(backend, spec, settings)
    response.headers["Location"] = f"/v1/jobs/{created.id}"
    return status_model(created)


@router.get("", response_model=JobListModel, responses=ERRORS)
async def list_jobs(backend: BackendDep) -> JobListModel:
    """Status of every job."""
    return JobListModel(jobs=[status_model(s) for s in await backend.list_jobs()])


@router.get("/{job_id}", response_model=JobStatusModel, responses=ERRORS)
async def get_job(job_id: JobId, backend: BackendDep) -> JobStatusModel:
    """One job's phase, progress, samples, epochs committed and error."""
    return status_model(await backend.get_job(job_id))


@router.get("/{job_id}/plan", response_model=PlanModel, responses=ERRORS)
async def get_plan(
    job_id: JobId,
    backend: BackendDep,
    settings: SettingsDep,
    world_size: Annotated[int, Query(ge=1, description="number of ranks W")] = 1,
) -> PlanModel:
    """Every epoch's size and per-rank length for W ranks, and the realized sample fraction."""
    check_world_size(world_size, settings)
    return plan_model(await backend.plan(job_id, world_size), world_size)


@router.delete("/{job_id}", status_code=status.HTTP_204_NO_CONTENT, responses=ERRORS)
async def delete_job(job_id: JobId, backend: BackendDep) -> Response:
    """Drop a job and its stored state."""
    await backend.delete_job(job_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
