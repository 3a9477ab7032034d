"""Errors raised by the saelect client."""

from __future__ import annotations


class SelectionError(Exception):
    """The service answered with an error (or could not be reached after retries).

    Attributes
    ----------
    status:
        HTTP status (0 when the server could not be reached).
    code:
        The server's machine-readable code (``unknown_job``, ``epoch_out_of_range``...).
    message:
        The server's human-readable message.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


class JobFailedError(SelectionError):
    """``wait_ready`` saw the job reach phase ``failed``; ``message`` is the job's error."""
