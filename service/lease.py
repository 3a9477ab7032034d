"""One writer per store: a lease file with its owner and a heartbeat.

A service takes the lease of its store before it starts (``{store}/service.lease.json``) and
renews it every ``ttl_s / 3`` seconds from a daemon thread. A second service on the same
store refuses to start (`StoreOwnedError`, naming the owner) while the lease is live. A lease is
taken over when its heartbeat is older than ``ttl_s`` (the owner hung, or its host is gone),
or at once when its owner ran on this host and that process no longer exists (a crash or
SIGKILL: a restart need not wait). The pid check compares the process start time too, so a
reused pid does not keep a dead owner's lease alive.

Every write of the lease is conditional (`service.lease_cas`): taking a free lease is an
exclusive create, and taking over, renewing and releasing it are compare-and-swaps against the
version this service read or wrote last. Of two services that race for a store, exactly one
write lands and the other refuses. That holds on local directories (``link(2)`` and ``flock``)
and on S3 (``If-None-Match``/``If-Match``, with boto3); on other object stores (GCS) the lease
is write-then-verify, which narrows the race to ``settle_s`` but does not close it. A service
that finds its lease taken by another one (after a pause longer than ``ttl_s``) sets
`StoreLease.lost`, and `saelect serve` stops.

Example:
    >>> import tempfile
    >>> from workers.storage import Storage
    >>> root = Storage(tempfile.mkdtemp())
    >>> first = StoreLease(root, settle_s=0).acquire()
    >>> StoreLease(root, settle_s=0).acquire()  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    StoreOwnedError: ...
    >>> first.release()
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from saelect.service.lease_cas import LeaseObject, Token, lease_object
from saelect.workers.storage import Storage

log = logging.getLogger(__name__)

LEASE_FILE = "service.lease.json"
DEFAULT_TTL_S = 30.0


class StoreOwnedError(RuntimeError):
    """The store is owned by another live service."""


def _start_time(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux), or None if unknown."""
    try:
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115 - one read
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _pid_alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    now_start = _start_time(pid)
    return start is None or now_start is None or now_start == start


class StoreLease:
    """The lease of one store (see the module docstring).

    Parameters
    ----------
    storage:
        The store root.
    ttl_s:
        A heartbeat older than this frees the lease.
    settle_s:
        On stores without conditional writes only (`service.lease_cas.VerifiedLeaseObject`):
        the wait between writing the lease and reading it back.
    clock:
        Wall clock in seconds (tests pass a fake one).
    """

    def __init__(
        self,
        storage: Storage,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        settle_s: float = 0.2,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.storage = storage
        self.ttl_s = float(ttl_s)
        self.settle_s = settle_s
        self.clock = clock
        self.owner = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.lost = threading.Event()
        """Set when another service took the lease: this one must stop writing."""
        self.object: LeaseObject = lease_object(storage, LEASE_FILE, settle_s=settle_s)
        """Where the lease is stored, with conditional writes (`service.lease_cas`)."""
        self._token: Token | None = None  # the version of the lease this service wrote last
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def _doc(self, started: float) -> bytes:
        doc = {
            "owner": self.owner,
            "host": self.host,
            "pid": self.pid,
            "pid_start": _start_time(self.pid),
            "started": started,
            "heartbeat": self.clock(),
            "ttl_s": self.ttl_s,
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    def _read(self) -> tuple[dict[str, Any] | None, Token | None]:
        """The stored lease (None when there is none or it is unreadable) and its version (None
        when there is none)."""
        got = self.object.read()
        if got is None:
            return None, None
        try:
            doc = json.loads(got[0])
        except ValueError:  # torn or corrupted: nobody can prove they own it
            return None, got[1]
        return (doc if isinstance(doc, dict) else None), got[1]

    def read(self) -> dict[str, Any] | None:
        """The stored lease, or None when there is none or it is unreadable."""
        return self._read()[0]

    def holder_alive(self, doc: dict[str, Any]) -> bool:
        """Whether the lease ``doc`` belongs to a live service (not this one)."""
        age = self.clock() - float(doc.get("heartbeat", 0.0))
        if age > float(doc.get("ttl_s", self.ttl_s)):
            return False
        if doc.get("host") == self.host:
            return _pid_alive(int(doc.get("pid", -1)), doc.get("pid_start"))
        return True

    def acquire(self) -> StoreLease:
        """Take the lease and start renewing it; returns self.

        Raises
        ------
        StoreOwnedError
            When a live service owns the store, or another service took it at the same time.
        """
        doc, token = self._read()
        if doc is not None and doc.get("owner") != self.owner and self.holder_alive(doc):
            raise StoreOwnedError(_describe(self.storage, doc, self.clock()))
        if doc is not None and doc.get("owner") != self.owner:
            log.warning("taking over the lease of %s from %s", self.storage.root, _who(doc))
        started = self.clock()
        data = self._doc(started)
        # a free store: an exclusive create; a dead owner's lease: swapped only if unchanged
        new = self.object.create(data) if token is None else self.object.replace(data, token)
        if new is None:
            doc = self.read()
            raise StoreOwnedError(
                _describe(self.storage, doc, self.clock())
                if doc
                else f"store {self.storage.root}: lost the race for its lease"
            )
        self._token, self._started = new, started
        self._thread = threading.Thread(target=self._renew, name="store-lease", daemon=True)
        self._thread.start()
        return self

    def renew(self) -> bool:
        """Write a fresh heartbeat if the lease is still ours; sets `lost` and returns False if
        another service holds it."""
        data = self._doc(self._started)
        new = None if self._token is None else self.object.replace(data, self._token)
        if new is None:
            doc, token = self._read()
            if doc is None and token is None:  # deleted by hand: take it again, exclusively
                new = self.object.create(data)
            elif token is not None and (doc is None or doc.get("owner") == self.owner):
                # our write landed but its answer did not, or the file is unreadable
                new = self.object.replace(data, token)
            if new is None:
                doc = self.read()
                log.error("the lease of %s was taken by %s", self.storage.root, _who(doc or {}))
                self.lost.set()
                return False
        self._token = new
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.renew():
                    return
            except Exception:  # a transient store error: try again at the next beat
                log.exception("renewing the lease of %s failed", self.storage.root)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (unchanged since our last
        write)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._token is not None and not self.lost.is_set():
            with contextlib.suppress(OSError):
                self.object.delete(self._token)
            self._token = None


def _who(doc: dict[str, Any]) -> str:
    return f"pid {doc.get('pid')} on {doc.get('host')}"


def _describe(storage: Storage, doc: dict[str, Any], now: float) -> str:
    age = now - float(doc.get("heartbeat", 0.0))
    ttl = float(doc.get("ttl_s", DEFAULT_TTL_S))
    return (
        f"store {storage.root} is owned by another live saelect service ({_who(doc)}, "
        f"heartbeat {age:.1f} s ago); stop it first, or wait until its lease expires "
        f"({ttl:.0f} s without a heartbeat). One store takes one writer."
    )
