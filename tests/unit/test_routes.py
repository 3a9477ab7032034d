"""The HTTP app over an in-memory FakeBackend (no Ray): every route of docs/api.md, every
documented error, auth, body limits, and the binary/JSON index formats."""

from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from saelect.service import errors
from saelect.service.app import create_app
from saelect.service.backend import Backend
from saelect.service.settings import Settings
from saelect.service.specs import JobSpec
from saelect.workers.admission import ScoringResources

from tests.bad_requests import BadRequest, bad_requests
from tests.unit.fakes import FakeBackend

N = 1000
SPEC: dict[str, Any] = {
    "name": "fmnist-factor",
    "dataset": {
        "uri": "data/train.parquet",  # relative: resolved under the allowed root (tmp dir)
        "label_column": "label",
        "feature": {"kind": "pixels", "column": "image", "dim": 16},
    },
    "policy": {"name": "factor", "ratio": 0.3, "epochs": 4, "seed": 1, "params": {}},
    "sae": {"units": 64, "k": 8},
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("SAELECT_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


JSON_TYPE = "application/json"


def make_client(
    tmp_path: Path, backend: Backend | None = None, **overrides: Any
) -> tuple[TestClient, Any]:
    backend = backend if backend is not None else FakeBackend(N)
    kw: dict[str, Any] = {"store": str(tmp_path / "store"), "allowed_roots": [str(tmp_path)]}
    kw.update(overrides)
    app = create_app(backend, Settings(**kw))
    return TestClient(app, raise_server_exceptions=False), backend


def spec(**policy: Any) -> dict[str, Any]:
    s = copy.deepcopy(SPEC)
    s["policy"].update(policy)
    return s


def create(client: TestClient, body: dict[str, Any] | None = None, **headers: str) -> str:
    r = client.post("/v1/jobs", json=body or SPEC, headers=headers)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def assert_error(r: Any, status: int, code: str, fragment: str = "") -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code, body
    assert fragment.lower() in body["error"]["message"].lower(), body


def decode(r: Any) -> np.ndarray:
    assert r.headers["content-type"] == "application/octet-stream"
    arr = np.frombuffer(r.content, dtype="<i8")
    assert int(r.headers["x-saelect-count"]) == arr.shape[0]
    return arr


# --- health, metrics, docs ---------------------------------------------------------------


def test_healthz_is_open_metrics_and_docs_need_the_token(tmp_path: Path) -> None:
    """With a token set, only /healthz answers without it by default (docs/api.md)."""
    client, _ = make_client(tmp_path, api_token="s3cret")
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    good = {"Authorization": "Bearer s3cret"}
    for path in ("/metrics", "/docs", "/redoc", "/openapi.json"):
        assert_error(client.get(path), 401, "unauthorized")
        assert client.get(path, headers=good).status_code == 200, path
    opened, _ = make_client(tmp_path, api_token="s3cret", metrics_open=True, docs_open=True)
    for path in ("/metrics", "/docs", "/redoc", "/openapi.json"):
        assert opened.get(path).status_code == 200, path
    assert_error(opened.get("/v1/jobs"), 401, "unauthorized")
    paths = opened.get("/openapi.json").json()["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}/epochs/{epoch}/indices", "/healthz"} <= set(paths)


def test_metrics_count_requests_indices_and_phases(tmp_path: Path) -> None:
    client, backend = make_client(tmp_path)
    job = create(client)
    create(client)
    backend.set_phase(job, "failed", "boom")
    ok = create(client)
    for _ in range(3):
        client.get(f"/v1/jobs/{ok}/epochs/0/indices", params={"rank": 0, "world_size": 2})
    client.get("/v1/jobs/nope")
    text = client.get("/metrics").text
    route = "/v1/jobs/{job_id}/epochs/{epoch}/indices"
    assert f'saelect_http_requests_total{{method="GET",route="{route}",status="200"}} 3' in text
    assert 'route="/v1/jobs/{job_id}",status="404"} 1' in text
    assert f'saelect_http_request_duration_seconds_count{{route="{route}"}} 3' in text
    assert 'saelect_epoch_index_responses_total{format="binary"} 3' in text
    assert f"saelect_indices_served_total {3 * 150}" in text
    assert 'saelect_jobs{phase="failed"} 1' in text and 'saelect_jobs{phase="ready"} 2' in text


# --- jobs ---------------------------------------------------------------------------------


def test_scoring_section_reaches_the_spec(tmp_path: Path) -> None:
    client, backend = make_client(tmp_path, backend=FakeBackend(N, ready=False))
    body = {**SPEC, "scoring": {"gpus": 2, "placement_timeout_s": 30}}
    spec = backend.jobs[client.post("/v1/jobs", json=body).json()["id"]].spec
    assert spec.scoring == ScoringResources(gpus=2, placement_timeout_s=30.0)
    assert JobSpec.from_dict(spec.to_dict()) == spec


def test_job_lifecycle(tmp_path: Path) -> None:
    client, backend = make_client(tmp_path, backend=FakeBackend(N, ready=False))
    r = client.post("/v1/jobs", json=SPEC)
    assert r.status_code == 202
    body = r.json()
    assert body["phase"] == "pending" and body["name"] == "fmnist-factor"
    job = body["id"]
    assert r.headers["location"] == f"/v1/jobs/{job}"
    created = backend.jobs[job].spec
    assert created.dataset.uri == str(tmp_path / "data" / "train.parquet")  # canonical path
    assert created.policy.ratio == 0.3 and created.sae.units == 64 and created.sae.k == 8
    assert created.scoring == ScoringResources()  # no scoring section: the defaults

    assert_error(client.get(f"/v1/jobs/{job}/plan"), 409, "job_not_ready")
    assert_error(client.get(f"/v1/jobs/{job}/epochs/0/indices"), 409, "job_not_ready")
    backend.set_phase(job, "ready")
    status = client.get(f"/v1/jobs/{job}").json()
    assert status == {
        "id": job,
        "name": "fmnist-factor",
        "phase": "ready",
        "progress": {"done": 1, "total": 1},
        "num_samples": N,
        "epochs_committed": 0,
        "error": None,
        "reason": None,
    }
    assert [j["id"] for j in client.get("/v1/jobs").json()["jobs"]] == [job]
    client.get(f"/v1/jobs/{job}/epochs/2/indices")
    assert client.get(f"/v1/jobs/{job}").json()["epochs_committed"] == 3

    r = client.delete(f"/v1/jobs/{job}")
    assert r.status_code == 204 and r.content == b""
    assert_error(client.get(f"/v1/jobs/{job}"), 404, "unknown_job", job)
    assert_error(client.delete(f"/v1/jobs/{job}"), 404, "unknown_job")
    assert client.get("/v1/jobs").json() == {"jobs": []}


def test_failed_job_reports_its_error(tmp_path: Path) -> None:
    client, backend = make_client(tmp_path)
    job = create(client)
    backend.set_phase(job, "queued", reason="waits for 2 x {CPU: 1} to score")
    body = client.get(f"/v1/jobs/{job}").json()
    assert body["phase"] == "queued" and body["reason"] == "waits for 2 x {CPU: 1} to score"
    backend.set_phase(job, "failed", "dataset path does not exist")
    body = client.get(f"/v1/jobs/{job}").json()
    assert body["phase"] == "failed" and body["error"] == "dataset path does not exist"


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda s: s["policy"].update(ratio=0), "policy.ratio"),
        (lambda s: s["policy"].update(ratio=1.5), "policy.ratio"),
        (lambda s: s["policy"].update(epochs=0), "policy.epochs"),
        (lambda s: s["policy"].update(name="nosuch"), "nosuch"),
        (lambda s: s["policy"].pop("ratio"), "policy.ratio"),
        (lambda s: s.pop("dataset"), "dataset"),
        (lambda s: s["dataset"]["feature"].update(kind="audio"), "kind"),
        (lambda s: s["dataset"]["feature"].update(dim=0), "dim"),
        (lambda s: s["sae"].update(bogus=1), "bogus"),
        (lambda s: s["sae"].update(k=0), "sae.k"),
        (lambda s: s.update(extra_field=1), "extra_field"),
        (lambda s: s.update(name=""), "name"),
        (lambda s: s.update(scoring={"gpus": -1}), "scoring.gpus"),
        (lambda s: s.update(scoring={"placement_timeout_s": 0}), "scoring.placement_timeout_s"),
        (lambda s: s.update(scoring={"nodes": 3}), "nodes"),
    ],
)
def test_invalid_specs_are_400(tmp_path: Path, mutate: Any, fragment: str) -> None:
    client, backend = make_client(tmp_path)
    body = copy.deepcopy(SPEC)
    mutate(body)
    assert_error(client.post("/v1/jobs", json=body), 400, "invalid_request", fragment)
    assert backend.jobs == {}


