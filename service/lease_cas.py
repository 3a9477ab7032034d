"""Compare-and-swap of one small object (the store's lease), per kind of store.

`service.lease.StoreLease` decides who may own a store; this module makes its writes race-free.
Every backend offers the same four operations on one object, each answering whether it held:

- ``read()``: the object's bytes and a version token, or None when there is none;
- ``create(data)``: write ``data`` only if there is no object (an exclusive create);
- ``replace(data, token)``: write ``data`` only if the object is still at version ``token``;
- ``delete(token)``: delete the object only if it is still at version ``token``.

Of two writers that race, exactly one `create` or `replace` from the same state succeeds; the
other gets None and learns it lost. The backend is chosen by the store's filesystem:

- a local directory (`LocalLeaseObject`): the create is a hard link of a complete temporary file
  onto the name (``link(2)`` fails if the name exists); replace and delete take an exclusive
  ``flock`` on ``{name}.lock`` while they compare the bytes and move the new file in. The token
  is the object's bytes.
- S3 (`S3LeaseObject`, needs boto3, the ``s3`` extra): conditional writes, ``put_object`` with
  ``If-None-Match: *`` for the create and ``If-Match: <etag>`` for replace, ``delete_object``
  with ``If-Match``; S3 answers 412 when the condition fails. The token is the ETag.
- any other pyarrow filesystem (`VerifiedLeaseObject`: GCS, HDFS, an in-memory one): write, wait
  ``settle_s``, read back. This narrows the race to ``settle_s``; it does not close it.

Example:
    >>> import tempfile
    >>> from saelect.workers.storage import Storage
    >>> obj = lease_object(Storage(tempfile.mkdtemp()), "a.json")
    >>> token = obj.create(b"1")
    >>> obj.create(b"2") is None, obj.replace(b"3", b"stale") is None
    (True, True)
    >>> obj.replace(b"4", token) is not None, obj.read()[0]
    (True, b'4')
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any, Protocol

import pyarrow.fs as pafs
from saelect.workers.storage import TMP_MARKER, Storage

log = logging.getLogger(__name__)

Token = bytes | str
"""A version of the object: its bytes (local, verified) or its ETag (S3)."""


class LeaseObject(Protocol):
    """One object with conditional writes (see the module docstring)."""

    def read(self) -> tuple[bytes, Token] | None:
        """The object's bytes and version, or None when it does not exist."""
        ...

    def create(self, data: bytes) -> Token | None:
        """Write ``data`` if there is no object; its new version, or None if there was one."""
        ...

    def replace(self, data: bytes, token: Token) -> Token | None:
        """Write ``data`` if the object is at version ``token``; its new version, or None."""
        ...

    def delete(self, token: Token) -> bool:
        """Delete the object if it is at version ``token``; whether it did."""
        ...


