"""`saelect serve` and `saelect jobs ...` as a user runs them: separate processes, real HTTP.

The server process starts its own embedded local Ray; SIGINT stops it cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from saelect.client import SelectionClient
from saelect.workers.datasets import write_image_parquet

from tests.integration.serve_proc import SAELECT, free_port

pytestmark = pytest.mark.ray


def _jobs(url: str, *args: str) -> tuple[int, str, str]:
    out = subprocess.run(
        [*SAELECT, "jobs", *args, "--url", url], capture_output=True, text=True, timeout=60
    )
    return out.returncode, out.stdout, out.stderr


def test_serve_jobs_lifecycle_and_clean_stop(tmp_path: Path) -> None:
    train, _ = write_image_parquet(tmp_path / "data", "digits")
    spec = {
        "name": "cli",
        "dataset": {
            "uri": str(train),
            "label_column": "label",
            "feature": {"kind": "pixels", "column": "image", "dim": 16},
        },
        "policy": {"name": "factor", "ratio": 0.3, "epochs": 4, "seed": 0},
        "sae": {"units": 64, "k": 4, "epochs": 2},
    }
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "SAELECT_ALLOWED_ROOTS": json.dumps([str(tmp_path)])}
    cmd = [*SAELECT, "serve", "--port", str(port), "--store", str(tmp_path / "store")]
    server = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        # a cold start (torch + Ray import, ray.init, the actor) takes ~10 s on an idle machine
        # and several times that on a loaded one: wait up to ~3 minutes
        client = SelectionClient(url, retries=180, backoff=0.5, max_backoff=1.0)
        try:
            health = client.healthz()
        except Exception as exc:
            server.kill()
            log = server.communicate()[0]
            raise AssertionError(f"saelect serve never answered:\n{log}") from exc
        assert health["status"] == "ok"
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
        assert [j["id"] for j in json.loads(out)] == [job]
        rc, _, err = _jobs(url, "status", "no-such-job")
        assert rc == 2 and "404 unknown_job" in err
        rc, out, _ = _jobs(url, "delete", job)
        assert rc == 0 and json.loads(out) == {"deleted": job}
        assert client.jobs() == []
    finally:
        server.send_signal(signal.SIGINT)
        try:
            log, _ = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            log, _ = server.communicate()
    assert server.returncode == 0, log
    assert f"saelect serving on {url}" in log and "stopping" in log
    time.sleep(0.5)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP) as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more
