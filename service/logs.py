"""Logging of the service process and the command line, configured from the environment.

``SAELECT_LOG_LEVEL`` (default ``INFO``) sets the level of saelect's own loggers (``service``,
``workers``, ``client``); ``SAELECT_LOG_FORMAT=json`` writes one JSON object per line (``ts``,
``level``, ``logger``, ``message``, ``job`` when the line names one, ``exc`` with a traceback),
anything else plain text. HTTP client libraries log at WARNING (one INFO line per request is
noise). No colour codes are written: the formatter has none, and when stdout is not a terminal
the driver's copies of Ray worker lines lose theirs too (``RAY_COLOR_PREFIX=0``).

Example:
    >>> import io, json, logging
    >>> buf = io.StringIO()
    >>> configure_logging(level="INFO", fmt="json", stream=buf)
    >>> logging.getLogger("saelect.service.jobs").info("job %s: deleted", "a-1")
    >>> json.loads(buf.getvalue())["job"]
    'a-1'
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import IO, Any

LEVEL_ENV = "SAELECT_LOG_LEVEL"
FORMAT_ENV = "SAELECT_LOG_FORMAT"
OWN_LOGGERS = ("saelect",)
"""The top-level logger of saelect (every module logs below it); its level is the one configured."""
QUIET_LOGGERS = ("httpx", "httpcore")
"""Libraries that log every request at INFO; kept at WARNING."""
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_NAME = "saelect"
_JOB = re.compile(r"^job ([A-Za-z0-9_-]{1,128})(?=[:\s]|$)")
"""The job manager's lines start with ``job <id>:`` or ``job <id> ...``."""


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (UTC ISO 8601), ``level``, ``logger``, ``message``,
    ``job`` (the id of a ``"job <id> ..."`` line) and ``exc`` (a traceback) when present."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        doc: dict[str, Any] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        job = _JOB.match(message)
        if job:
            doc["job"] = job.group(1)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at each record (as logging's last resort does)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, _: IO[str]) -> None:
        pass


def configure_logging(
    *, level: str | None = None, fmt: str | None = None, stream: IO[str] | None = None
) -> None:
    """Install one root handler and set saelect's level (idempotent: a second call replaces it).

    saelect's loggers propagate to the root logger's handler, so each line is written once and
    other handlers on the root (pytest's ``caplog``) see it too; other libraries keep the root's
    level (WARNING unless set).

    Parameters
    ----------
    level:
        A logging level name; default ``SAELECT_LOG_LEVEL`` or ``INFO``.
    fmt:
        ``json`` or ``text``; default ``SAELECT_LOG_FORMAT`` or ``text``.
    stream:
        Where lines go (default stderr; under Ray, the worker's log file, which
        ``log_to_driver`` copies to the driver's terminal).

    Raises
    ------
    ValueError
        For an unknown level name.
    """
    name = (level or os.environ.get(LEVEL_ENV) or "INFO").strip().upper()
    numeric = logging.getLevelName(name)
    if not isinstance(numeric, int):
        raise ValueError(f"{LEVEL_ENV} must be a logging level name, got {name!r}")
    kind = (fmt or os.environ.get(FORMAT_ENV) or "text").strip().lower()
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if kind == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    for logger_name in OWN_LOGGERS:
        logging.getLogger(logger_name).setLevel(numeric)
    for logger_name in QUIET_LOGGERS:
        logging.getLogger(logger_name).setLevel(logging.WARNING)
    if not is_terminal(sys.stdout):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # read by Ray when it prints worker lines


def quiet_http_logs() -> None:
    """HTTP client libraries at WARNING, where a process's logging is set up by someone else
    (a Ray Train worker): no line per request."""
    for logger_name in QUIET_LOGGERS:
        logging.getLogger(logger_name).setLevel(logging.WARNING)


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is a terminal (False for files, pipes and closed streams)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