def test_malformed_and_non_object_json(tmp_path: Path) -> None:
    client, _ = make_client(tmp_path)
    headers = {"content-type": "application/json"}
    r = client.post("/v1/jobs", content=b'{"name": "x", ', headers=headers)
    assert_error(r, 400, "malformed_json", "json")
    assert_error(
        client.post("/v1/jobs", content=b"[1, 2]", headers=headers), 400, "invalid_request"
    )
    assert_error(client.post("/v1/jobs"), 400, "invalid_request", "body")


@pytest.mark.parametrize(
    "uri",
    [
        "../outside.parquet",
        "data/../../etc/passwd",
        "{tmp}/data/../x.parquet",
        "file://{tmp}/../x.parquet",
        "s3://bucket/../x",
    ],
)
def test_dotdot_uris_refused(tmp_path: Path, uri: str) -> None:
    client, backend = make_client(tmp_path)
    body = copy.deepcopy(SPEC)
    body["dataset"]["uri"] = uri.format(tmp=tmp_path)
    assert_error(client.post("/v1/jobs", json=body), 400, "invalid_request", "'..'")
    assert backend.jobs == {}


@pytest.mark.parametrize("uri", ["/etc/passwd", "s3://bucket/data", "file:///etc/hosts"])
def test_uris_outside_allowed_roots_refused(tmp_path: Path, uri: str) -> None:
    client, _ = make_client(tmp_path)
    body = copy.deepcopy(SPEC)
    body["dataset"]["uri"] = uri
    assert_error(client.post("/v1/jobs", json=body), 400, "invalid_request", "allowed")


