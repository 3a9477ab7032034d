"""Bad requests to a ready ``factor`` job and the one answer each gets (docs/api.md, Errors).

The route unit tests (`tests/unit/test_routes.py`, a fake backend) and the integration test
(`tests/integration/test_service_ray.py`, the real service on local Ray) both walk this table and
assert the exact status and code, so one bad input has one answer everywhere;
`test_routes.py::test_error_table_in_the_docs_matches_the_error_classes` ties the statuses to the
table in docs/api.md.

Example:
    >>> [r.status for r in bad_requests("job-0", epochs=4) if r.path.endswith("/-1/indices")]
    [400]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

BIG_EPOCH = 10**9
"""An epoch far beyond any job's epochs: 404 ``epoch_out_of_range``, like any t >= epochs."""
HUGE_EPOCH = 2**70
"""An epoch that does not fit in int64: still 404 ``epoch_out_of_range``, never a 500."""
MAX_WORLD_SIZE = 65536
"""``Settings.max_world_size``'s default."""
MAX_EPOCHS = 100_000
"""``Settings.max_epochs``'s default."""
MAX_FEEDBACK_BATCH = 4 * 1024 * 1024
"""``Settings.max_feedback_batch``'s default."""


@dataclass(frozen=True)
class BadRequest:
    """One bad request and its answer."""

    method: str
    path: str
    """Absolute path, ``/v1/...``."""
    status: int
    code: str
    fragment: str
    """Lower-case text the error message must contain."""
    params: dict[str, Any] = field(default_factory=dict)
    json: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    """A raw body (with ``headers`` giving its type), instead of ``json``."""

    @property
    def label(self) -> str:
        """``METHOD path?params`` for assertion messages and test ids."""
        query = "&".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.method} {self.path}" + (f"?{query}" if query else "")


def bad_requests(job: str, *, epochs: int, spec: dict[str, Any] | None = None) -> list[BadRequest]:
    """The table for ``job``, a ready ``factor`` job with ``epochs`` epochs, on a service with
    the default limits (``service.settings.Settings``); with ``spec``, a valid job spec, also
    the creation of a job past the epochs limit."""
    base = f"/v1/jobs/{job}"
    ok_feedback = {"indices": [0, 1], "losses": [0.1, 0.2]}
    over_batch = {
        "Content-Type": "application/octet-stream",
        "X-Saelect-Count": str(MAX_FEEDBACK_BATCH + 1),
    }
    limits = [
        # the service's limits (Settings.max_*): 400 for a value, 413 for a batch
        BadRequest(
            "GET",
            f"{base}/epochs/0/indices",
            400,
            "invalid_request",
            "max_world_size",
            {"rank": 0, "world_size": MAX_WORLD_SIZE + 1},
        ),
        BadRequest(
            "GET",
            f"{base}/epochs/0/weights",
            400,
            "invalid_request",
            "max_world_size",
            {"rank": 0, "world_size": MAX_WORLD_SIZE + 1},
        ),
        BadRequest(
            "GET",
            f"{base}/plan",
            400,
            "invalid_request",
            "max_world_size",
            {"world_size": MAX_WORLD_SIZE + 1},
        ),
        BadRequest(
            "POST",
            f"{base}/epochs/0/feedback",
            413,
            "payload_too_large",
            "max_feedback_batch",
            headers=over_batch,
            content=b"",
        ),
    ]
    if spec is not None:
        policy = {**spec["policy"], "epochs": MAX_EPOCHS + 1}
        limits.append(
            BadRequest(
                "POST",
                "/v1/jobs",
                400,
                "invalid_request",
                "max_epochs",
                json={**spec, "policy": policy},
            )
        )
    return [
        # 400 invalid_request: a bad value
        BadRequest("GET", f"{base}/epochs/0/indices", 400, "invalid_request", "rank",
                   {"rank": 2, "world_size": 2}),
        BadRequest("GET", f"{base}/epochs/0/indices", 400, "invalid_request", "world_size",
                   {"rank": 0, "world_size": 0}),
        BadRequest("GET", f"{base}/epochs/0/indices", 400, "invalid_request", "rank",
                   {"rank": -1, "world_size": 2}),
        BadRequest("GET", f"{base}/epochs/0/indices", 400, "invalid_request", "rank",
                   {"rank": "a"}),
        BadRequest("GET", f"{base}/epochs/-1/indices", 400, "invalid_request", "epoch"),
        BadRequest("GET", f"{base}/epochs/x/indices", 400, "invalid_request", "epoch"),
        BadRequest("GET", f"{base}/epochs/-1/weights", 400, "invalid_request", "epoch"),
        BadRequest("GET", f"{base}/epochs/-3/stats", 400, "invalid_request", "epoch"),
        BadRequest("POST", f"{base}/epochs/-1/feedback", 400, "invalid_request", "epoch",
                   json=ok_feedback),
        BadRequest("GET", f"{base}/epochs/0/weights", 400, "invalid_request", "rank",
                   {"rank": 3, "world_size": 3}),
        BadRequest("GET", f"{base}/plan", 400, "invalid_request", "world_size",
                   {"world_size": 0}),
        BadRequest("GET", "/v1/jobs/a.b", 400, "invalid_request", "job_id"),
        # 404 epoch_out_of_range: t >= epochs, however large
        BadRequest("GET", f"{base}/epochs/{epochs}/indices", 404, "epoch_out_of_range",
                   f"epoch {epochs}"),
        BadRequest("GET", f"{base}/epochs/{BIG_EPOCH}/indices", 404, "epoch_out_of_range",
                   f"epoch {BIG_EPOCH}"),
        BadRequest("GET", f"{base}/epochs/{HUGE_EPOCH}/indices", 404, "epoch_out_of_range",
                   f"epoch {HUGE_EPOCH}"),
        BadRequest("GET", f"{base}/epochs/{BIG_EPOCH}/weights", 404, "epoch_out_of_range",
                   f"epoch {BIG_EPOCH}"),
        BadRequest("GET", f"{base}/epochs/{BIG_EPOCH}/stats", 404, "epoch_out_of_range",
                   f"epoch {BIG_EPOCH}"),
        BadRequest("POST", f"{base}/epochs/{BIG_EPOCH}/feedback", 404, "epoch_out_of_range",
                   f"epoch {BIG_EPOCH}", json=ok_feedback),
        # 404 unknown_job, not_found
        BadRequest("GET", "/v1/jobs/no-such-job", 404, "unknown_job", "no-such-job"),
        BadRequest("GET", "/v1/jobs/no-such-job/epochs/0/indices", 404, "unknown_job",
                   "no-such-job"),
        BadRequest("GET", "/v2/nothing", 404, "not_found", "not found"),
        # 405, 409
        BadRequest("PUT", "/v1/jobs", 405, "method_not_allowed", "method"),
        BadRequest("POST", f"{base}/epochs/0/feedback", 409, "feedback_not_accepted", "factor",
                   json=ok_feedback),
        *limits,
    ]  # fmt: skip