class LocalLeaseObject:
    """An object in a local directory: exclusive create by ``link(2)``, compare-and-swap under
    ``flock`` (see the module docstring). ``path`` is the object's absolute path."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock_path = f"{path}.lock"

    def _tmp(self, data: bytes) -> str:
        parent, name = os.path.split(self.path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{name}{TMP_MARKER}{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the last descriptor releases the lock

    def read(self) -> tuple[bytes, Token] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, data

    def create(self, data: bytes) -> Token | None:
        tmp = self._tmp(data)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)
        return data

    def replace(self, data: bytes, token: Token) -> Token | None:
        with self._locked():
            now = self.read()
            if now is None or now[1] != token:
                return None
            tmp = self._tmp(data)
            try:
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        return data

    def delete(self, token: Token) -> bool:
        with self._locked():
            now = self.read()
            if now is None or now[1] != token:
                return False
            os.unlink(self.path)
        return True


class S3LeaseObject:
    """An object in S3 (or an S3-compatible store that honours conditional writes), written with
    ``If-None-Match``/``If-Match``. ``client`` is a boto3 S3 client."""

    LOST = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404"})
    """Error codes that mean the condition did not hold (409: a concurrent conditional write)."""

    def __init__(self, client: Any, bucket: str, key: str) -> None:
        self.client, self.bucket, self.key = client, bucket, key

    @classmethod
    def for_storage(cls, storage: Storage, rel: str) -> S3LeaseObject:
        """The object ``rel`` of an S3 store, with the endpoint, region and keys of its pyarrow
        filesystem."""
        import boto3

        opts = _s3_options(storage.fs)
        endpoint = opts.get("endpoint_override") or None
        if endpoint and "://" not in endpoint:
            endpoint = f"{opts.get('scheme') or 'https'}://{endpoint}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=opts.get("region") or None,
            aws_access_key_id=opts.get("access_key") or None,
            aws_secret_access_key=opts.get("secret_key") or None,
            aws_session_token=opts.get("session_token") or None,
            verify=opts.get("tls_ca_file_path") or None,
        )
        bucket, _, key = storage.path(rel).partition("/")
        return cls(client, bucket, key)

    def _code(self, exc: Exception) -> str:
        return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))

    def read(self) -> tuple[bytes, Token] | None:
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.ClientError as exc:
            if self._code(exc) in ("NoSuchKey", "404"):
                return None
            raise
        return got["Body"].read(), str(got["ETag"])

    def _put(self, data: bytes, **cond: str) -> Token | None:
        try:
            put = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, **cond)
        except self.client.exceptions.ClientError as exc:
            if self._code(exc) in self.LOST:
                return None
            raise
        return str(put["ETag"])

    def create(self, data: bytes) -> Token | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, token: Token) -> Token | None:
        return self._put(data, IfMatch=str(token))

    def delete(self, token: Token) -> bool:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=str(token))
        except self.client.exceptions.ClientError as exc:
            if self._code(exc) in self.LOST:
                return False
            raise
        return True


class VerifiedLeaseObject:
    """Any pyarrow filesystem: write atomically, wait ``settle_s``, read back. Of two writers
    that race within ``settle_s``, the one whose write landed last wins; a wider race is not
    excluded. The token is the object's bytes."""

    def __init__(self, storage: Storage, rel: str, settle_s: float) -> None:
        self.storage, self.rel, self.settle_s = storage, rel, settle_s

    def read(self) -> tuple[bytes, Token] | None:
        try:
            data = self.storage.read_bytes(self.rel)
        except FileNotFoundError:
            return None
        return data, data

    def _write_verified(self, data: bytes) -> Token | None:
        self.storage.write_bytes(self.rel, data)
        time.sleep(self.settle_s)
        now = self.read()
        return data if now is not None and now[1] == data else None

    def create(self, data: bytes) -> Token | None:
        return None if self.read() is not None else self._write_verified(data)

    def replace(self, data: bytes, token: Token) -> Token | None:
        now = self.read()
        return None if now is None or now[1] != token else self._write_verified(data)

    def delete(self, token: Token) -> bool:
        now = self.read()
        if now is None or now[1] != token:
            return False
        self.storage.delete(self.rel)
        return True


def _s3_options(fs: pafs.FileSystem) -> dict[str, Any]:
    """The options a pyarrow S3FileSystem was made with (its pickled form: endpoint_override,
    scheme, region, access_key, secret_key, session_token)."""
    _, args = fs.__reduce__()
    return dict(args[0])


def lease_object(storage: Storage, rel: str, *, settle_s: float = 0.2) -> LeaseObject:
    """The conditional-write backend for the object ``rel`` of ``storage`` (module docstring).

    An S3 store without boto3 installed falls back to `VerifiedLeaseObject`, with a warning.
    """
    if isinstance(storage.fs, pafs.LocalFileSystem):
        return LocalLeaseObject(storage.path(rel))
    if type(storage.fs).__name__ == "S3FileSystem":
        try:
            return S3LeaseObject.for_storage(storage, rel)
        except ImportError:
            log.warning(
                "boto3 is not installed (pip install 'saelect[s3]'): the lease of %s is "
                "write-then-verify, which does not close the race between two services",
                storage.root,
            )
    return VerifiedLeaseObject(storage, rel, settle_s)
