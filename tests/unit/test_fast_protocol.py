"""The fast path in uvicorn's httptools protocol (``service.fast_protocol``): on a real uvicorn
server it writes, byte for byte, what the ASGI fast path writes (keep-alive, pipelined requests,
``Connection: close``, HTTP/1.0), without calling the app; everything else reaches the app."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from saelect.service.app import create_app
from saelect.service.server import server_config
from saelect.service.settings import Settings
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tests.unit.test_client import ServerThread, free_socket
from tests.unit.test_fast_indices import SPEC, TOKEN, MemoBackend
from tests.unit.test_routes import _clean_env  # noqa: F401 (its autouse fixture)

DATE = re.compile(rb"\r\ndate: [^\r]*")


class CountingApp:
    """An ASGI app wrapper that counts the requests reaching the app."""

    def __init__(self, app: Any) -> None:
        self.app, self.calls = app, 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += scope["type"] == "http"
        await self.app(scope, receive, send)


class Served:
    """A MemoBackend app with one job under uvicorn, configured as the service configures it
    (``protocol=True``) or with uvicorn's plain httptools protocol (the ASGI fast path)."""

    def __init__(self, tmp: Path, protocol: bool) -> None:
        self.backend = MemoBackend()
        settings = Settings(store=str(tmp / "store"), allowed_roots=[str(tmp)], api_token=TOKEN)
        self.app = create_app(self.backend, settings)
        config = server_config(self.app, settings, **({} if protocol else {"http": "httptools"}))
        config.load()
        self.counting = CountingApp(config.loaded_app)
        config.loaded_app = self.counting
        self.protocol = config.http_protocol_class
        self.server = ServerThread(self.app, free_socket(), config).start()
        self.port = self.server.sock.getsockname()[1]
        dataset = {**SPEC["dataset"], "uri": str(tmp / "train.parquet")}  # a fake: never read
        created = httpx.post(
            f"{self.server.url}/v1/jobs",
            json={**SPEC, "dataset": dataset},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert created.status_code == 202, created.text
        self.job = created.json()["id"]

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)


def read_responses(s: socket.socket, count: int) -> bytes:
    """``count`` whole HTTP responses (headers and a content-length body each) from ``s``."""
    data, out = b"", b""
    for _ in range(count):
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                return out + data
            data += chunk
        head, _, data = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
        while len(data) < length:
            data += s.recv(65536)
        out += head + b"\r\n\r\n" + data[:length]
        data = data[length:]
    assert not data, data
    return out


def read_all(s: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def get(job: str, epoch: int, rank: int, world: int, extra: str = "") -> bytes:
    return (
        f"GET /v1/jobs/{job}/epochs/{epoch}/indices?rank={rank}&world_size={world} HTTP/1.1\r\n"
        f"host: t\r\nauthorization: Bearer {TOKEN}\r\naccept: application/octet-stream\r\n"
        f"{extra}\r\n"
    ).encode()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, Served]]:
    tmp = tmp_path_factory.mktemp("fast_protocol")
    pair = Served(tmp / "protocol", protocol=True), Served(tmp / "asgi", protocol=False)
    yield pair
    for served in pair:
        served.server.stop()


def exchange(served: Served, requests: list[bytes], responses: int) -> bytes:
    """Send ``requests`` (one sendall each) on one connection and read ``responses`` answers;
    the date header (the clock's) is dropped."""
    with served.connect() as s:
        for request in requests:
            s.sendall(request)
        out = read_responses(s, responses)
    return DATE.sub(b"", out)


def test_the_service_configuration_uses_the_fast_protocol(servers: tuple[Served, Served]) -> None:
    protocol, asgi = servers
    assert issubclass(protocol.protocol, HttpToolsProtocol)
    assert protocol.protocol is not HttpToolsProtocol
    assert asgi.protocol is HttpToolsProtocol


def test_protocol_answers_are_the_asgi_fast_paths_bytes_without_the_app(
    servers: tuple[Served, Served],
) -> None:
    protocol, asgi = servers
    for served in servers:  # epoch 0 into memory: the route computes it, through the app
        with served.connect() as s:
            s.sendall(get(served.job, 0, 0, 1))
            assert read_responses(s, 1).startswith(b"HTTP/1.1 200")
    calls = protocol.counting.calls, asgi.counting.calls
    single = [get("{job}", 0, rank, 4) for rank in range(4)]
    burst = [b"".join(get("{job}", 0, rank, 3) for rank in range(3))]  # pipelined: one send
    json_first = get("{job}", 0, 0, 2).replace(b"application/octet-stream", b"application/json")
    mixed = [json_first + get("{job}", 0, 1, 2) + get("{job}", 0, 0, 2)]  # after an app answer
    for requests, responses in ((single, 4), (burst, 3), (mixed, 3)):
        got = [
            exchange(s, [r.replace(b"{job}", s.job.encode()) for r in requests], responses)
            for s in servers
        ]
        assert got[0] == got[1]
        assert got[0].count(b"HTTP/1.1 200 OK\r\n") == responses
    assert protocol.counting.calls == calls[0] + 1  # the protocol answered all but the JSON
    assert asgi.counting.calls == calls[1] + 10  # the ASGI fast path runs inside the app call
    # the metrics count the protocol's answers as the app's own
    for served in servers:  # 1 through the route, 9 fast answers
        registry = served.app.state.metrics.registry
        sample = "saelect_epoch_index_responses_total"
        assert registry.get_sample_value(sample, {"format": "binary"}) == 10


def test_connection_close_and_http_1_0_close_after_the_answer(
    servers: tuple[Served, Served],
) -> None:
    got = []
    for served in servers:
        job = served.job
        with served.connect() as s:
            s.sendall(get(job, 0, 1, 2, "connection: close\r\n"))
            closed = read_all(s)
        with served.connect() as s:
            s.sendall(get(job, 0, 0, 2).replace(b"HTTP/1.1", b"HTTP/1.0"))
            old = read_all(s)
        got.append(DATE.sub(b"", closed + old))
    assert got[0] == got[1]
    assert got[0].count(b"connection: close\r\n") == 2


def test_everything_else_reaches_the_app(servers: tuple[Served, Served]) -> None:
    protocol, asgi = servers
    job = protocol.job
    others = [
        get(job, 0, 0, 1).replace(b"application/octet-stream", b"application/json"),
        get(job, 0, 0, 1).replace(TOKEN.encode(), b"wrong"),
        get(job, 3, 0, 1),  # an epoch not yet in memory: the route computes it
        get("no-such-job", 0, 0, 1),
        b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n",
    ]
    before = protocol.counting.calls
    got = [exchange(protocol, [r], 1) for r in others]
    assert protocol.counting.calls == before + len(others)
    want = [exchange(asgi, [r.replace(job.encode(), asgi.job.encode())], 1) for r in others]
    statuses = [g.split(b"\r\n", 1)[0] for g in got]
    assert statuses == [w.split(b"\r\n", 1)[0] for w in want]
    assert statuses[:4] == [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 401 Unauthorized",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 404 Not Found",
    ]
