"""`FeedbackReporter` through the sampler, against the FakeBackend served over HTTP, with every
third request failing: before it reaches the server (connection refused), after the server
applied it (the answer is lost), or with a 503.

The server must receive every reported loss exactly once, and the epochs must equal those of a
run without errors.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from saelect.client import SelectionClient, SelectionError, SelectionSampler
from saelect.client.feedback import FeedbackReporter, post_feedback
from torch.utils.data import DataLoader, TensorDataset

from tests.unit.fakes import FakeBackend
from tests.unit.test_client import SPEC, TOKEN, ServerThread, free_socket, make_app

N = 500
BATCH = 8
EPOCHS = 3
DATASET = TensorDataset(torch.arange(N))


class FlakyTransport(httpx.BaseTransport):
    """Sends through a real transport, but fails every ``every``-th request of each method
    (GET, POST), in turn: refused before sending, answer lost after the server handled it, or
    a 503 in its place."""

    def __init__(self, every: int = 3) -> None:
        self.inner = httpx.HTTPTransport()
        self.every = every
        self.count: dict[str, int] = {}
        self.failures: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            n = self.count[request.method] = self.count.get(request.method, 0) + 1
            fail = n % self.every == 0
            kind = ("refused", "lost", "503")[(n // self.every) % 3]
            if fail:
                key = (request.method, kind)
                self.failures[key] = self.failures.get(key, 0) + 1
        if not fail:
            return self.inner.handle_request(request)
        if kind == "refused":
            raise httpx.ConnectError("injected: connection refused", request=request)
        response = self.inner.handle_request(request)
        response.read()
        response.close()
        if kind == "lost":
            raise httpx.ReadError("injected: connection reset before the answer", request=request)
        return httpx.Response(503, json={"error": {"code": "unavailable", "message": "injected"}})

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, FakeBackend]]:
    backend = FakeBackend(N)
    server = ServerThread(make_app(backend, TOKEN), free_socket()).start()
    yield server.url, backend
    server.stop()


def loss_of(idx: np.ndarray, epoch: int) -> np.ndarray:
    """A distinct, reproducible loss per (sample, epoch): float32 (n,)."""
    return (idx * 0.01 + epoch).astype(np.float32)


def train(
    url: str, job: str, rank: int, transport: httpx.BaseTransport | None
) -> dict[int, list[int]]:
    """Run EPOCHS epochs of rank ``rank`` of 2, reporting each batch's losses; returns the
    epochs' indices and the losses reported, by epoch."""
    client = SelectionClient(url, token=TOKEN, retries=1, backoff=0.0, transport=transport)
    sampler = SelectionSampler(client, job, rank=rank, world_size=2)
    sampler.feedback.post_samples = BATCH  # a post per batch: 8 an epoch
    sampler.feedback.backoff = 0.0
    seen: dict[int, list[int]] = {}
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        if epoch:  # set_epoch flushed: the server holds every loss of the epoch before
            got = served_losses(url, job, epoch - 1, rank)
            assert got == {i: float(loss_of(np.array(i), epoch - 1)) for i in seen[epoch - 1]}
        seen[epoch] = []
        for (x,) in DataLoader(DATASET, batch_size=BATCH, sampler=sampler):
            per_sample = loss_of(x.numpy(), epoch)
            assert sampler.loss_weights(x).shape == x.shape
            sampler.report(x, torch.from_numpy(per_sample))
            seen[epoch].extend(x.tolist())
    sampler.feedback.close()
    client.close()
    return seen


BACKENDS: dict[str, FakeBackend] = {}


def served_losses(url: str, job: str, epoch: int, rank: int) -> dict[int, float]:
    """{index: loss} the server applied for ``epoch`` from ``rank`` (each index at most once)."""
    posts = BACKENDS[url].jobs[job].feedback.get(epoch, [])
    keys = {key for key in BACKENDS[url].jobs[job].feedback_keys if key[0] == epoch}
    out: dict[int, float] = {}
    for idx, val in posts:
        for i, v in zip(idx.tolist(), val.tolist(), strict=True):
            assert i not in out, f"sample {i} of epoch {epoch} received twice"
            out[i] = v
    assert all(k[1] == rank for k in keys)
    return out


def test_every_loss_arrives_once_under_transient_errors(served: tuple[str, FakeBackend]) -> None:
    url, backend = served
    BACKENDS[url] = backend
    with SelectionClient(url, token=TOKEN) as c:
        clean_job, flaky_job = (c.create_job(SPEC)["id"] for _ in range(2))
    clean = train(url, clean_job, 1, None)
    flaky_transport = FlakyTransport(every=3)
    flaky = train(url, flaky_job, 1, flaky_transport)
    assert flaky == clean  # the same epochs as without errors
    failures = flaky_transport.failures
    assert all(failures.get(("POST", k), 0) >= 2 for k in ("refused", "lost", "503")), failures
    for epoch in range(EPOCHS):
        got = served_losses(url, flaky_job, epoch, 1)  # raises on a sample received twice
        assert got == {i: float(loss_of(np.array(i), epoch)) for i in flaky[epoch]}
        assert len(got) == len(flaky[epoch]) == 63
    keys = backend.jobs[flaky_job].feedback_keys
    assert len(keys) == sum(len(backend.jobs[flaky_job].feedback[t]) for t in range(EPOCHS))


