"""``/v1/jobs/{id}/epochs/{t}``: a rank's indices, loss feedback and per-epoch stats."""

from __future__ import annotations

import json
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from saelect.service.errors import InvalidRequest, PayloadTooLarge
from saelect.service.models import (
    ErrorModel,
    FeedbackAckModel,
    FeedbackModel,
    IndicesModel,
    StatsModel,
)
from saelect.service.routes import (
    BackendDep,
    Epoch,
    JobId,
    MetricsDep,
    SettingsDep,
    check_world_size,
    require_token,
)

try:  # optional fast JSON encoder
    import orjson
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None

BINARY = "application/octet-stream"
JSON = "application/json"
COUNT_HEADER = "X-Saelect-Count"

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorModel, "description": "invalid value (rank >= world_size, ...)"},
    401: {"model": ErrorModel, "description": "missing or wrong bearer token"},
    404: {"model": ErrorModel, "description": "unknown job, or epoch >= the policy's epochs"},
    409: {"model": ErrorModel, "description": "job not ready, or policy takes no feedback"},
    413: {"model": ErrorModel, "description": "request body or feedback batch too large"},
}

router = APIRouter(
    prefix="/v1/jobs/{job_id}/epochs",
    tags=["epochs"],
    dependencies=[Depends(require_token)],
)


def wants_json(accept: str | None) -> bool:
    """True when the Accept header prefers ``application/json`` over octet-stream."""
    if not accept:
        return False
    types = [part.split(";", 1)[0].strip().lower() for part in accept.split(",")]
    if JSON not in types:
        return False
    return BINARY not in types or types.index(JSON) < types.index(BINARY)


