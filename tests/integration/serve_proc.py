"""`saelect serve` as a user runs it, for the tests that start, kill and list it as processes.

The server runs in its own session and process group (``start_new_session``); its embedded Ray's
daemons and workers get process groups of their own but stay in that session, so the session id
(the server's pid) finds every process the service started. Sockets are read from ``/proc``
(no psutil needed): a socket inode of a process's fd table, matched with ``/proc/net/{tcp,udp}``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from saelect.client import SelectionClient

SAELECT = [sys.executable, "-m", "saelect.service.cli"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def session_pids(sid: int) -> list[int]:
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
    return sorted(pids)


def alive(pids: list[int]) -> list[int]:
    """Those of ``pids`` that still exist and are not zombies."""
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(pid)
    return out


def command(pid: int) -> str:
    """The process's command line (space-joined), or '' once it is gone."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    return ""


def _hex_addr(text: str) -> str:
    """'0100007F:1F90' or a 32-hex-digit IPv6 address with port -> printable 'ip:port'."""
    addr, port = text.split(":")
    raw = bytes.fromhex(addr)
    if len(raw) == 4:
        ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:  # four host-order 32-bit words
        words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
        ip = socket.inet_ntop(socket.AF_INET6, words)
    return f"{ip}:{int(port, 16)}"


def listening_sockets(pids: list[int]) -> list[tuple[int, str, str]]:
    """(pid, protocol, 'ip:port') of every listening TCP and bound UDP socket of ``pids``."""
    owner: dict[str, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:["):
                        owner[link[8:-1]] = pid
    out = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if inode in owner and (state == "0A" or proto.startswith("udp")):
                    out.append((owner[inode], proto, _hex_addr(local)))
    return sorted(out)


def is_loopback(addr: str) -> bool:
    """Whether 'ip:port' is on 127.0.0.0/8, ::1 or an IPv4-mapped loopback address."""
    ip = addr.rsplit(":", 1)[0]
    return ip.startswith("127.") or ip == "::1" or ip.startswith("::ffff:127.")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a plain shell: no RAY_* variables (none of the test harness's)."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])  # the repo, as an install has
    return {**env, **extra}


def kill_session(proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    """SIGKILL every process of ``proc``'s session (a crash of the whole service) and wait."""
    deadline = time.monotonic() + timeout
    while pids := session_pids(proc.pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes {pids} of session {proc.pid} survived SIGKILL")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    proc.wait(timeout=timeout)


class Server:
    """`saelect serve` as a subprocess in its own session and process group, logging to a file."""

    def __init__(self, cwd: Path, port: int, store: Path, env: dict[str, str], *extra: str) -> None:
        self.log = cwd / f"serve-{time.monotonic_ns()}.log"
        cmd = [*SAELECT, "serve", "--host", "127.0.0.1", "--port", str(port), *extra]
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

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        """Every live process the service started (its session)."""
        return session_pids(self.proc.pid)

    def crash(self) -> None:
        """SIGKILL the whole session (every process the service started)."""
        kill_session(self.proc)

    def kill_group(self) -> None:
        """SIGKILL the `saelect serve` process group only (what a user's ``kill -9 -PGID`` does);
        Ray's daemons and workers, in groups of their own, must then go by themselves."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def tail(self) -> str:
        return self.log.read_text()[-4000:]


def patient_client(url: str) -> SelectionClient:
    """A client that retries connection errors for up to ~3 minutes: a cold start (torch and Ray
    imports, ray.init, the actor) takes ~10 s on an idle machine, several times that under load."""
    return SelectionClient(url, retries=180, backoff=0.5, max_backoff=1.0)