def test_a_repeated_key_is_acknowledged_not_applied(served: tuple[str, FakeBackend]) -> None:
    url, backend = served
    with SelectionClient(url, token=TOKEN) as c:
        job = c.create_job(SPEC)["id"]
        idx, val = np.array([3, 4]), np.array([0.5, 1.5])
        first = post_feedback(c, job, 0, idx, val, rank=1, seq=7)
        again = post_feedback(c, job, 0, idx, val, rank=1, seq=7)
        other_rank = post_feedback(c, job, 0, idx, val, rank=0, seq=7)
        other_epoch = post_feedback(c, job, 1, idx, val, rank=1, seq=7)
        assert [first["duplicate"], again["duplicate"]] == [False, True]
        assert not other_rank["duplicate"] and not other_epoch["duplicate"]
        assert c.feedback(job, 0, idx, val) == {"epoch": 0, "count": 2}  # as before keys
        assert len(backend.jobs[job].feedback[0]) == 3  # keyless posts always apply
        with pytest.raises(SelectionError, match="rank and seq go together"):
            c._request("POST", f"/v1/jobs/{job}/epochs/0/feedback?rank=1", json={})


def test_a_refused_post_stops_the_reporter(served: tuple[str, FakeBackend]) -> None:
    url, _ = served
    with SelectionClient(url, token=TOKEN) as c:
        factor = c.create_job({**SPEC, "policy": {**SPEC["policy"], "name": "factor"}})["id"]
        reporter = FeedbackReporter(c, factor, post_samples=2, backoff=0.0)
        reporter.report([1, 2], [0.1, 0.2])  # posted in the background: 409, not retried
        with pytest.raises(SelectionError, match="feedback_not_accepted"):
            reporter.flush(timeout=10)
        with pytest.raises(SelectionError, match="feedback stopped"):
            reporter.report([3], [0.3])


def test_loss_weights_follow_the_epoch(served: tuple[str, FakeBackend]) -> None:
    url, _ = served
    with SelectionClient(url, token=TOKEN) as c:
        job = c.create_job(SPEC)["id"]  # infobatch: the fake weighs multiples of 3 by 2
        reporter = FeedbackReporter(c, job, rank=0, world_size=2)
        for epoch in (0, 2):
            reporter.set_epoch(epoch)
            idx = c.indices(job, epoch, 0, 2)[::-5].copy()
            w = reporter.loss_weights(torch.from_numpy(idx))
            assert isinstance(w, torch.Tensor) and w.dtype == torch.float32
            assert w.tolist() == np.where(idx % 3 == 0, 2.0, 1.0).tolist()
        missing = np.setdiff1d(np.arange(N), c.indices(job, 2, 0, 2))[:2]
        with pytest.raises(ValueError, match="not in rank 0's epoch 2"):
            reporter.loss_weights(missing)


def test_report_checks_lengths(served: tuple[str, FakeBackend]) -> None:
    with (
        SelectionClient(served[0], token=TOKEN) as c,
        pytest.raises(ValueError, match="differ in length"),
    ):
        FeedbackReporter(c, "job-0").report([1, 2], [0.5])


def test_a_resumed_reporter_continues_the_keys(served: tuple[str, FakeBackend]) -> None:
    """A trainer checkpoints (flush + state), posts 2 more batches, crashes; its resumed self
    re-trains those 2 batches: the service applies each of their losses once."""
    url, backend = served
    batches = [np.arange(8 * b, 8 * b + 8) for b in range(6)]
    with SelectionClient(url, token=TOKEN) as c:
        job = c.create_job(SPEC)["id"]
        first = FeedbackReporter(c, job, rank=1, world_size=2, epoch=1, post_samples=8)
        for b in batches[:3]:
            first.report(b, loss_of(b, 1))
        first.flush()
        ckpt = first.state_dict()
        for b in batches[3:5]:  # after the checkpoint, then the crash
            first.report(b, loss_of(b, 1))
        first.flush()
        resumed = FeedbackReporter(c, job, rank=1, world_size=2, post_samples=8)
        resumed.load_state_dict(ckpt)
        assert resumed.state_dict() == {"epoch": 1, "seq": 3}
        for b in batches[3:]:
            resumed.report(b, loss_of(b, 1))
        resumed.close()
        assert resumed.posted == 8  # batches 3 and 4 were acknowledged as duplicates
    got = np.concatenate([i for i, _ in backend.jobs[job].feedback[1]])
    assert sorted(got.tolist()) == list(range(48))


def test_losses_reported_but_never_flushed_are_posted_at_exit(
    served: tuple[str, FakeBackend],
) -> None:
    """A trainer that exits without close() or set_epoch still delivers its buffered losses."""
    url, backend = served
    with SelectionClient(url, token=TOKEN) as c:
        job = c.create_job(SPEC)["id"]
    code = (
        "from client import SelectionClient\n"
        "from client.feedback import FeedbackReporter\n"
        f"c = SelectionClient({url!r}, token={TOKEN!r})\n"
        f"r = FeedbackReporter(c, {job!r}, post_samples=4)\n"
        "for b in range(3):\n"
        "    r.report(list(range(5 * b, 5 * b + 5)), [0.5] * 5)\n"  # the last 5: only buffered
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=60)
    got = np.concatenate([i for i, _ in backend.jobs[job].feedback[0]])
    assert sorted(got.tolist()) == list(range(15))
