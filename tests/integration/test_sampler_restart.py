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

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client import SelectionClient, SelectionError, SelectionSampler
from workers.datasets import write_image_parquet

pytestmark = pytest.mark.ray

SAELECT = [sys.executable, "-m", "service.cli"]
EPOCHS = 3
RANK, WORLD = 1, 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``: the server, its Ray daemons and the Ray
    workers, which get process groups of their own but stay in the server's session."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, session
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(stat.parent.name))
    return pids


def _kill_session(proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    """SIGKILL every process of ``proc``'s session (a crash of the whole service) and wait."""
    deadline = time.monotonic() + timeout
    while pids := _session_pids(proc.pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes {pids} of session {proc.pid} survived SIGKILL")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    proc.wait(timeout=timeout)


class Server:
    """`saelect serve` as a subprocess in its own session and process group, logging to a file."""

    def __init__(self, cwd: Path, port: int, store: Path, env: dict[str, str]) -> None:
        self.log = cwd / f"serve-{time.monotonic_ns()}.log"
        cmd = [*SAELECT, "serve", "--host", "127.0.0.1", "--port", str(port)]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [*cmd, "--store", str(store)],
                env=env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )

    def crash(self) -> None:
        _kill_session(self.proc)

    def tail(self) -> str:
        return self.log.read_text()[-4000:]


def _patient_client(url: str) -> SelectionClient:
    # a cold start (torch + Ray import, ray.init, the actor) takes ~10 s on an idle machine and
    # several times that on a loaded one: connection errors are retried for up to ~3 minutes
    return SelectionClient(url, retries=180, backoff=0.5, max_backoff=1.0)


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
    port, store = _free_port(), tmp_path / "store"
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "SAELECT_ALLOWED_ROOTS": json.dumps([str(tmp_path)]),
        "SAELECT_URL_FILE": str(tmp_path / "url"),
    }
    first = Server(tmp_path, port, store, env)
    second: Server | None = None
    try:
        client = _patient_client(url)
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
