"""Named errors raised by a Backend and mapped to 4xx answers by the HTTP app.

Each error carries a stable machine-readable ``code`` and the HTTP ``status`` it maps to. They
take a single message argument and define ``__reduce__``, so they survive pickling across Ray
actor boundaries unchanged.

Example:
    >>> import pickle
    >>> e = pickle.loads(pickle.dumps(UnknownJob("no job 'x'")))
    >>> (type(e).__name__, e.status, e.code, e.message)
    ('UnknownJob', 404, 'unknown_job', "no job 'x'")
"""

from __future__ import annotations


class SaelectError(Exception):
    """Base class of the errors the service reports to its callers."""

    status: int = 400
    code: str = "invalid_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = str(message)

    def __reduce__(self) -> tuple[type[SaelectError], tuple[str]]:
        return (type(self), (self.message,))

    def __str__(self) -> str:
        return self.message


class InvalidRequest(SaelectError):  # noqa: N818 - API names
    """A request value is invalid (bad spec, bad query value, malformed body): 400."""

    status = 400
    code = "invalid_request"


class UnknownJob(SaelectError):  # noqa: N818 - API names
    """No job with that id: 404."""

    status = 404
    code = "unknown_job"


class EpochOutOfRange(SaelectError):  # noqa: N818 - API names
    """The epoch is not in ``[0, epochs)`` of the job's policy: 404."""

    status = 404
    code = "epoch_out_of_range"


class JobNotReady(SaelectError):  # noqa: N818 - API names
    """The job has not finished scoring (or it failed), so it cannot serve epochs yet: 409."""

    status = 409
    code = "job_not_ready"


class FeedbackNotAccepted(SaelectError):  # noqa: N818 - API names
    """The job's policy takes no loss feedback (e.g. ``factor``): 409."""

    status = 409
    code = "feedback_not_accepted"


class Unauthorized(SaelectError):  # noqa: N818 - API names
    """Missing or wrong bearer token: 401."""

    status = 401
    code = "unauthorized"


class PayloadTooLarge(SaelectError):  # noqa: N818 - API names
    """Request body larger than ``settings.max_body_bytes``: 413."""

    status = 413
    code = "payload_too_large"


class TooManyJobs(SaelectError):  # noqa: N818 - API names
    """The service holds ``settings.max_jobs`` live jobs already: 429 (delete one first)."""

    status = 429
    code = "too_many_jobs"


ERRORS: dict[str, type[SaelectError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        UnknownJob,
        EpochOutOfRange,
        JobNotReady,
        FeedbackNotAccepted,
        Unauthorized,
        PayloadTooLarge,
        TooManyJobs,
    )
}
"""Error classes by their wire ``code``."""