def test_symlink_escaping_the_root_refused(tmp_path: Path) -> None:
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (tmp_path / "link").symlink_to(outside)
    client, _ = make_client(tmp_path)
    body = copy.deepcopy(SPEC)
    body["dataset"]["uri"] = str(tmp_path / "link" / "x.parquet")
    assert_error(client.post("/v1/jobs", json=body), 400, "invalid_request", "allowed")


def test_allowed_uri_forms(tmp_path: Path) -> None:
    client, backend = make_client(tmp_path, allowed_roots=[str(tmp_path), "s3://bucket/datasets"])
    for uri, expected in [
        (f"file://{tmp_path}/a.parquet", str(tmp_path / "a.parquet")),
        ("s3://bucket/datasets/fmnist", "s3://bucket/datasets/fmnist"),
        (str(tmp_path), str(tmp_path)),
    ]:
        body = copy.deepcopy(SPEC)
        body["dataset"]["uri"] = uri
        job = create(client, body)
        assert backend.jobs[job].spec.dataset.uri == expected
    body["dataset"]["uri"] = "s3://bucket/datasets-other/x"  # prefix, not a parent dir
    assert_error(client.post("/v1/jobs", json=body), 400, "invalid_request", "allowed")


def test_module_feature_needs_allow_list(tmp_path: Path) -> None:
    body = copy.deepcopy(SPEC)
    body["dataset"]["feature"] = {"kind": "module", "column": "image", "module": "mypkg.enc:make"}
    client, _ = make_client(tmp_path)
    assert_error(client.post("/v1/jobs", json=body), 400, "invalid_request", "allow-listed")
    client, _ = make_client(tmp_path, allowed_modules=["otherpkg", "mypkg.encoder"])
    assert_error(client.post("/v1/jobs", json=body), 400, "invalid_request", "allow-listed")
    for allowed in (["mypkg"], ["mypkg.enc"], ["mypkg.enc:make"]):
        client, backend = make_client(tmp_path, allowed_modules=allowed)
        job = create(client, body)
        assert backend.jobs[job].spec.dataset.feature.module == "mypkg.enc:make"
    body["dataset"]["feature"].pop("module")
    assert_error(client.post("/v1/jobs", json=body), 400, "invalid_request", "module")


