"""`saelect serve` as a process: loopback only, one writer per store, SIGKILL and restart, the
`saelect jobs` commands and a clean stop.

One module, three cold starts of the service on one store, started from the environment of a
plain shell (no RAY_* variable, `serve_proc.clean_env`):

1. every socket of every process the service started listens on loopback, and its Ray runs with
   token authentication; a second `saelect serve` on the store refuses at once (the lease);
2. SIGKILL of the `saelect serve` process group between epochs: its Ray processes (listed by
   PID) go by themselves; a `SelectionSampler` that starts waiting in ``set_epoch`` while nothing
   listens gets, after the restart, exactly the indices served before the kill; the restart
   serves the same bytes and the next epoch of the twin job;
3. SIGKILL while 32 ranks wait on the last epoch, which needs 8 more (killed as soon as epoch 3
   is committed): the ranks ride out the restart and get that epoch as the twin has it, and
   every epoch has the twin's stats (usage counted once);
4. `saelect jobs create/status/list/delete` against the third start, on a `factor` job (scored
   by the service), then SIGINT: the service exits 0 and nothing listens on its port any more.

A twin job with the same spec, never interrupted (its epochs computed before the first kill),
is the reference. Figures (seconds) are printed on a ``RELIABILITY`` line (run with ``-s``).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from saelect.client import SelectionClient, SelectionError, SelectionSampler
from saelect.workers.datasets import write_image_parquet

from tests.integration.serve_proc import (
    SAELECT,
    Server,
    alive,
    clean_env,
    command,
    free_port,
    is_loopback,
    kill_session,
    listening_sockets,
    patient_client,
)

pytestmark = pytest.mark.ray

EPOCHS, RANKS = 12, 32
ROWS = 1_000_000
"""Rows of the job's dataset: enough that an epoch takes a while to compute (rs2 reads labels
only), so the ranks are still waiting when the service is killed."""
PAIRS = [(0, 1), (0, 2), (1, 2), (2, 3), (7, 8)]
"""(rank, world size) pairs fetched byte for byte before and after each restart."""
SAMPLER_RANK, SAMPLER_WORLD = 1, 2
"""The `SelectionSampler` that waits in ``set_epoch`` through the first restart."""


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


def _jobs(url: str, *args: str) -> tuple[int, str, str]:
    """`saelect jobs ARGS --url URL` as a user runs it: (exit status, stdout, stderr)."""
    out = subprocess.run(
        [*SAELECT, "jobs", *args, "--url", url], capture_output=True, text=True, timeout=60
    )
    return out.returncode, out.stdout, out.stderr


def _write_dataset(path: Path) -> Path:
    """``ROWS`` rows: ``label`` int64 (ten classes) and an empty ``image`` column."""
    labels = np.random.default_rng(0).integers(0, 10, ROWS)
    table = pa.table({"image": pa.array([b""] * ROWS, pa.binary()), "label": labels})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def _raw(url: str, job: str, epoch: int, rank: int, world: int) -> bytes:
    """The binary answer for one rank, as bytes."""
    resp = httpx.get(
        f"{url}/v1/jobs/{job}/epochs/{epoch}/indices",
        params={"rank": rank, "world_size": world},
        headers={"Accept": "application/octet-stream"},
        timeout=120,
    )
    resp.raise_for_status()
    return resp.content


def _stats(client: SelectionClient, job: str, epoch: int) -> dict[str, Any]:
    stats = client.stats(job, epoch)
    stats.pop("selection_seconds", None)  # a timing, not part of the selection
    return stats


def _indices(client: SelectionClient, job: str, epoch: int, rank: int, world: int) -> np.ndarray:
    """A rank's indices, waiting through `job_not_ready` while a restarted job re-attaches."""
    deadline = time.monotonic() + 300
    while True:
        try:
            return client.indices(job, epoch, rank, world)
        except SelectionError as exc:
            if exc.code != "job_not_ready" or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _kill_and_watch(
    server: Server, before: list[int], timeout: float = 60.0
) -> tuple[list[int], float]:
    """SIGKILL the `saelect serve` process group only; return the PIDs the service had started
    (``before``, listed earlier, and its session's processes left right after the kill) and the
    seconds until none of them was left. Stragglers fail the test (then are killed)."""
    t0 = time.monotonic()
    server.kill_group()
    pids = sorted(set(before) | set(server.pids()))
    assert len(pids) > 3, pids  # the server, the GCS, the raylet, workers...
    while alive(pids) and time.monotonic() - t0 < timeout:
        time.sleep(0.1)
    left = {pid: command(pid) for pid in alive(pids)}
    if left:
        server.crash()
    assert not left, f"processes the killed service started outlived it: {left}"
    return pids, time.monotonic() - t0


