"""One writer per store: the lease refuses a second live owner and frees itself when the owner is
gone (`service.lease`). The two-process test is in tests/integration/test_serve_process.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from saelect.service.lease import LEASE_FILE, StoreLease, StoreOwnedError
from saelect.workers.storage import Storage


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _lease(root: Storage, clock: Clock, **kw: object) -> StoreLease:
    return StoreLease(root, ttl_s=30.0, settle_s=0.0, clock=clock, **kw)  # type: ignore[arg-type]


def test_a_live_owner_on_this_host_keeps_the_store(tmp_path: Path) -> None:
    root, clock = Storage(str(tmp_path)), Clock()
    first = _lease(root, clock).acquire()
    with pytest.raises(StoreOwnedError, match=rf"pid {first.pid} on {first.host}.*one writer"):
        _lease(root, clock).acquire()
    clock.now += 29.0  # not expired yet
    with pytest.raises(StoreOwnedError):
        _lease(root, clock).acquire()
    first.release()
    assert not root.exists(LEASE_FILE)
    _lease(root, clock).acquire().release()  # free once released


def test_another_hosts_lease_is_taken_over_only_after_it_expires(tmp_path: Path) -> None:
    root, clock = Storage(str(tmp_path)), Clock()
    remote = _lease(root, clock)
    remote.host = "another-host"  # its pid means nothing here: only the heartbeat counts
    remote.acquire()
    remote._stop.set()  # its heartbeats stop (the host is gone)
    clock.now += 29.0
    with pytest.raises(StoreOwnedError, match="another-host"):
        _lease(root, clock).acquire()
    clock.now += 2.0  # 31 s without a heartbeat > ttl 30 s
    mine = _lease(root, clock).acquire()
    assert root.read_json(LEASE_FILE)["owner"] == mine.owner
    assert not remote.renew() and remote.lost.is_set()  # the old owner learns it lost the store
    assert root.read_json(LEASE_FILE)["owner"] == mine.owner
    mine.release()


def test_a_dead_owner_on_this_host_frees_the_store_at_once(tmp_path: Path) -> None:
    root, clock = Storage(str(tmp_path)), Clock()
    dead = _lease(root, clock)
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    dead.pid = int(proc.stdout)  # a process of this host that no longer exists
    dead.acquire()
    dead._stop.set()
    mine = _lease(root, clock).acquire()  # no wait for the 30 s ttl
    assert root.read_json(LEASE_FILE)["owner"] == mine.owner
    mine.release()


def test_a_renewed_lease_stays_live_past_the_ttl(tmp_path: Path) -> None:
    root, clock = Storage(str(tmp_path)), Clock()
    first = _lease(root, clock)
    first.host = "another-host"
    first.acquire()
    for _ in range(4):  # 4 beats 20 s apart: 80 s in all, never 30 s without a heartbeat
        clock.now += 20.0
        assert first.renew()
    with pytest.raises(StoreOwnedError):
        _lease(root, clock).acquire()
    first.release()


def test_an_unreadable_lease_file_does_not_lock_the_store(tmp_path: Path) -> None:
    root, clock = Storage(str(tmp_path)), Clock()
    root.write_bytes(LEASE_FILE, b'{"owner": "x", "heartb')  # torn
    _lease(root, clock).acquire().release()


def test_serve_refuses_a_store_a_live_service_owns_before_starting_ray(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from saelect.service.server import serve_forever
    from saelect.service.settings import Settings

    owner = StoreLease(Storage(str(tmp_path)), settle_s=0.0).acquire()
    try:
        assert serve_forever(Settings(store=str(tmp_path), port=0)) == 3
    finally:
        owner.release()
    assert f"owned by another live saelect service (pid {owner.pid}" in capsys.readouterr().err
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
