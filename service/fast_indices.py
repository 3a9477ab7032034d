"""The serving fast path: a rank's binary indices of an epoch already in memory, answered
before FastAPI's middleware stack and routing.

Once an epoch is computed, every rank's fetch of it is the same small job: slice the epoch
order, send the bytes. Through FastAPI that costs the middleware stack, route matching, path and
query validation, four dependencies and a ``Response`` object per request, most of the
SelectionActor's event-loop time under load (docs/benchmarks_load.md profiles it).
:class:`FastIndices`, called first by the app for every request (``service.app.SaelectApp``),
answers ``GET /v1/jobs/{id}/epochs/{t}/indices?rank=R&world_size=W`` itself when every check the
route would make passes (the token too) and the backend has the epoch at hand (its optional
``ready_epoch_indices``); anything else, any doubt, goes on to the app unchanged: JSON answers,
unknown or not-ready jobs, epochs still to compute, malformed or extra query parameters, limits,
a missing or wrong token. The bytes, headers and metrics are the route's own
(tests/unit/test_fast_indices.py compares them).
"""

from __future__ import annotations

import re
import time
from typing import Any

import numpy as np
from saelect.service.errors import SaelectError
from saelect.service.metrics import Metrics
from saelect.service.routes import JOB_ID_PATTERN, check_token
from saelect.service.routes.epochs import BINARY, COUNT_HEADER, wants_json
from saelect.service.settings import Settings

__all__ = ["FastIndices", "parse_rank_query"]

PATH = re.compile(
    rf"^/v1/jobs/({JOB_ID_PATTERN.strip('^$')})/epochs/(0|[1-9][0-9]{{0,17}})/indices$"
)
"""The route's path, with the route's own job id pattern and a plain non-negative epoch."""
_INT = re.compile(rb"^(0|[1-9][0-9]{0,17})$")
ROUTE_TEMPLATE = "/v1/jobs/{job_id}/epochs/{epoch}/indices"
COUNT_HEADER_BYTES = COUNT_HEADER.lower().encode()
BINARY_BYTES = BINARY.encode()


def parse_rank_query(query: bytes) -> tuple[int, int] | None:
    """(rank, world_size) of a query string holding at most ``rank`` and ``world_size``, each
    once, as plain decimal integers (defaults 0 and 1, as the route's); None for anything else
    (the route then answers, with its own validation)."""
    values = {b"rank": 0, b"world_size": 1}
    seen: set[bytes] = set()
    if query:
        for part in query.split(b"&"):
            key, sep, value = part.partition(b"=")
            if not sep or key not in values or key in seen or not _INT.match(value):
                return None
            seen.add(key)
            values[key] = int(value)
    return values[b"rank"], values[b"world_size"]


class FastIndices:
    """The fast path, called first by the app (``service.app.SaelectApp``) for every request.

    ``backend.ready_epoch_indices(job_id, epoch, rank, world_size)`` (optional; without it the
    fast path answers nothing) returns int64 (per_rank,) when the job is ready and the epoch is
    in memory, else None. It must not block: it runs on the event loop. The fast path answers
    only requests that carry the right token (when one is set): any other goes to the app,
    whose middleware answers 401.
    """

    def __init__(self, backend: Any, settings: Settings, metrics: Metrics) -> None:
        self.lookup = getattr(backend, "ready_epoch_indices", None)
        self.max_world_size = settings.max_world_size
        self.token = settings.token
        self.enabled = settings.fast_indices and self.lookup is not None
        self.metrics = metrics

    def _answer(self, scope: dict[str, Any]) -> tuple[np.ndarray, int] | None:
        """(the rank's int64 indices, epoch) when the fast path may answer ``scope``."""
        if scope["method"] != "GET":
            return None
        match = PATH.match(scope["path"])
        if match is None:
            return None
        parsed = parse_rank_query(scope.get("query_string", b""))
        if parsed is None:
            return None
        rank, world_size = parsed
        if not 0 <= rank < world_size <= self.max_world_size:
            return None
        accept = authorization = None
        for key, value in scope.get("headers") or ():
            if key == b"accept":
                accept = value.decode("latin-1")
            elif key == b"authorization":
                authorization = value.decode("latin-1")
        if wants_json(accept):
            return None
        if self.token is not None:
            try:
                check_token(self.token, authorization)
            except SaelectError:
                return None  # the app's token middleware answers
        epoch = int(match.group(2))
        assert self.lookup is not None
        idx = self.lookup(match.group(1), epoch, rank, world_size)
        if idx is None:
            return None
        return np.ascontiguousarray(idx, dtype="<i8"), epoch

    def response(self, scope: dict[str, Any]) -> tuple[list[tuple[bytes, bytes]], bytes] | None:
        """The route's headers and body for ``scope`` when the fast path may answer it (the
        request is then counted in the metrics), else None."""
        if not self.enabled or scope["type"] != "http":
            return None
        start = time.perf_counter()
        answer = self._answer(scope)
        if answer is None:
            return None
        idx, epoch = answer
        n = int(idx.shape[0])
        body = idx.tobytes()
        headers = [  # the route's headers, in the order Starlette's Response writes them
            (COUNT_HEADER_BYTES, str(n).encode()),
            (b"x-saelect-epoch", str(epoch).encode()),
            (b"content-length", str(len(body)).encode()),
            (b"content-type", BINARY_BYTES),
        ]
        self.metrics.observe_indices("binary", n)
        self.metrics.observe_request("GET", ROUTE_TEMPLATE, 200, time.perf_counter() - start)
        return headers, body

    async def answer(self, scope: dict[str, Any], send: Any) -> bool:
        """Send the answer to ``scope`` and return True, or return False (nothing sent)."""
        answer = self.response(scope)
        if answer is None:
            return False
        headers, body = answer
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return True