def _committed(store: Path, job: str) -> set[str]:
    try:
        return set(json.loads((store / "jobs" / job / "manifest.json").read_text())["files"])
    except (OSError, ValueError):  # between two atomic writes of the manifest
        return set()


def test_serve_process_loopback_lease_and_sigkill_restarts(tmp_path: Path) -> None:
    train = _write_dataset(tmp_path / "data" / "rows.parquet")
    spec = {
        "name": "sigkill",
        "dataset": {"uri": str(train), "label_column": "label",
                    "feature": {"kind": "pixels", "column": "image", "dim": 16}},
        "policy": {"name": "rs2", "ratio": 0.5, "epochs": EPOCHS, "seed": 3},
    }  # fmt: skip
    port, store = free_port(), tmp_path / "store"
    url = f"http://127.0.0.1:{port}"
    env = clean_env(
        SAELECT_ALLOWED_ROOTS=json.dumps([str(tmp_path)]),
        SAELECT_URL_FILE=str(tmp_path / "url"),
        SAELECT_LOG_LEVEL="INFO",  # epoch timings in the server's log
    )
    figures: dict[str, Any] = {}
    servers: list[Server] = []

    def start() -> SelectionClient:
        t0 = time.monotonic()
        servers.append(server := Server(tmp_path, port, store, env))
        deadline = t0 + 300  # a cold start: ~10 s idle, several times that under load
        while True:
            if server.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"saelect serve never answered:\n{server.tail()}")
            try:
                with SelectionClient(url, retries=0) as probe:
                    probe.healthz()
                break
            except SelectionError:
                time.sleep(0.5)
        client = patient_client(url)
        figures.setdefault("healthz_s", []).append(round(time.monotonic() - t0, 1))
        return client

    try:
        # 1) loopback, token auth, the lease
        client = start()
        first = servers[0]
        sockets = listening_sockets(first.pids())
        assert sockets, "no listening socket found"
        exposed = [(pid, command(pid)[:60], addr) for pid, _, addr in sockets
                   if not is_loopback(addr)]  # fmt: skip
        assert not exposed, f"sockets off loopback: {exposed}"
        gcs = [p for p in first.pids() if "gcs_server" in command(p)]
        assert gcs, first.pids()
        assert b"RAY_AUTH_MODE=token" in Path(f"/proc/{gcs[0]}/environ").read_bytes().split(b"\0")
        figures["sockets"] = len(sockets)
        t0 = time.monotonic()
        second = Server(tmp_path, free_port(), store, env)
        assert second.proc.wait(timeout=120) == 3, second.tail()
        figures["second_refused_s"] = round(time.monotonic() - t0, 1)
        assert f"owned by another live saelect service (pid {first.pid}" in second.tail()

        job, twin = (client.create_job(spec)["id"] for _ in range(2))
        for j in (job, twin):
            assert client.wait_ready(j, timeout=300, poll=0.2)["phase"] == "ready"
        reference = {t: [_indices(client, twin, t, r, RANKS) for r in range(RANKS)]
                     for t in range(EPOCHS)}  # fmt: skip
        ref_stats = {t: _stats(client, twin, t) for t in range(EPOCHS)}
        served = {(t, r, w): _raw(url, job, t, r, w) for t in (0, 1) for r, w in PAIRS}
        recorder = RecordingClient(url)
        sampler = SelectionSampler(recorder, job, rank=SAMPLER_RANK, world_size=SAMPLER_WORLD)
        sampler_ref = {t: client.indices(twin, t, SAMPLER_RANK, SAMPLER_WORLD).tolist()
                       for t in (0, 1, 2)}  # fmt: skip
        sampler.set_epoch(0)
        assert list(sampler) == sampler_ref[0]

        # 2) SIGKILL between epochs (0 and 1 served), restart on the store
        pids, figures["kill1_gone_s"] = _kill_and_watch(first, first.pids())
        figures["kill1_pids"] = len(pids)
        waited: dict[str, Any] = {}

        def wait_in_set_epoch() -> None:
            try:
                sampler.set_epoch(1)  # served before the kill: the restart must not change it
                waited["indices"] = list(sampler)
            except Exception as exc:  # surfaced by the assertions below
                waited["error"] = exc

        waiter = threading.Thread(target=wait_in_set_epoch, daemon=True)
        waiter.start()
        waiter.join(timeout=1.0)
        # nothing listens on the port: set_epoch can only wait (or fail, which it must not)
        assert waiter.is_alive(), waited
        client = start()
        t0 = time.monotonic()
        assert client.wait_ready(job, timeout=300, poll=0.2)["epochs_committed"] == 2
        figures["ready_after_restart_s"] = round(time.monotonic() - t0, 1)
        assert not alive(pids)  # the restart started its own processes; none of the old ones
        for (t, r, w), data in served.items():
            assert _raw(url, job, t, r, w) == data, (t, r, w)
        assert _stats(client, job, 2) == ref_stats[2]
        for r in range(RANKS):
            assert np.array_equal(_indices(client, job, 2, r, RANKS), reference[2][r])
        waiter.join(timeout=240)
        assert not waiter.is_alive(), f"set_epoch still waits:\n{servers[-1].tail()}"
        assert "error" not in waited, f"{waited['error']!r}\n{servers[-1].tail()}"
        assert waited["indices"] == sampler_ref[1]
        assert set(recorder.errors) <= {"job_not_ready"}  # only the re-attach, if seen
        for t in (2, 0):  # and other epochs, also after the restart
            sampler.set_epoch(t)
            assert list(sampler) == sampler_ref[t]

        # 3) SIGKILL while 32 ranks wait on the last epoch (killed once epoch 3 is committed)
        client.wait_ready(twin, timeout=300, poll=0.2)  # the twin is rebuilt by the restart too
        figures["epoch_s"] = [round(client.stats(twin, t)["selection_seconds"], 3)
                              for t in range(EPOCHS)]  # fmt: skip
        before = servers[-1].pids()
        answers: dict[int, np.ndarray] = {}
        errors: list[BaseException] = []

        def rank(r: int) -> None:
            try:
                answers[r] = _indices(patient_client(url), job, EPOCHS - 1, r, RANKS)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(RANKS)]
        for th in threads:
            th.start()
        deadline = time.monotonic() + 120
        while "epochs/000003.npy" not in _committed(store, job):
            assert time.monotonic() < deadline, servers[-1].tail()
            time.sleep(0.005)
        pids, figures["kill2_gone_s"] = _kill_and_watch(servers[-1], before)
        committed = sorted(r for r in _committed(store, job) if r.endswith(".npy"))
        figures["committed_at_kill2"] = committed
        assert not answers, "the ranks were answered before the kill: nothing was in flight"
        start()
        for th in threads:
            th.join(timeout=300)
        assert not errors, errors
        assert sorted(answers) == list(range(RANKS))
        for r in range(RANKS):
            assert np.array_equal(answers[r], reference[EPOCHS - 1][r]), r
        for t in range(EPOCHS):
            assert _stats(client, job, t) == ref_stats[t], t  # usage counted once
        for (t, r, w), data in served.items():
            assert _raw(url, job, t, r, w) == data, (t, r, w)

        # 4) the `saelect jobs` commands on a factor job, then a clean stop (SIGINT)
        _jobs_lifecycle_on_a_factor_job(tmp_path, url, client, others={job, twin})
        last = servers[-1]
        last.proc.send_signal(signal.SIGINT)
        assert last.proc.wait(timeout=60) == 0, last.tail()
        log = last.log.read_text()
        assert f"saelect serving on {url}" in log and "stopping" in log, log[-4000:]
        time.sleep(0.5)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP) as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more
    finally:
        for server in servers:
            if server.proc.poll() is None or server.pids():
                server.crash()
    print("RELIABILITY", json.dumps(figures))


