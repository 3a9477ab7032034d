"""The token and the limits on the app over the FakeBackend (no Ray): the token is compared in
constant time and never leaks into logs or answers; world size, epochs, feedback batch and live
jobs are bounded by settings (docs/api.md, Authentication and Errors)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import saelect.service.routes as service_routes
from fastapi.testclient import TestClient
from saelect.service.app import create_app
from saelect.service.settings import Settings

from tests import bad_requests
from tests.unit.fakes import FakeBackend
from tests.unit.test_routes import SPEC, _clean_env, assert_error  # noqa: F401 (autouse)

TOKEN = "tok-Zq8v3-never-print-me"


def client_for(tmp_path: Path, **overrides: Any) -> tuple[TestClient, FakeBackend]:
    backend = FakeBackend(1000)
    kw: dict[str, Any] = {"store": str(tmp_path / "store"), "allowed_roots": [str(tmp_path)]}
    kw.update(overrides)
    return TestClient(create_app(backend, Settings(**kw)), raise_server_exceptions=False), backend


def test_the_table_of_bad_requests_uses_the_default_limits() -> None:
    s = Settings()
    assert s.max_world_size == bad_requests.MAX_WORLD_SIZE
    assert s.max_epochs == bad_requests.MAX_EPOCHS
    assert s.max_feedback_batch == bad_requests.MAX_FEEDBACK_BATCH


def test_token_is_compared_with_compare_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every token check goes through hmac.compare_digest (constant time), never ``==``."""
    calls: list[tuple[bytes, bytes]] = []

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return a == b

    monkeypatch.setattr(service_routes.hmac, "compare_digest", spy)
    client, _ = client_for(tmp_path, api_token=TOKEN)
    for path in ("/v1/jobs", "/metrics", "/openapi.json"):
        for token, status in ((TOKEN, 200), (TOKEN[:-1], 401), (TOKEN + "x", 401)):
            before = len(calls)
            r = client.get(path, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == status, (path, token)
            assert calls[before:], path  # the middleware's check and the route's
            assert set(calls[before:]) == {(token.encode(), TOKEN.encode())}, path


def test_token_never_reaches_logs_or_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Good, wrong, and malformed tokens on every kind of route, errors included: the token
    appears in no log record, no answer body and no answer header."""
    caplog.set_level(logging.DEBUG)
    client, backend = client_for(tmp_path, api_token=TOKEN)
    good = {"Authorization": f"Bearer {TOKEN}"}
    job = client.post("/v1/jobs", json=SPEC, headers=good).json()["id"]
    answers = []
    for headers in (
        good,
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
        {},
    ):
        for method, path in (
            ("GET", "/healthz"),
            ("GET", "/metrics"),
            ("GET", "/docs"),
            ("GET", "/openapi.json"),
            ("GET", "/v1/jobs"),
            ("GET", f"/v1/jobs/{job}"),
            ("GET", f"/v1/jobs/{job}/epochs/0/indices"),
            ("GET", f"/v1/jobs/{job}/epochs/99/indices"),
            ("GET", "/v1/jobs/no-such-job"),
            ("POST", f"/v1/jobs/{job}/epochs/0/feedback"),
        ):
            answers.append(client.request(method, path, headers=headers))
    assert {r.status_code for r in answers} >= {200, 401, 404}
    for r in answers:
        assert TOKEN not in r.text, r.request.url
        assert all(TOKEN not in v for v in r.headers.values()), r.request.url
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(Settings(api_token=TOKEN))
    assert TOKEN not in repr(backend.jobs[job].spec)


def test_live_jobs_are_bounded(tmp_path: Path) -> None:
    """Past max_jobs live jobs a create is 429; failed jobs do not count; deleting frees one."""
    client, backend = client_for(tmp_path, max_jobs=2)
    first = client.post("/v1/jobs", json=SPEC).json()["id"]
    second = client.post("/v1/jobs", json=SPEC).json()["id"]
    assert_error(client.post("/v1/jobs", json=SPEC), 429, "too_many_jobs", "saelect_max_jobs")
    assert len(backend.jobs) == 2  # the refused job was not created
    backend.set_phase(first, "failed", "boom")
    third = client.post("/v1/jobs", json=SPEC)
    assert third.status_code == 202
    assert_error(client.post("/v1/jobs", json=SPEC), 429, "too_many_jobs")
    assert client.delete(f"/v1/jobs/{second}").status_code == 204
    assert client.post("/v1/jobs", json=SPEC).status_code == 202


def test_limits_follow_the_settings(tmp_path: Path) -> None:
    """Each limit answers its one status at limit + 1 and serves at the limit."""
    client, _ = client_for(tmp_path, max_world_size=4, max_epochs=5, max_feedback_batch=3)
    over = {**SPEC, "policy": {**SPEC["policy"], "epochs": 6}}
    assert_error(client.post("/v1/jobs", json=over), 400, "invalid_request", "max_epochs")
    at = {**SPEC, "policy": {**SPEC["policy"], "name": "ucb", "epochs": 5}}
    job = client.post("/v1/jobs", json=at).json()["id"]
    for path in ("epochs/0/indices", "epochs/0/weights", "plan"):
        url = f"/v1/jobs/{job}/{path}"
        assert client.get(url, params={"world_size": 4}).status_code == 200, path
        r = client.get(url, params={"world_size": 5})
        assert_error(r, 400, "invalid_request", "max_world_size")
    fb = f"/v1/jobs/{job}/epochs/0/feedback"
    ok = client.post(fb, json={"indices": [1, 2, 3], "losses": [0.1, 0.2, 0.3]})
    assert ok.status_code == 200, ok.text
    r = client.post(fb, json={"indices": [1, 2, 3, 4], "losses": [0.1, 0.2, 0.3, 0.4]})
    assert_error(r, 413, "payload_too_large", "max_feedback_batch")
    body = np.arange(4, dtype="<i8").tobytes() + np.ones(4, dtype="<f4").tobytes()
    headers = {"Content-Type": "application/octet-stream", "X-Saelect-Count": "4"}
    r = client.post(fb, content=body, headers=headers)
    assert_error(r, 413, "payload_too_large", "max_feedback_batch")


# --- regressions found by schemathesis (tests/unit/test_api_fuzz.py) --------------------------


def test_no_token_gets_401_before_the_body_is_parsed(tmp_path: Path) -> None:
    """Found by schemathesis: an unauthenticated POST with a malformed or oversized body got
    400 ``malformed_json`` (with the parser's message) instead of 401."""
    client, backend = client_for(tmp_path, api_token=TOKEN)
    json_type = {"Content-Type": "application/json"}
    for path in ("/v1/jobs", "/v1/jobs/x/epochs/0/feedback"):
        r = client.post(path, content=b"{not json", headers=json_type)
        assert_error(r, 401, "unauthorized", "missing")
        assert r.headers["www-authenticate"] == "Bearer"
        r = client.post(path, content=b"[]", headers={**json_type, "Authorization": "Bearer x"})
        assert_error(r, 401, "unauthorized", "invalid")
    assert backend.calls == {}
    r = client.post(
        "/v1/jobs", content=b"{not json", headers={**json_type, "Authorization": f"Bearer {TOKEN}"}
    )
    assert_error(r, 400, "malformed_json")


def test_405_lists_every_method_of_the_path(tmp_path: Path) -> None:
    """Found by schemathesis: ``OPTIONS /v1/jobs`` answered ``Allow: POST`` though the path
    also serves GET (Starlette lists the first matching route's methods)."""
    client, _ = client_for(tmp_path)
    r = client.options("/v1/jobs")
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "GET, POST"
    r = client.put("/v1/jobs/abc")
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "DELETE, GET"