def indices_json(epoch: int, rank: int, world_size: int, idx: np.ndarray) -> bytes:
    """``{"epoch", "rank", "world_size", "indices": [...]}`` as UTF-8 bytes; idx int64 (n,)."""
    doc = {"epoch": epoch, "rank": rank, "world_size": world_size}
    if orjson is not None:
        return orjson.dumps({**doc, "indices": idx}, option=orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps({**doc, "indices": idx.tolist()}, separators=(",", ":")).encode()


@router.get(
    "/{epoch}/indices",
    response_class=Response,
    responses={
        200: {
            "description": "this rank's indices: little-endian int64 (count in "
            "X-Saelect-Count), or JSON with Accept: application/json",
            "content": {
                BINARY: {"schema": {"type": "string", "format": "binary"}},
                JSON: {"schema": IndicesModel.model_json_schema()},
            },
        },
        **ERRORS,
    },
)
async def get_indices(
    job_id: JobId,
    epoch: Epoch,
    request: Request,
    backend: BackendDep,
    metrics: MetricsDep,
    settings: SettingsDep,
    rank: Annotated[int, Query(ge=0, description="this trainer's rank R")] = 0,
    world_size: Annotated[int, Query(ge=1, description="number of ranks W")] = 1,
) -> Response:
    """Rank R's indices of epoch t: the epoch order padded to a multiple of W, positions
    R, R+W, ... Computes the epoch when needed. Same request, same answer."""
    check_world_size(world_size, settings)
    if rank >= world_size:
        raise InvalidRequest(f"rank must be < world_size, got rank={rank}, world_size={world_size}")
    idx_n = np.ascontiguousarray(
        await backend.epoch_indices(job_id, epoch, rank, world_size), dtype="<i8"
    )
    n = int(idx_n.shape[0])
    headers = {COUNT_HEADER: str(n), "X-Saelect-Epoch": str(epoch)}
    if wants_json(request.headers.get("accept")):
        metrics.observe_indices("json", n)
        body = indices_json(epoch, rank, world_size, idx_n)
        return Response(body, media_type=JSON, headers=headers)
    metrics.observe_indices("binary", n)
    # a memoryview of the array: Starlette sends it without another 8-bytes-per-index copy
    return Response(memoryview(idx_n), media_type=BINARY, headers=headers)  # type: ignore[arg-type]


@router.get(
    "/{epoch}/weights",
    response_class=Response,
    responses={
        200: {
            "description": "per-sample loss weights aligned with this rank's indices: "
            "little-endian float32 (count in X-Saelect-Count), or JSON with Accept: "
            "application/json. All 1 for policies that do not reweight (only infobatch does).",
            "content": {BINARY: {"schema": {"type": "string", "format": "binary"}}},
        },
        **ERRORS,
    },
)
async def get_weights(
    job_id: JobId,
    epoch: Epoch,
    request: Request,
    backend: BackendDep,
    settings: SettingsDep,
    rank: Annotated[int, Query(ge=0, description="this trainer's rank R")] = 0,
    world_size: Annotated[int, Query(ge=1, description="number of ranks W")] = 1,
) -> Response:
    """Loss weights for rank R's indices of epoch t, position by position (same partition)."""
    check_world_size(world_size, settings)
    if rank >= world_size:
        raise InvalidRequest(f"rank must be < world_size, got rank={rank}, world_size={world_size}")
    w_n = np.ascontiguousarray(
        await backend.epoch_weights(job_id, epoch, rank, world_size), dtype="<f4"
    )
    n = int(w_n.shape[0])
    headers = {COUNT_HEADER: str(n), "X-Saelect-Epoch": str(epoch)}
    if wants_json(request.headers.get("accept")):
        doc = {"epoch": epoch, "rank": rank, "world_size": world_size, "weights": w_n.tolist()}
        return Response(json.dumps(doc).encode(), media_type=JSON, headers=headers)
    return Response(memoryview(w_n), media_type=BINARY, headers=headers)  # type: ignore[arg-type]


def _check_batch(n: int, max_batch: int | None) -> None:
    """413 when a feedback batch of ``n`` samples exceeds ``max_batch`` (None: no limit)."""
    if max_batch is not None and n > max_batch:
        raise PayloadTooLarge(
            f"feedback batch of {n} samples exceeds the service's limit of {max_batch} "
            "(SAELECT_MAX_FEEDBACK_BATCH); send it in several posts"
        )


def parse_feedback(
    content_type: str | None, count: str | None, body: bytes, max_batch: int | None = None
) -> tuple[Any, Any]:
    """Decode a feedback body into (indices int64 (n,), losses float32 (n,)).

    Binary (``application/octet-stream``): n little-endian int64 indices then n float32 losses,
    with n in ``X-Saelect-Count``. JSON: ``{"indices": [...], "losses": [...]}``. A batch above
    ``max_batch`` samples is refused (413) before it is decoded.
    """
    ctype = (content_type or JSON).split(";", 1)[0].strip().lower()
    if ctype == BINARY:
        if count is None or not count.strip().isdigit():
            raise InvalidRequest(f"binary feedback needs a {COUNT_HEADER} header (n >= 0)")
        n = int(count)
        _check_batch(n, max_batch)
        if len(body) != 12 * n:
            raise InvalidRequest(
                f"binary feedback for {n} samples must be {12 * n} bytes (n int64 indices, "
                f"then n float32 losses), got {len(body)}"
            )
        indices = np.frombuffer(body, dtype="<i8", count=n).astype(np.int64)
        losses = np.frombuffer(body, dtype="<f4", count=n, offset=8 * n).astype(np.float32)
    elif ctype == JSON or ctype.endswith("+json"):
        try:
            model = FeedbackModel.model_validate_json(body)
        except ValidationError as exc:
            errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
            raise RequestValidationError(errors) from exc
        _check_batch(max(len(model.indices), len(model.losses)), max_batch)
        if len(model.indices) != len(model.losses):
            raise InvalidRequest(
                f"indices and losses must have equal lengths, got {len(model.indices)} "
                f"and {len(model.losses)}"
            )
        try:
            indices = np.asarray(model.indices, dtype=np.int64)
        except OverflowError as exc:
            raise InvalidRequest("indices must fit in int64") from exc
        losses = np.asarray(model.losses, dtype=np.float32)
    else:
        raise InvalidRequest(f"feedback content type must be {JSON} or {BINARY}, got {ctype!r}")
    if indices.size and int(indices.min()) < 0:
        raise InvalidRequest(f"indices must be >= 0, got {int(indices.min())}")
    if not np.all(np.isfinite(losses)):
        raise InvalidRequest("losses must be finite numbers")
    return indices, losses


@router.post(
    "/{epoch}/feedback",
    response_model=FeedbackAckModel,
    response_model_exclude_none=True,  # an unkeyed post's answer is {"epoch", "count"}
    responses=ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                JSON: {"schema": FeedbackModel.model_json_schema()},
                BINARY: {
                    "schema": {
                        "type": "string",
                        "format": "binary",
                        "description": "n int64 LE indices then n float32 LE losses; "
                        "n in X-Saelect-Count",
                    }
                },
            },
        }
    },
)
async def post_feedback(
    job_id: JobId,
    epoch: Epoch,
    request: Request,
    backend: BackendDep,
    metrics: MetricsDep,
    settings: SettingsDep,
    rank: Annotated[int | None, Query(ge=0, description="sender's rank (with seq)")] = None,
    seq: Annotated[
        int | None, Query(ge=0, description="the post's sequence number in (rank, epoch)")
    ] = None,
) -> FeedbackAckModel:
    """Per-sample losses of epoch t for loss-based policies (409 for policies without).

    With ``rank`` and ``seq`` the post is keyed: a key already applied for this epoch is
    acknowledged (``duplicate: true``) without applying its losses again, so a client may retry
    a post whose answer it lost. Without them every post applies."""
    if (rank is None) != (seq is None):
        raise InvalidRequest("feedback rank and seq go together: give both or neither")
    indices, losses = parse_feedback(
        request.headers.get("content-type"),
        request.headers.get(COUNT_HEADER),
        await request.body(),
        settings.max_feedback_batch,
    )
    n = int(indices.shape[0])
    if rank is None or seq is None:
        await backend.feedback(job_id, epoch, indices, losses)  # a backend without keys too
        applied = True
    else:
        applied = (
            await backend.feedback(job_id, epoch, indices, losses, key=(rank, seq)) is not False
        )
    if applied:
        metrics.observe_feedback(n)
    return FeedbackAckModel(epoch=epoch, count=n, duplicate=None if rank is None else not applied)


@router.get("/{epoch}/stats", response_model=StatsModel, responses=ERRORS)
async def get_stats(job_id: JobId, epoch: Epoch, backend: BackendDep) -> StatsModel:
    """lambda, size, coverage so far, usage min/max/mean, factor coverage of epoch t."""
    return StatsModel.model_validate(await backend.epoch_stats(job_id, epoch))
