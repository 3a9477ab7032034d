"""Logging from the environment: level, JSON lines with the job id, httpx kept at WARNING, no
colour codes, one handler however often it is configured."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from saelect.service.logs import FORMAT_ENV, LEVEL_ENV, configure_logging


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers = list(root.handlers)
    levels = {n: logging.getLogger(n).level for n in ("service", "workers", "client", "httpx")}
    yield
    root.handlers[:] = handlers
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_json_lines_carry_level_logger_and_job_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LEVEL_ENV, "debug")
    monkeypatch.setenv(FORMAT_ENV, "json")
    buf = io.StringIO()
    configure_logging(stream=buf)
    configure_logging(stream=buf)  # idempotent: still one handler, one line per record
    log = logging.getLogger("saelect.service.jobs")
    log.debug("job %s: epoch %d selected (%d samples, %.3f s)", "fm-1a2b", 3, 300, 0.01)
    try:
        raise KeyError("column")
    except KeyError:
        log.exception("job %s failed", "fm-1a2b")
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [d["level"] for d in lines] == ["DEBUG", "ERROR"]
    assert {d["job"] for d in lines} == {"fm-1a2b"} and {d["logger"] for d in lines} == {
        "saelect.service.jobs"
    }
    assert lines[0]["message"] == "job fm-1a2b: epoch 3 selected (300 samples, 0.010 s)"
    assert "KeyError: 'column'" in lines[1]["exc"] and lines[1]["ts"].endswith("Z")


def test_text_lines_at_the_level_set_with_http_logs_quiet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(FORMAT_ENV, raising=False)
    monkeypatch.setenv(LEVEL_ENV, "WARNING")
    buf = io.StringIO()
    configure_logging(stream=buf)
    logging.getLogger("saelect.service.jobs").info("job a: created")  # below the level
    logging.getLogger("saelect.service.jobs").warning("job a: shard actor failure")
    configure_logging(level="INFO", stream=buf)
    logging.getLogger("httpx").info('HTTP Request: GET http://x "HTTP/1.1 200 OK"')
    logging.getLogger("saelect.workers.pipeline").info("encoding 10/10")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith("WARNING saelect.service.jobs: job a: shard actor failure")
    assert lines[1].endswith("INFO saelect.workers.pipeline: encoding 10/10")
    assert "\x1b[" not in buf.getvalue()


def test_an_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="SAELECT_LOG_LEVEL"):
        configure_logging(level="chatty", stream=io.StringIO())
