"""The serving fast path (``service.fast_indices``): for an epoch in memory it answers exactly what
the route answers (bytes, status, headers, metrics), and for everything else it stays out of the
way, so the route's validation, errors and auth hold unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from saelect.service.app import create_app
from saelect.service.fast_indices import parse_rank_query
from saelect.service.selection.partition import rank_indices
from saelect.service.settings import Settings

from tests.unit.fakes import FakeBackend
from tests.unit.test_routes import _clean_env  # noqa: F401 (its autouse fixture)

N = 1000
TOKEN = "s3cret-token"
SPEC: dict[str, Any] = {
    "name": "fast",
    "dataset": {"uri": "data/train.parquet", "feature": {"kind": "column", "column": "x"}},
    "policy": {"name": "rs2", "ratio": 0.3, "epochs": 4, "seed": 3},
}


class MemoBackend(FakeBackend):
    """A FakeBackend that keeps each epoch it computed and offers it to the fast path, as the
    JobManager does (an epoch is in memory once a rank fetched it)."""

    def __init__(self) -> None:
        super().__init__(N)
        self.memo: dict[tuple[str, int], np.ndarray] = {}

    async def epoch_indices(self, job_id: str, epoch: int, rank: int, world_size: int) -> Any:
        idx = await super().epoch_indices(job_id, epoch, rank, world_size)
        self.memo[(job_id, epoch)] = self.epoch_order(self.jobs[job_id].spec, epoch)
        return idx

    def ready_epoch_indices(
        self, job_id: str, epoch: int, rank: int, world_size: int
    ) -> np.ndarray | None:
        self._count("ready_epoch_indices")
        order = self.memo.get((job_id, epoch))
        return None if order is None else rank_indices(order, rank, world_size)


def client(tmp_path: Path, *, fast: bool, **kw: Any) -> tuple[TestClient, MemoBackend, str]:
    """A TestClient over a MemoBackend with one ready job (and its id)."""
    backend = MemoBackend()
    settings = Settings(
        store=str(tmp_path / "store"),
        allowed_roots=[str(Path.cwd())],  # the test's tmp_path (the fixture's chdir)
        api_token=TOKEN,
        fast_indices=fast,
        **kw,
    )
    c = TestClient(create_app(backend, settings), raise_server_exceptions=False)
    c.headers["Authorization"] = f"Bearer {TOKEN}"
    job = c.post("/v1/jobs", json=SPEC)
    assert job.status_code == 202, job.text
    return c, backend, job.json()["id"]


def answer(resp: Any) -> tuple[int, bytes, dict[str, str]]:
    """Status, body and headers of a response (header names lower-cased)."""
    return resp.status_code, resp.content, {k.lower(): v for k, v in resp.headers.items()}


def test_parse_rank_query_accepts_only_plain_rank_and_world_size() -> None:
    assert parse_rank_query(b"") == (0, 1)
    assert parse_rank_query(b"rank=3&world_size=8") == (3, 8)
    assert parse_rank_query(b"world_size=8&rank=0") == (0, 8)
    assert parse_rank_query(b"world_size=5") == (0, 5)
    for bad in (
        b"rank=1&rank=2",  # repeated
        b"rank=01&world_size=4",  # leading zero: the route decides
        b"rank=-1&world_size=4",
        b"rank=1&world_size=4&x=1",  # unknown key
        b"rank=%31&world_size=4",  # percent-encoded
        b"rank&world_size=4",
        b"rank=1.0&world_size=4",
        b"rank=1&",
    ):
        assert parse_rank_query(bad) is None, bad


def test_fast_path_answers_a_computed_epoch_exactly_as_the_route(tmp_path: Path) -> None:
    fast, fast_backend, job = client(tmp_path / "a", fast=True)
    slow, slow_backend, job_slow = client(tmp_path / "b", fast=False)
    assert job == job_slow
    for epoch in range(4):
        for world in (1, 3, 8):
            for rank in range(world):
                url = f"/v1/jobs/{job}/epochs/{epoch}/indices?rank={rank}&world_size={world}"
                before = fast_backend.calls.get("epoch_indices", 0)
                got = answer(fast.get(url))
                assert got == answer(slow.get(url))
                assert got[0] == 200
                expected = rank_indices(
                    fast_backend.epoch_order(fast_backend.jobs[job].spec, epoch), rank, world
                )
                assert np.array_equal(np.frombuffer(got[1], dtype="<i8"), expected)
                routed = fast_backend.calls.get("epoch_indices", 0) - before
                # the first fetch of an epoch computes it through the route; every later one
                # is the fast path's
                first = world == 1 and rank == 0
                assert routed == (1 if first else 0), (epoch, world, rank)
    assert slow_backend.calls.get("ready_epoch_indices", 0) == 0


def test_fast_path_counts_requests_and_indices_in_the_metrics(tmp_path: Path) -> None:
    c, backend, job = client(tmp_path, fast=True)
    url = f"/v1/jobs/{job}/epochs/0/indices?rank=0&world_size=2"
    for _ in range(3):
        assert c.get(url).status_code == 200
    assert backend.calls["epoch_indices"] == 1  # two fast answers
    text = c.get("/metrics").text
    route = 'route="/v1/jobs/{job_id}/epochs/{epoch}/indices"'
    lines = [x for x in text.splitlines() if route in x and x.startswith("saelect_http_requests")]
    assert lines and float(lines[0].rsplit(" ", 1)[1]) == 3.0, lines
    served = next(x for x in text.splitlines() if x.startswith("saelect_indices_served_total"))
    assert float(served.rsplit(" ", 1)[1]) == 3 * 150.0  # m = 300, world 2: 150 per rank


@pytest.mark.parametrize(
    "path, headers",
    [
        ("/v1/jobs/{job}/epochs/0/indices?rank=0&world_size=2", {"Accept": "application/json"}),
        ("/v1/jobs/{job}/epochs/0/indices?rank=2&world_size=2", {}),  # rank >= world: 400
        ("/v1/jobs/{job}/epochs/0/indices?rank=0&world_size=9", {}),  # over the limit: 400
        ("/v1/jobs/{job}/epochs/0/indices?rank=0&world_size=0", {}),  # 400
        ("/v1/jobs/{job}/epochs/0/indices?rank=x", {}),  # 400
        ("/v1/jobs/{job}/epochs/00/indices?rank=0&world_size=2", {}),
        ("/v1/jobs/{job}/epochs/9/indices?rank=0&world_size=2", {}),  # past the end: 404
        ("/v1/jobs/nope/epochs/0/indices?rank=0&world_size=2", {}),  # unknown job: 404
        ("/v1/jobs/{job}/epochs/1/indices?rank=0&world_size=2", {}),  # not computed yet
        ("/v1/jobs/{job}/epochs/0/indices?rank=0&world_size=2", {"Authorization": "Bearer x"}),
        ("/v1/jobs/{job}/epochs/0/indices?rank=0&world_size=2", {"Authorization": ""}),
    ],
)
def test_everything_else_gets_the_routes_answer(
    tmp_path: Path, path: str, headers: dict[str, str]
) -> None:
    fast, _, job = client(tmp_path / "a", fast=True, max_world_size=8)
    slow, _, _ = client(tmp_path / "b", fast=False, max_world_size=8)
    warm = f"/v1/jobs/{job}/epochs/0/indices?rank=0&world_size=1"
    assert fast.get(warm).status_code == slow.get(warm).status_code == 200  # epoch 0 in memory
    url = path.format(job=job)
    got, want = answer(fast.get(url, headers=headers)), answer(slow.get(url, headers=headers))
    assert got == want
    if "Authorization" in headers:
        assert got[0] == 401


def test_other_methods_on_the_path_get_the_routes_answer(tmp_path: Path) -> None:
    fast, _, job = client(tmp_path / "a", fast=True)
    slow, _, _ = client(tmp_path / "b", fast=False)
    url = f"/v1/jobs/{job}/epochs/0/indices?rank=0&world_size=1"
    assert fast.get(url).status_code == slow.get(url).status_code == 200
    for method in ("POST", "HEAD", "DELETE"):
        got, want = fast.request(method, url), slow.request(method, url)
        assert answer(got) == answer(want)
        assert got.status_code == 405
