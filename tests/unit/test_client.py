"""The client package against the real app on a real uvicorn server (loopback, FakeBackend)."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from saelect.client import JobFailedError, SelectionClient, SelectionError, SelectionSampler
from saelect.client.ray_data import keep_selected
from saelect.client.ray_train import sampler_from_context
from saelect.service.app import create_app
from saelect.service.settings import Settings

from tests.unit.fakes import FakeBackend

ROOT = Path(__file__).resolve().parents[2]
N = 500
TOKEN = "tok-123"
SPEC: dict[str, Any] = {
    "name": "client-test",
    "dataset": {
        "uri": "/usr/share/datasets/fashion-mnist/train.parquet",
        "label_column": "label",
        "feature": {"kind": "pixels", "column": "image"},
    },
    "policy": {"name": "infobatch", "ratio": 0.25, "epochs": 3, "seed": 5},
}


def free_socket() -> socket.socket:
    """A TCP socket bound to a free loopback port, not yet listening (connects are refused)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class ServerThread:
    """uvicorn serving ``app`` on ``sock`` in a background thread."""

    def __init__(self, app: Any, sock: socket.socket, config: Any = None) -> None:
        self.sock = sock
        if config is None:
            config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        scheme = "https" if self.server.config.ssl_certfile else "http"
        return f"{scheme}://{host}:{port}"

    def start(self, wait: bool = True) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while wait and not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop gracefully; after 1 s, force the exit (a connection left mid-TLS-handshake by a
        client that refused the certificate would otherwise hold the shutdown until the join's
        10 s ran out)."""
        self.server.should_exit = True
        self.thread.join(timeout=1)
        self.server.force_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def make_app(backend: FakeBackend, token: str | None = None) -> Any:
    settings = Settings(
        store="/tmp/unused-store",
        allowed_roots=["/usr/share/datasets"],
        api_token=token,
    )
    return create_app(backend, settings)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, FakeBackend]]:
    backend = FakeBackend(N)
    server = ServerThread(make_app(backend, TOKEN), free_socket()).start()
    yield server.url, backend
    server.stop()


@pytest.fixture
def client(served: tuple[str, FakeBackend]) -> Iterator[SelectionClient]:
    with SelectionClient(served[0], token=TOKEN, retries=1, backoff=0.01) as c:
        yield c


@pytest.fixture
def job(client: SelectionClient) -> str:
    return client.create_job(SPEC)["id"]


def test_job_routes(client: SelectionClient, job: str, served: Any) -> None:
    assert client.healthz()["status"] == "ok"
    assert client.wait_ready(job, timeout=5, poll=0.01)["phase"] == "ready"
    assert job in [j["id"] for j in client.jobs()]
    status = client.job(job)
    assert status["name"] == "client-test" and status["num_samples"] == N
    plan = client.plan(job, world_size=4)
    assert [e["per_rank"] for e in plan["epochs"]] == [32, 32, 32]  # ceil(125 / 4)
    stats = client.stats(job, 1)
    assert stats["epoch"] == 1 and stats["size"] == 125
    client.delete(job)
    with pytest.raises(SelectionError) as err:
        client.job(job)
    assert (err.value.status, err.value.code) == (404, "unknown_job")
    assert job in err.value.message and job in str(err.value)


def test_binary_and_json_indices_agree(client: SelectionClient, job: str, served: Any) -> None:
    backend: FakeBackend = served[1]
    order = backend.epoch_order(backend.jobs[job].spec, 2)
    for ws in (1, 3):
        parts = []
        for rank in range(ws):
            binary = client.indices(job, 2, rank, ws)
            assert binary.dtype == np.int64 and binary.flags.writeable
            assert np.array_equal(binary, client.indices(job, 2, rank, ws, as_json=True))
            assert np.array_equal(binary, client.indices(job, 2, rank, ws))  # repeatable
            parts.append(binary)
        assert set(np.concatenate(parts).tolist()) == set(order.tolist())


def test_weights_come_binary_and_align_with_indices(client: SelectionClient) -> None:
    spec = json.loads(json.dumps(SPEC))
    spec["policy"]["name"] = "infobatch"
    job = client.create_job(spec)["id"]
    idx = client.indices(job, 0, 1, 2)
    w = client.weights(job, 0, 1, 2)
    assert w.dtype == np.float32 and w.shape == idx.shape
    assert w.tolist() == np.where(idx % 3 == 0, 2.0, 1.0).tolist()


def test_server_errors_carry_the_server_message(client: SelectionClient, job: str) -> None:
    cases = [
        (lambda: client.indices(job, 3), 404, "epoch_out_of_range"),
        (lambda: client.indices(job, 0, rank=2, world_size=2), 400, "invalid_request"),
        (lambda: client.plan("no-such-job"), 404, "unknown_job"),
        (lambda: client.create_job({**SPEC, "policy": {"name": "x"}}), 400, "invalid_request"),
    ]
    for call, status, code in cases:
        with pytest.raises(SelectionError) as err:
            call()
        assert (err.value.status, err.value.code) == (status, code)
        assert err.value.message
    factor = client.create_job({**SPEC, "policy": {**SPEC["policy"], "name": "factor"}})["id"]
    with pytest.raises(SelectionError, match="feedback_not_accepted"):
        client.feedback(factor, 0, np.array([1]), np.array([0.5]))


def test_feedback_is_sent_binary(client: SelectionClient, job: str, served: Any) -> None:
    idx = np.array([4, 8, 15, 16], dtype=np.int32)
    losses = np.array([0.1, 2.0, 3.5, 0.0])
    assert client.feedback(job, 1, idx, losses) == {"epoch": 1, "count": 4}
    got_idx, got_val = served[1].jobs[job].feedback[1][-1]
    assert got_idx.tolist() == [4, 8, 15, 16]
    assert np.allclose(got_val, losses)
    with pytest.raises(ValueError, match="length"):
        client.feedback(job, 1, idx, losses[:2])


def test_auth_errors(served: Any) -> None:
    for token in (None, "wrong"):
        with SelectionClient(served[0], token=token, retries=0) as c:
            with pytest.raises(SelectionError) as err:
                c.jobs()
            assert (err.value.status, err.value.code) == (401, "unauthorized")
            assert c.healthz()["status"] == "ok"


def test_wait_ready_raises_on_failure_and_timeout(client: SelectionClient, served: Any) -> None:
    backend: FakeBackend = served[1]
    backend.ready = False
    try:
        pending = client.create_job(SPEC)["id"]
        failed = client.create_job(SPEC)["id"]
    finally:
        backend.ready = True
    backend.set_phase(failed, "failed", "features: column 'image' missing")
    with pytest.raises(JobFailedError, match="column 'image' missing"):
        client.wait_ready(failed, timeout=5, poll=0.01)
    with pytest.raises(TimeoutError, match="pending"):
        client.wait_ready(pending, timeout=0.05, poll=0.01)


# --- sampler ------------------------------------------------------------------------------


def test_sampler_lengths_iteration_and_equal_ranks(
    client: SelectionClient, job: str, served: Any
) -> None:
    backend: FakeBackend = served[1]
    plans_before = backend.calls.get("plan", 0)
    world = 3
    samplers = [SelectionSampler(client, job, rank=r, world_size=world) for r in range(world)]
    assert backend.calls["plan"] == plans_before + world  # one plan fetch per sampler
    for epoch in range(samplers[0].num_epochs):
        seen: list[int] = []
        for s in samplers:
            s.set_epoch(epoch)
            items = list(s)
            assert len(items) == len(s) == 42  # ceil(125 / 3)
            assert all(type(i) is int for i in items)
            assert items == client.indices(job, epoch, s.rank, world).tolist()
            seen += items
        order = backend.epoch_order(backend.jobs[job].spec, epoch)
        assert set(seen) == set(order.tolist())
    assert backend.calls["plan"] == plans_before + world
    with pytest.raises(ValueError, match="epoch"):
        samplers[0].set_epoch(3)
    with pytest.raises(ValueError, match="rank"):
        SelectionSampler(client, job, rank=3, world_size=3)


def test_sampler_waits_out_job_not_ready_until_a_timer_readies_the_fake_job(
    client: SelectionClient, job: str, served: Any
) -> None:
    """``set_epoch`` on a job that answers job_not_ready polls until it is ready, then fetches
    (and raises JobFailedError when the job failed instead).

    Nothing restarts here: a timer flips the fake backend's phase. The real case, a crashed and
    restarted `saelect serve` re-attaching its job, is in
    tests/integration/test_serve_process.py.
    """
    backend: FakeBackend = served[1]
    sampler = SelectionSampler(client, job, rank=0, world_size=2, ready_timeout=10)
    backend.set_phase(job, "scoring")
    calls = dict(backend.calls)
    timer = threading.Timer(0.3, backend.set_phase, args=(job, "ready"))
    timer.start()
    sampler.set_epoch(1)
    timer.join()
    # one request refused (not ready), the job polled, one request served (ready by then)
    assert backend.calls["epoch_indices"] - calls.get("epoch_indices", 0) == 2
    assert backend.calls["get_job"] - calls.get("get_job", 0) >= 1
    assert list(sampler) == client.indices(job, 1, 0, 2).tolist()
    backend.set_phase(job, "failed", error="disk full")
    with pytest.raises(JobFailedError, match="disk full"):
        sampler.set_epoch(2)
    backend.set_phase(job, "ready")


def test_sampler_in_a_dataloader(client: SelectionClient, job: str) -> None:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.arange(N))
    sampler = SelectionSampler(client, job, rank=1, world_size=2)
    assert len(sampler) == 63  # epoch 0 without set_epoch: fetched on first iteration
    sampler.set_epoch(1)
    got = torch.cat([b[0] for b in DataLoader(data, batch_size=16, sampler=sampler)])
    assert got.tolist() == client.indices(job, 1, 1, 2).tolist()


def test_sampler_from_ray_train_context(
    client: SelectionClient, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = types.SimpleNamespace(get_world_rank=lambda: 1, get_world_size=lambda: 4)
    fake_train = types.ModuleType("ray.train")
    fake_train.get_context = lambda: ctx  # type: ignore[attr-defined]
    fake_ray = types.ModuleType("ray")
    fake_ray.train = fake_train  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.setitem(sys.modules, "ray.train", fake_train)
    sampler = sampler_from_context(client, job)
    assert (sampler.rank, sampler.world_size, len(sampler)) == (1, 4, 32)
    from_url = sampler_from_context(client.url, job, token=TOKEN)
    assert from_url.world_size == 4 and from_url.client.url == client.url


def test_keep_selected_filters_a_batch() -> None:
    batch = {"index": np.array([5, 1, 9, 3, 7]), "x": np.array([50, 10, 90, 30, 70])}
    out = keep_selected(batch, np.array([1, 3, 4, 9]), "index")
    assert out["index"].tolist() == [1, 9, 3] and out["x"].tolist() == [10, 90, 30]
    empty = keep_selected(batch, np.array([], dtype=np.int64), "index")
    assert empty["x"].tolist() == []


# --- retries ------------------------------------------------------------------------------


def test_retries_until_a_late_server_comes_up() -> None:
    backend = FakeBackend(N)
    sock = free_socket()  # bound but not listening yet: connections are refused
    server = ServerThread(make_app(backend), sock)
    timer = threading.Timer(0.4, server.start, kwargs={"wait": False})
    start = time.monotonic()  # before the timer: no answer can come sooner than 0.4 s after
    timer.start()
    try:
        with SelectionClient(server.url, retries=10, backoff=0.05, max_backoff=0.2) as c:
            assert c.healthz()["status"] == "ok"
            assert time.monotonic() - start >= 0.35  # it answered only once the server started
    finally:
        timer.join()
        server.stop()


def mock_client(responses: list[Any], retries: int = 5) -> tuple[SelectionClient, list[float]]:
    """A client whose transport replays ``responses`` (an exception is raised, an int is a
    status with an error body); records the backoff sleeps."""
    queue = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        item = queue.pop(0)
        if isinstance(item, Exception):
            raise item
        body = {"error": {"code": f"c{item}", "message": f"m{item}"}} if item >= 400 else {}
        return httpx.Response(item, json=body or {"status": "ok", "version": "x"})

    c = SelectionClient(
        "http://test", retries=retries, backoff=0.2, transport=httpx.MockTransport(handler)
    )
    sleeps: list[float] = []
    c._sleep = sleeps.append
    return c, sleeps


def test_retry_policy() -> None:
    refused = httpx.ConnectError("refused")
    c, sleeps = mock_client([refused, refused, 503, 504, 502, 200])
    assert c.healthz()["status"] == "ok"
    assert sleeps == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2])
    c, sleeps = mock_client([refused] * 3, retries=2)
    with pytest.raises(SelectionError) as err:
        c.healthz()
    assert (err.value.status, err.value.code) == (0, "unreachable") and len(sleeps) == 2
    for status in (500, 400, 404, 409):
        c, sleeps = mock_client([status, 200])
        with pytest.raises(SelectionError) as err:
            c.healthz()
        assert (err.value.status, err.value.code, err.value.message) == (
            status,
            f"c{status}",
            f"m{status}",
        )
        assert sleeps == []
    c, sleeps = mock_client([503, 503], retries=1)
    with pytest.raises(SelectionError, match="c503"):
        c.healthz()
    dropped = httpx.RemoteProtocolError("server disconnected")
    c, _ = mock_client([dropped, 200])
    assert c.healthz()["status"] == "ok"  # GET is idempotent: retried
    c, _ = mock_client([dropped, 200])
    with pytest.raises(SelectionError, match="transport_error"):
        c.create_job(SPEC)  # POST: not retried after the request may have been sent


def test_non_json_error_bodies() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(418, text="I'm a teapot")

    c = SelectionClient("http://test", retries=0, transport=httpx.MockTransport(handler))
    with pytest.raises(SelectionError) as err:
        c.healthz()
    assert (err.value.status, err.value.code, err.value.message) == (
        418,
        "http_418",
        "I'm a teapot",
    )


# --- dependency rule ----------------------------------------------------------------------


def test_import_client_loads_no_ray_service_or_workers() -> None:
    code = (
        "import json, sys\n"
        "import client, client.http, client.errors, client.ray_train, client.ray_data\n"
        "from client import SelectionClient, SelectionSampler, SelectionError\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, env=env
    )
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert not loaded & {"ray", "service", "workers", "fastapi", "pydantic"}, loaded
    assert {"httpx", "numpy", "torch"} <= loaded


def test_client_alone_does_not_load_torch() -> None:
    code = "import sys, client; client.SelectionClient; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "False"


def test_spec_dict_is_not_mutated_by_create(client: SelectionClient) -> None:
    spec = copy.deepcopy(SPEC)
    client.create_job(spec)
    assert spec == SPEC


@pytest.mark.parametrize(
    ("body", "count", "expected"),
    [
        (np.arange(3, dtype="<i8").tobytes(), "3", [0, 1, 2]),
        (np.arange(3, dtype="<i8").tobytes(), None, [0, 1, 2]),
        (np.arange(2, dtype="<i8").tobytes(), "3", "truncated"),
        (np.arange(4, dtype="<i8").tobytes(), "3", "bad_body"),
        (b"\x00" * 12, None, "bad_body"),
    ],
)
def test_binary_body_checks(body: bytes, count: str | None, expected: Any) -> None:
    headers = {"content-type": "application/octet-stream"}
    if count is not None:
        headers["x-saelect-count"] = count

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers=headers)

    c = SelectionClient("http://test", retries=0, transport=httpx.MockTransport(handler))
    if isinstance(expected, str):
        with pytest.raises(SelectionError, match=expected):
            c.indices("j", 0)
    else:
        got = c.indices("j", 0)
        assert got.dtype == np.int64 and got.tolist() == expected and got.flags.writeable
