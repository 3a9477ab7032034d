"""A trainer's sampler rides out a real restart of `saelect serve`.

The service runs as a user runs it: `saelect serve` in its own session and process group (its
embedded Ray's processes stay in that session), on loopback, on a free port, over a store
directory. Every process of the session is killed with SIGKILL (a crash: nothing is flushed on
the way down) while a `SelectionSampler` waits in ``set_epoch``, then the service is started again
on the same port and store. The sampler must come back with
exactly the indices the service gave before the crash. The job uses ``rs2`` on digits, which is
ready in seconds (no scoring), so the whole test is two cold starts of the service.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from saelect.client import SelectionClient, SelectionError, SelectionSampler
from saelect.workers.datasets import write_image_parquet

from tests.integration.serve_proc import Server, free_port, patient_client

pytestmark = pytest.mark.ray

EPOCHS = 3
RANK, WORLD = 1, 2


class RecordingClient(SelectionClient):
    """A patient client that records the error codes its index requests met."""

    def __init__(self, url: str) -> None:
        super().__init__(url, retries=180, backoff=0.5, max_backoff=1.0)
        self.errors: list[str] = []

    def indices(self, *args: Any, **kwargs: Any) -> np.ndarray:
        try:
            return super().indices(*args, **kwargs)
        except SelectionError as exc:
            self.errors.append(exc.code)
            raise


def test_sampler_waiting_in_set_epoch_gets_the_same_indices_after_a_crash_restart(
    tmp_path: Path,
) -> None:
    train, _ = write_image_parquet(tmp_path / "data", "digits")
    spec = {
        "name": "restart",
        "dataset": {"uri": str(train), "label_column": "label",
                    "feature": {"kind": "pixels", "column": "image", "dim": 16}},
        "policy": {"name": "rs2", "ratio": 0.5, "epochs": EPOCHS, "seed": 7},
    }  # fmt: skip
    port, store = free_port(), tmp_path / "store"
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "SAELECT_ALLOWED_ROOTS": json.dumps([str(tmp_path)]),
        "SAELECT_URL_FILE": str(tmp_path / "url"),
    }
    first = Server(tmp_path, port, store, env)
    second: Server | None = None
    try:
        client = patient_client(url)
        try:
            client.healthz()
        except SelectionError as exc:
            raise AssertionError(f"saelect serve never answered:\n{first.tail()}") from exc
        job = client.create_job(spec)["id"]
        assert client.wait_ready(job, timeout=180, poll=0.2)["phase"] == "ready"
        before = [client.indices(job, t, RANK, WORLD) for t in range(EPOCHS)]
        recorder = RecordingClient(url)
        sampler = SelectionSampler(recorder, job, rank=RANK, world_size=WORLD)
        sampler.set_epoch(0)
        assert list(sampler) == before[0].tolist()

        first.crash()
        result: dict[str, Any] = {}

        def wait_in_set_epoch() -> None:
            try:
                sampler.set_epoch(2)
                result["indices"] = list(sampler)
            except Exception as exc:  # surfaced by the assertions below
                result["error"] = exc

        waiter = threading.Thread(target=wait_in_set_epoch, daemon=True)
        waiter.start()
        waiter.join(timeout=1.0)
        # nothing listens on the port: set_epoch can only wait (or fail, which it must not)
        assert waiter.is_alive(), result
        second = Server(tmp_path, port, store, env)
        waiter.join(timeout=240)
        assert not waiter.is_alive(), f"set_epoch still waits:\n{second.tail()}"
        assert "error" not in result, f"{result['error']!r}\n{second.tail()}"
        assert result["indices"] == before[2].tolist()
        assert set(recorder.errors) <= {"job_not_ready"}  # only the re-attach, if seen
        for t in (1, 0):  # and every other epoch, also after the restart
            sampler.set_epoch(t)
            assert list(sampler) == before[t].tolist()
        assert client.job(job)["phase"] == "ready"
    finally:  # the clean stop is test_cli_serve's; here a kill keeps the test short
        if second is not None:
            second.crash()
        first.crash()
