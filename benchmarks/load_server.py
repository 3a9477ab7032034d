"""The load benchmark's server side: `saelect serve` started on a free loopback port, the CPU
seconds of its process tree (psutil), py-spy on its SelectionActor, and the epochs computed
scraped from ``/metrics``.

Used by benchmarks/load.py; kept apart so that the runner stays short.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def tree_cpu(pid: int) -> dict[int, tuple[float, str]]:
    """``pid -> (user + system CPU seconds, name)`` over ``pid`` and all its descendants."""
    import psutil

    out: dict[int, tuple[float, str]] = {}
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = (t.user + t.system, " ".join(p.cmdline()[:2]) or p.name())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def cpu_delta(before: dict[int, tuple[float, str]], after: dict[int, tuple[float, str]]) -> float:
    """CPU seconds the processes of ``after`` spent since ``before`` (new ones from zero)."""
    return sum(t - before.get(pid, (0.0, ""))[0] for pid, (t, _) in after.items())


def actor_cpu(snapshot: dict[int, tuple[float, str]]) -> float:
    """CPU seconds of the SelectionActor's process(es) in ``snapshot``."""
    return sum(t for t, name in snapshot.values() if "SelectionActor" in name)


def start_profile(snapshot: dict[int, tuple[float, str]], out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling the SelectionActor (its pid from ``snapshot``) into ``out`` (collapsed
    stacks, idle frames included), until SIGINT."""
    pid = next(p for p, (_, name) in snapshot.items() if "SelectionActor" in name)
    spy = Path(sys.executable).with_name("py-spy")
    cmd = [str(spy), "record", "--pid", str(pid), "--format", "raw", "--rate", "200"]
    cmd += ["--idle", "--threads", "--nonblocking", "--output", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def epochs_computed_total(url: str) -> float:
    """``saelect_epochs_computed_total`` from ``url``'s /metrics, summed over its labels."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(
        float(m.group(1))
        for m in re.finditer(r"^saelect_epochs_computed_total\{[^}]*\} (\S+)$", text, re.M)
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SERVING = {"fast": "true", "routes": "false"}
"""Serving modes: ``fast`` answers in-memory epochs before the routes (the default),
``routes`` sends every request through FastAPI (``SAELECT_FAST_INDICES``)."""


def start_server(work: Path, serving: str = "fast") -> tuple[subprocess.Popen[bytes], str]:
    """`saelect serve` on a free loopback port, in its own process group; waits for /healthz."""
    import httpx

    port = _free_port()
    env = {**os.environ, **RAY_ENV, "SAELECT_ALLOWED_ROOTS": json.dumps([str(work)])}
    env["SAELECT_URL_FILE"] = str(work / "url")
    env["SAELECT_FAST_INDICES"] = SERVING[serving]
    store = work / f"store-{serving}"
    cmd = [sys.executable, "-m", "saelect.service.cli", "serve", "--store", str(store)]
    cmd += ["--port", str(port)]
    log = open(work / "serve.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"saelect serve exited: {(work / 'serve.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("saelect serve did not answer /healthz in 300 s")
