"""One writer per store: the lease refuses a second live owner and frees itself when the owner is
gone (`service.lease`), and its writes are conditional, so two services that race never both own
a store (`service.lease_cas`): on a local directory and on S3 (a moto server on loopback). The
two-process test of `saelect serve` is in tests/integration/test_serve_process.py."""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from saelect.service.lease import LEASE_FILE, StoreLease, StoreOwnedError
from saelect.service.lease_cas import LocalLeaseObject, S3LeaseObject, VerifiedLeaseObject
from saelect.workers.storage import Storage

RACE_ROUNDS = 20
"""Rounds of each two-process race. With a condition of the lease's writes dropped, both racers
won in most rounds (each breakage of docs/reliability.md failed its race)."""


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """``host:port`` of a moto S3 server on a free loopback port, with the bucket ``leases``.

    The server answers one request at a time: moto checks a put's If-None-Match/If-Match and then
    writes, without a lock between the two, where S3 does both as one step; answering one
    request at a time makes the moto server as atomic as S3 (the clients still race).
    """
    pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    import boto3
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", 0, app, threaded=False, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, name="moto-s3", daemon=True)
    thread.start()
    endpoint = f"127.0.0.1:{server.server_address[1]}"
    client = boto3.client(
        "s3",
        endpoint_url=f"http://{endpoint}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket="leases")
    yield endpoint
    server.shutdown()
    thread.join(timeout=5)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """An empty store: a local directory, or a fresh prefix of the moto S3 bucket."""
    if request.param == "local":
        return Storage(str(tmp_path))
    endpoint = request.getfixturevalue("s3_endpoint")
    root = Storage(  # the keys in the URI: pyarrow and the lease's boto3 client both take them
        f"s3://testing:testing@leases/{uuid.uuid4().hex}"
        f"?endpoint_override={endpoint}&scheme=http&region=us-east-1"
    )
    assert isinstance(StoreLease(root).object, S3LeaseObject)  # not the write-then-verify one
    return root


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _lease(root: Storage, clock: Clock, **kw: object) -> StoreLease:
    return StoreLease(root, ttl_s=30.0, settle_s=0.0, clock=clock, **kw)  # type: ignore[arg-type]


def test_a_live_owner_on_this_host_keeps_the_store(store: Storage) -> None:
    root, clock = store, Clock()
    first = _lease(root, clock).acquire()
    with pytest.raises(StoreOwnedError, match=rf"pid {first.pid} on {first.host}.*one writer"):
        _lease(root, clock).acquire()
    clock.now += 29.0  # not expired yet
    with pytest.raises(StoreOwnedError):
        _lease(root, clock).acquire()
    first.release()
    assert not root.exists(LEASE_FILE)
    _lease(root, clock).acquire().release()  # free once released


def test_another_hosts_lease_is_taken_over_only_after_it_expires(store: Storage) -> None:
    root, clock = store, Clock()
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
    remote.release()  # the old owner's release leaves the new owner's lease alone
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


def test_the_local_and_s3_stores_get_conditional_writes(tmp_path: Path) -> None:
    assert isinstance(StoreLease(Storage(str(tmp_path))).object, LocalLeaseObject)
    assert isinstance(StoreLease(Storage(f"file://{tmp_path}")).object, LocalLeaseObject)


def test_other_filesystems_keep_write_then_verify(tmp_path: Path) -> None:
    """A filesystem without conditional writes (here a pyarrow SubTreeFileSystem) gets the
    write-then-verify lease: it still refuses a live owner and is taken over once expired."""
    import pyarrow.fs as pafs

    root = Storage("/", filesystem=pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()))
    clock = Clock()
    first = _lease(root, clock)
    assert isinstance(first.object, VerifiedLeaseObject)
    first.host = "another-host"
    first.acquire()
    first._stop.set()
    with pytest.raises(StoreOwnedError, match="another-host"):
        _lease(root, clock).acquire()
    clock.now += 31.0
    mine = _lease(root, clock).acquire()
    assert not first.renew() and first.lost.is_set()
    mine.release()
    assert not root.exists(LEASE_FILE)


def _expired_lease() -> dict[str, Any]:
    """A lease of another host whose last heartbeat is long past."""
    return {"owner": "gone", "host": "another-host", "pid": 1, "heartbeat": 0.0, "ttl_s": 30.0}