@pytest.mark.parametrize("bad_id", ["a.b", "a~b", "x" * 200])
def test_bad_job_ids_are_400(tmp_path: Path, bad_id: str) -> None:
    client, _ = make_client(tmp_path)
    assert_error(client.get(f"/v1/jobs/{bad_id}"), 400, "invalid_request", "job_id")


# --- plan and indices ---------------------------------------------------------------------


def test_plan(tmp_path: Path) -> None:
    client, _ = make_client(tmp_path)
    job = create(client)
    plan = client.get(f"/v1/jobs/{job}/plan", params={"world_size": 7}).json()
    assert plan["world_size"] == 7
    assert [e["epoch"] for e in plan["epochs"]] == [0, 1, 2, 3]
    assert all(e["size"] == 300 and e["per_rank"] == 43 for e in plan["epochs"])
    assert plan["sample_fraction"] == pytest.approx(0.3)
    assert client.get(f"/v1/jobs/{job}/plan").json()["world_size"] == 1
    for ws in ("0", "-1", "x"):
        r = client.get(f"/v1/jobs/{job}/plan", params={"world_size": ws})
        assert_error(r, 400, "invalid_request", "world_size")
    assert_error(client.get("/v1/jobs/nope/plan"), 404, "unknown_job")


def test_binary_and_json_agree_and_repeat_identically(tmp_path: Path) -> None:
    client, backend = make_client(tmp_path)
    job = create(client)
    url = f"/v1/jobs/{job}/epochs/1/indices"
    params = {"rank": 1, "world_size": 3}
    first = client.get(url, params=params)
    binary = decode(first)
    assert first.headers["x-saelect-epoch"] == "1"
    r = client.get(url, params=params, headers={"Accept": "application/json"})
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"epoch": 1, "rank": 1, "world_size": 3, "indices": binary.tolist()}
    for _ in range(3):
        assert client.get(url, params=params).content == first.content
    wildcard = client.get(url, params=params, headers={"Accept": "*/*"})
    assert wildcard.content == first.content
    prefer_binary = {"Accept": "application/octet-stream, application/json"}
    assert client.get(url, params=params, headers=prefer_binary).content == first.content
    order = backend.epoch_order(backend.jobs[job].spec, 1)
    assert binary.tolist() == np.resize(order, 3 * 100)[1::3].tolist()


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(world_size=st.integers(1, 40), epoch=st.integers(0, 3))
def test_ranks_partition_the_epoch(tmp_path: Path, world_size: int, epoch: int) -> None:
    """Every rank has the same length, ranks jointly cover the epoch, padding repeats the head."""
    client, backend = make_client(tmp_path)
    job = create(client)
    parts = [
        decode(
            client.get(
                f"/v1/jobs/{job}/epochs/{epoch}/indices",
                params={"rank": r, "world_size": world_size},
            )
        )
        for r in range(world_size)
    ]
    per_rank = client.get(f"/v1/jobs/{job}/plan", params={"world_size": world_size}).json()
    assert {len(p) for p in parts} == {per_rank["epochs"][epoch]["per_rank"]}
    order = backend.epoch_order(backend.jobs[job].spec, epoch)
    interleaved = np.stack(parts, axis=1).reshape(-1)
    assert interleaved[: len(order)].tolist() == order.tolist()
    assert interleaved[len(order) :].tolist() == order[: len(interleaved) - len(order)].tolist()


FAKE_JOB = "job-0"
"""The id the FakeBackend gives its first job."""


@pytest.mark.parametrize("bad", bad_requests(FAKE_JOB, epochs=4, spec=SPEC), ids=lambda b: b.label)
def test_each_bad_request_gets_its_one_status_and_code(tmp_path: Path, bad: BadRequest) -> None:
    """The shared table of bad inputs (also walked against the real service on Ray)."""
    client, _ = make_client(tmp_path)
    assert create(client) == FAKE_JOB  # a ready factor job with 4 epochs
    r = client.request(
        bad.method,
        bad.path,
        params=bad.params,
        json=bad.json,
        headers=bad.headers,
        content=bad.content,
    )
    assert_error(r, bad.status, bad.code, bad.fragment)