def _jobs_lifecycle_on_a_factor_job(
    tmp_path: Path, url: str, client: SelectionClient, others: set[str]
) -> None:
    """`saelect jobs create`, `status` (also of an unknown job), `list` and `delete` on a
    digits `factor` job the service scores; the ``others`` jobs of the store stay listed."""
    train, _ = write_image_parquet(tmp_path / "digits", "digits")
    spec = {
        "name": "cli",
        "dataset": {"uri": str(train), "label_column": "label",
                    "feature": {"kind": "pixels", "column": "image", "dim": 16}},
        "policy": {"name": "factor", "ratio": 0.3, "epochs": 4, "seed": 0},
        "sae": {"units": 64, "k": 4, "epochs": 2},
    }  # fmt: skip
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    rc, out, err = _jobs(url, "create", str(spec_path))
    assert rc == 0, err
    job = json.loads(out)["id"]
    assert json.loads(out)["phase"] == "pending"
    client.wait_ready(job, timeout=180, poll=0.3)
    rc, out, _ = _jobs(url, "status", job)
    assert rc == 0 and json.loads(out)["phase"] == "ready"
    n = json.loads(out)["num_samples"]
    assert n == 1438  # the digits train split (80% of 1797)
    assert len(client.indices(job, 0, 0, 1)) == round(0.3 * n)
    rc, out, _ = _jobs(url, "list")
    assert rc == 0 and sorted(j["id"] for j in json.loads(out)) == sorted({job, *others})
    rc, _, err = _jobs(url, "status", "no-such-job")
    assert rc == 2 and "404 unknown_job" in err
    rc, out, _ = _jobs(url, "delete", job)
    assert rc == 0 and json.loads(out) == {"deleted": job}
    assert sorted(j["id"] for j in client.jobs()) == sorted(others)


PYTHON_API = """
import json, os, sys
import ray  # imported first, with the hostile environment below: Ray caches what it read
from saelect.service.server import init_ray
from tests.integration.serve_proc import listening_sockets, session_pids
from ray._raylet import AuthenticationMode, get_authentication_mode

assert init_ray(num_cpus=1)

@ray.remote(num_cpus=0)
class Probe:
    def pid(self):
        return os.getpid()

probe = Probe.remote()
ray.get(probe.pid.remote())
print(json.dumps({"sockets": listening_sockets(session_pids(os.getsid(0))),
                  "token": get_authentication_mode() == AuthenticationMode.TOKEN}))
"""


def test_python_api_after_import_ray_in_a_hostile_environment_still_binds_loopback(
    tmp_path: Path,
) -> None:
    """`init_ray` from Python after ``import ray``, with ``RAY_AUTH_MODE=disabled`` and
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1`` in the environment: loopback and tokens all the same."""
    env = clean_env(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", PYTHON_API], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        kill_session(proc)  # whatever of its Ray is left
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["token"], result
    assert result["sockets"], result
    exposed = [s for s in result["sockets"] if not is_loopback(s[2])]
    assert not exposed, f"sockets off loopback: {exposed}"