def _first_read_sees(lease: StoreLease, seen: tuple[bytes, Any] | None) -> StoreLease:
    """Make the next read of ``lease`` answer ``seen`` (what it would have read earlier); later
    reads see the store."""
    real, answers = lease.object.read, [seen]
    lease.object.read = lambda: answers.pop() if answers else real()  # type: ignore[method-assign]
    return lease


def test_a_service_that_read_a_free_store_loses_to_the_one_that_took_it(store: Storage) -> None:
    """The exclusive create: B read the store before A's lease landed, so B writes after A."""
    clock = Clock()
    first = _lease(store, clock).acquire()
    late = _first_read_sees(_lease(store, clock), None)  # B read the store before A wrote
    with pytest.raises(StoreOwnedError, match=rf"pid {first.pid} on {first.host}"):
        late.acquire()
    assert store.read_json(LEASE_FILE)["owner"] == first.owner
    first.release()


def test_of_two_services_taking_over_one_expired_lease_one_wins(store: Storage) -> None:
    """The compare-and-swap: B and C both read the expired lease; B swaps it first, C's swap
    against what it read must fail."""
    clock = Clock()
    store.write_json(LEASE_FILE, _expired_lease())
    stale = StoreLease(store).object.read()
    b = _lease(store, clock).acquire()
    c = _first_read_sees(_lease(store, clock), stale)  # C read the expired lease before B
    with pytest.raises(StoreOwnedError, match=rf"pid {b.pid}"):
        c.acquire()
    assert store.read_json(LEASE_FILE)["owner"] == b.owner
    assert b.renew() and not b.lost.is_set()
    b.release()
    assert not store.exists(LEASE_FILE)


def _racer(commands: Any, barrier: Any, answers: Any) -> None:
    """One of the two racing processes. For each command ``(root, rounds)``: each round, try to
    take the lease of ``root``, report whether this process got it, and release it once both
    answers are in. ``None`` ends it."""
    logging.disable(logging.WARNING)  # "taking over the lease" every takeover round
    while (command := commands.get()) is not None:
        storage, rounds = Storage(command[0]), command[1]
        for r in range(rounds):
            barrier.wait()
            lease = None
            with contextlib.suppress(StoreOwnedError):
                lease = StoreLease(storage, settle_s=0.0).acquire()
            answers.put((r, lease is not None))
            barrier.wait()  # both answers are in
            if lease is not None:
                lease.release()
            barrier.wait()  # the store is free (the parent may set it up for the next round)


@pytest.fixture(scope="module")
def racers() -> Iterator[tuple[Any, Any, Any]]:
    """Two processes that race for a lease on command (`_racer`), started once for the module:
    their command queue, the barrier they share with the test, and their answer queue."""
    ctx = mp.get_context("spawn")  # no fork of this process's threads (the moto server)
    commands, barrier, answers = ctx.Queue(), ctx.Barrier(3, timeout=60), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(commands, barrier, answers)) for _ in range(2)]
    for p in procs:
        p.start()
    yield commands, barrier, answers
    for _ in procs:
        commands.put(None)
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]


def _race(racers: tuple[Any, Any, Any], store: Storage, *, expired: bool) -> list[int]:
    """Winners per round of the two racing processes, ``RACE_ROUNDS`` rounds for the lease of
    ``store`` (``expired``: a dead owner's expired lease is in the store as each round starts)."""
    commands, barrier, answers = racers
    for _ in range(2):
        commands.put((store.root, RACE_ROUNDS))
    winners, lease_object = [], StoreLease(store).object  # one request a write, on S3 too
    for _ in range(RACE_ROUNDS):
        if expired:
            assert lease_object.create(json.dumps(_expired_lease()).encode()) is not None
        barrier.wait()
        barrier.wait()
        got = [answers.get(timeout=60) for _ in range(2)]
        winners.append(sum(won for _, won in got))
        barrier.wait()
        assert lease_object.read() is None  # the winner released it
    return winners


def test_two_processes_racing_for_a_free_store_never_both_win(
    racers: tuple[Any, Any, Any], store: Storage
) -> None:
    assert _race(racers, store, expired=False) == [1] * RACE_ROUNDS


def test_two_processes_racing_to_take_over_an_expired_lease_never_both_win(
    racers: tuple[Any, Any, Any], store: Storage
) -> None:
    assert _race(racers, store, expired=True) == [1] * RACE_ROUNDS