def _docs_error_table() -> dict[str, int]:
    """``code -> status`` from the table under "## Errors" in docs/api.md."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    section = text.split("\n## Errors", 1)[1].split("\n## ", 1)[0]
    table: dict[str, int] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].isdigit() and cells[1].startswith("`"):
            code = cells[1].strip("`")
            assert code not in table, f"{code} twice in the docs' error table"
            table[code] = int(cells[0])
    return table


def test_error_table_in_the_docs_matches_the_error_classes() -> None:
    """Every error the service raises has the status docs/api.md gives its code, and so does
    every answer of the shared table of bad requests."""
    table = _docs_error_table()
    for code, cls in errors.ERRORS.items():
        assert table.get(code) == cls.status, (code, table.get(code), cls.status)
    from saelect.service.app import HTTP_CODES

    for status, code in HTTP_CODES.items():
        if code in table:
            assert table[code] == status, code
    assert table["malformed_json"] == 400 and table["internal_error"] == 500
    assert table["epoch_out_of_range"] == 404
    for bad in bad_requests(FAKE_JOB, epochs=4, spec=SPEC):
        assert table[bad.code] == bad.status, bad.label


def test_unknown_job_on_every_job_route(tmp_path: Path) -> None:
    client, _ = make_client(tmp_path)
    for method, path in [
        ("GET", "/v1/jobs/nope"),
        ("GET", "/v1/jobs/nope/plan"),
        ("GET", "/v1/jobs/nope/epochs/0/indices"),
        ("GET", "/v1/jobs/nope/epochs/0/stats"),
        ("DELETE", "/v1/jobs/nope"),
    ]:
        assert_error(client.request(method, path), 404, "unknown_job", "nope")
    r = client.post("/v1/jobs/nope/epochs/0/feedback", json={"indices": [1], "losses": [0.5]})
    assert_error(r, 404, "unknown_job")


# --- feedback and stats -------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["infobatch", "factor"])
def test_weights_align_with_the_rank_indices(tmp_path: Path, policy: str) -> None:
    client, _ = make_client(tmp_path)
    job = create(client, spec(name=policy))
    for rank in range(3):
        params = {"rank": rank, "world_size": 3}
        idx = decode(client.get(f"/v1/jobs/{job}/epochs/1/indices", params=params))
        r = client.get(f"/v1/jobs/{job}/epochs/1/weights", params=params)
        assert r.headers["content-type"] == "application/octet-stream"
        w = np.frombuffer(r.content, dtype="<f4")
        assert int(r.headers["x-saelect-count"]) == w.shape[0] == idx.shape[0]
        expect = np.where(idx % 3 == 0, 2.0, 1.0) if policy == "infobatch" else np.ones(len(idx))
        assert w.tolist() == expect.tolist()
        as_json = client.get(
            f"/v1/jobs/{job}/epochs/1/weights", params=params, headers={"Accept": JSON_TYPE}
        ).json()
        assert as_json["weights"] == w.tolist() and as_json["rank"] == rank
    assert_error(
        client.get(f"/v1/jobs/{job}/epochs/1/weights", params={"rank": 3, "world_size": 3}),
        400,
        "invalid_request",
        "rank",
    )


def test_feedback_json_and_binary(tmp_path: Path) -> None:
    client, backend = make_client(tmp_path)
    job = create(client, spec(name="infobatch"))
    url = f"/v1/jobs/{job}/epochs/0/feedback"
    r = client.post(url, json={"indices": [3, 1, 2], "losses": [0.5, 1.5, 2.5]})
    assert r.status_code == 200 and r.json() == {"epoch": 0, "count": 3}
    idx = np.array([7, 9], dtype="<i8")
    val = np.array([0.25, 4.0], dtype="<f4")
    r = client.post(
        url,
        content=idx.tobytes() + val.tobytes(),
        headers={"content-type": "application/octet-stream", "x-saelect-count": "2"},
    )
    assert r.status_code == 200 and r.json()["count"] == 2
    got = backend.jobs[job].feedback[0]
    assert got[0][0].tolist() == [3, 1, 2] and got[0][1].tolist() == [0.5, 1.5, 2.5]
    assert got[1][0].tolist() == [7, 9] and got[1][1].tolist() == [0.25, 4.0]


def test_feedback_errors(tmp_path: Path) -> None:
    client, _ = make_client(tmp_path)
    factor = create(client)
    loss = create(client, spec(name="infobatch"))
    ok = {"indices": [1, 2], "losses": [0.1, 0.2]}
    r = client.post(f"/v1/jobs/{factor}/epochs/0/feedback", json=ok)
    assert_error(r, 409, "feedback_not_accepted", "factor")
    url = f"/v1/jobs/{loss}/epochs/0/feedback"
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"json": {"indices": [1, 2], "losses": [0.1]}}, "invalid_request", "equal lengths"),
        ({"json": {"indices": [-1], "losses": [0.1]}}, "invalid_request", ">= 0"),
        ({"json": {"indices": [N], "losses": [0.1]}}, "invalid_request", "num_samples"),
        ({"json": {"indices": [2**70], "losses": [0.1]}}, "invalid_request", "int64"),
        ({"json": {"indices": ["a"], "losses": [0.1]}}, "invalid_request", "indices"),
        ({"json": {"indices": [1]}}, "invalid_request", "losses"),
        (
            {"content": b"{bad", "headers": {"content-type": "application/json"}},
            "malformed_json",
            "json",
        ),
        (
            {"content": b"abc", "headers": {"content-type": "application/octet-stream"}},
            "invalid_request",
            "x-saelect-count",
        ),
        (
            {
                "content": b"\x00" * 13,
                "headers": {"content-type": "application/octet-stream", "x-saelect-count": "1"},
            },
            "invalid_request",
            "12 bytes",
        ),
        (
            {
                "content": np.array([1], "<i8").tobytes() + np.array([np.nan], "<f4").tobytes(),
                "headers": {"content-type": "application/octet-stream", "x-saelect-count": "1"},
            },
            "invalid_request",
            "finite",
        ),
        (
            {"content": b"1,2", "headers": {"content-type": "text/csv"}},
            "invalid_request",
            "content type",
        ),
    ]
    for kwargs, code, fragment in cases:
        assert_error(client.post(url, **kwargs), 400, code, fragment)
    r = client.post(f"/v1/jobs/{loss}/epochs/4/feedback", json=ok)
    assert_error(r, 404, "epoch_out_of_range")


def test_stats(tmp_path: Path) -> None:
    client, _ = make_client(tmp_path)
    job = create(client)
    body = client.get(f"/v1/jobs/{job}/epochs/3/stats").json()
    assert set(body) >= {"epoch", "lambda", "size", "coverage", "usage", "factor_coverage"}
    assert body["epoch"] == 3 and body["lambda"] == 1.0 and body["size"] == 300
    assert 0 < body["coverage"] <= 1 and body["usage"]["max"] >= body["usage"]["mean"]


# --- auth, limits, generic errors ---------------------------------------------------------


def test_auth(tmp_path: Path) -> None:
    client, _ = make_client(tmp_path, api_token="s3cret")
    good = {"Authorization": "Bearer s3cret"}
    r = client.get("/v1/jobs")
    assert_error(r, 401, "unauthorized", "missing")
    assert r.headers["www-authenticate"] == "Bearer"
    assert_error(
        client.get("/v1/jobs", headers={"Authorization": "Bearer nope"}), 401, "unauthorized"
    )
    assert_error(client.get("/v1/jobs", headers={"Authorization": "s3cret"}), 401, "unauthorized")
    assert_error(client.post("/v1/jobs", json=SPEC), 401, "unauthorized")
    job = create(client, SPEC, **good)
    for path in [f"/v1/jobs/{job}", f"/v1/jobs/{job}/plan", f"/v1/jobs/{job}/epochs/0/indices"]:
        assert_error(client.get(path), 401, "unauthorized")
        assert client.get(path, headers=good).status_code == 200
    assert client.get("/v1/jobs", headers={"Authorization": "bearer s3cret"}).status_code == 200


def test_auth_off_without_token(tmp_path: Path) -> None:
    client, _ = make_client(tmp_path)
    assert client.get("/v1/jobs", headers={"Authorization": "Bearer whatever"}).status_code == 200


def test_oversized_bodies_are_413(tmp_path: Path) -> None:
    client, backend = make_client(tmp_path, max_body_bytes=4096)
    job = create(client, spec(name="infobatch"))
    url = f"/v1/jobs/{job}/epochs/0/feedback"
    big = {"indices": list(range(2000)), "losses": [0.5] * 2000}
    assert_error(client.post(url, json=big), 413, "payload_too_large", "4096")

    def chunks() -> Any:  # no Content-Length: streamed (chunked) upload
        for _ in range(10):
            yield b"x" * 1000

    r = client.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, "payload_too_large")

    def small() -> Any:
        yield b'{"indices": [1], '
        yield b'"losses": [0.5]}'

    r = client.post(url, content=small(), headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["count"] == 1
    assert backend.calls["feedback"] == 1


def test_unknown_routes_and_methods_have_error_shape(tmp_path: Path) -> None:
    client, _ = make_client(tmp_path)
    assert_error(client.get("/v2/nothing"), 404, "not_found")
    assert_error(client.put("/v1/jobs"), 405, "method_not_allowed")


class BrokenBackend(FakeBackend):
    async def list_jobs(self) -> list:
        raise RuntimeError("bug in the backend")


def test_real_bugs_are_500_in_error_shape(tmp_path: Path) -> None:
    client, _ = make_client(tmp_path, backend=BrokenBackend(N))
    assert_error(client.get("/v1/jobs"), 500, "internal_error", "RuntimeError")


def test_wrapped_backend_errors_are_unwrapped(tmp_path: Path) -> None:
    class WrappedError(Exception):  # shaped like ray.exceptions.RayTaskError
        def __init__(self, cause: Exception) -> None:
            super().__init__(str(cause))
            self.cause = cause

    class RemoteBackend(FakeBackend):
        async def get_job(self, job_id: str) -> Any:
            raise WrappedError(errors.UnknownJob(f"no job {job_id!r}"))

    client, _ = make_client(tmp_path, backend=RemoteBackend(N))
    assert_error(client.get("/v1/jobs/abc"), 404, "unknown_job", "abc")


# --- settings and errors ------------------------------------------------------------------


def test_settings_defaults_env_and_bind_check(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert (s.host, s.port, s.store) == ("127.0.0.1", 8000, "./.saelect/store")
    assert os.getcwd() in s.allowed_roots and "/usr/share/datasets" in s.allowed_roots
    assert s.data_dir in s.allowed_roots and s.token is None
    s.check_bind()
    for host in ("localhost", "::1", "127.0.0.2"):
        Settings(host=host).check_bind()
    with pytest.raises(ValueError, match=r"0\.0\.0\.0"):
        Settings(host="0.0.0.0").check_bind()
    Settings(host="0.0.0.0", insecure=True).check_bind()
    Settings(host="0.0.0.0", api_token="t").check_bind()
    monkeypatch.setenv("SAELECT_API_TOKEN", "from-env")
    monkeypatch.setenv("SAELECT_ALLOWED_ROOTS", '["/srv/data"]')
    monkeypatch.setenv("SAELECT_PORT", "9001")
    s = Settings()
    assert s.token == "from-env" and s.allowed_roots == ["/srv/data"] and s.port == 9001
    assert "from-env" not in repr(s)
    monkeypatch.setenv("SAELECT_API_TOKEN", "")
    assert Settings().token is None


@pytest.mark.parametrize("cls", list(errors.ERRORS.values()))
def test_errors_survive_pickling(cls: type[errors.SaelectError]) -> None:
    e = pickle.loads(pickle.dumps(cls("what went wrong")))
    assert type(e) is cls and e.message == "what went wrong" and str(e) == "what went wrong"
    assert 400 <= e.status < 500 and e.code


def test_sae_nulls_mean_defaults_and_core_validation_reaches_the_client(tmp_path: Path) -> None:
    from saelect.workers.sae import SAEConfig

    client, backend = make_client(tmp_path)
    body = copy.deepcopy(SPEC)
    body["sae"] = {"k": None, "units": None, "dead_steps": 5, "normalize_decoder": None}
    sae = backend.jobs[create(client, body)].spec.sae
    default = SAEConfig()
    assert (sae.k, sae.units, sae.dead_steps) == (default.k, None, 5)
    assert sae.normalize_decoder == default.normalize_decoder
    body["sae"] = {"units": 8, "k": 16}
    assert_error(client.post("/v1/jobs", json=body), 400, "invalid_request", "sae: k must be")
