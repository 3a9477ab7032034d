"""Atomic file storage under one root: a local directory or any pyarrow filesystem URI.

Every write goes to a temporary name in the destination directory and is then moved onto its
final name, so a reader never sees a half-written file under its final name (on local disks the
move is a POSIX rename; on object stores an object only appears once its upload completed).

Example:
    >>> import tempfile
    >>> s = Storage(tempfile.mkdtemp())
    >>> s.write_json("jobs/a/spec.json", {"name": "a"})
    >>> s.child("jobs").list_dir("a")
    ['spec.json']
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import threading
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

TMP_MARKER = ".tmp-"
"""Temporary files are named ``.{name}.tmp-{uuid}``; ``list_dir`` hides them."""


def _is_uri(root: str) -> bool:
    return "://" in root


class WriteTally:
    """Bytes written through a Storage and the children that share it, in this process.

    A copy sent to another process (a Storage pickled into a Ray task) starts again at 0: each
    process counts only its own writes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes = 0

    def add(self, nbytes: int) -> None:
        """Count ``nbytes`` more bytes written."""
        with self._lock:
            self._bytes += nbytes

    @property
    def bytes(self) -> int:
        """Bytes counted so far."""
        return self._bytes

    def __reduce__(self) -> tuple[type[WriteTally], tuple[()]]:
        return (WriteTally, ())


class Storage:
    """A storage root: a local path or a pyarrow filesystem URI (``file://``, ``s3://``, ...).

    Parameters
    ----------
    root:
        Local directory (created lazily on first write) or URI understood by
        ``pyarrow.fs.FileSystem.from_uri``.
    filesystem:
        Keyword-only. An explicit pyarrow filesystem; ``root`` is then a path inside it (used for
        in-memory filesystems in tests).

    Raises
    ------
    ValueError
        If ``root`` is empty or its URI scheme is not supported by pyarrow.
    """

    def __init__(self, root: str, *, filesystem: pafs.FileSystem | None = None) -> None:
        if not root:
            raise ValueError(f"storage root must be a non-empty path or URI, got {root!r}")
        self.root = root
        if filesystem is not None:
            self.fs: pafs.FileSystem = filesystem
            self.base = root.rstrip("/") or "/"
        elif _is_uri(root):
            try:
                fs, base = pafs.FileSystem.from_uri(root)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
                raise ValueError(f"unsupported storage URI {root!r}: {exc}") from exc
            self.fs = fs
            self.base = base.rstrip("/") or "/"
        else:
            self.fs = pafs.LocalFileSystem()
            self.base = os.path.abspath(root)
        self.tally = WriteTally()
        """Bytes written through this root and its children in this process."""

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    # -- paths -------------------------------------------------------------------------------
    @staticmethod
    def _check_rel(rel: str) -> str:
        if rel in ("", "."):
            return ""
        if rel.startswith("/") or "\\" in rel:
            raise ValueError(f"storage path must be relative with '/' separators, got {rel!r}")
        parts = rel.split("/")
        if any(p in ("..", ".") for p in parts):
            raise ValueError(f"storage path must not contain '.' or '..' segments, got {rel!r}")
        return "/".join(p for p in parts if p)

    def path(self, rel: str = "") -> str:
        """Full path of ``rel`` inside ``self.fs`` (for pyarrow APIs taking ``filesystem=``)."""
        rel = self._check_rel(rel)
        return posixpath.join(self.base, rel) if rel else self.base

    def child(self, rel: str, *, tally: WriteTally | None = None) -> Storage:
        """A Storage rooted at ``rel`` below this root, sharing the filesystem and (unless
        ``tally`` gives the subtree its own count) the tally of bytes written."""
        rel = self._check_rel(rel)
        sub = Storage.__new__(Storage)
        sub.root = f"{self.root.rstrip('/')}/{rel}" if rel else self.root
        sub.fs = self.fs
        sub.base = self.path(rel)
        sub.tally = tally if tally is not None else self.tally
        return sub

    # -- bytes -------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` to ``rel`` atomically (temporary name in the same dir, then move)."""
        final = self.path(rel)
        if final == self.base:
            raise ValueError("cannot write to the storage root itself")
        parent, name = posixpath.split(final)
        self.fs.create_dir(parent, recursive=True)
        tmp = posixpath.join(parent, f".{name}{TMP_MARKER}{uuid.uuid4().hex}")
        try:
            with self.fs.open_output_stream(tmp) as out:
                out.write(data)
            self.fs.move(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError, pa.ArrowException):
                self.fs.delete_file(tmp)
            raise
        self.tally.add(memoryview(data).nbytes)

    def read_bytes(self, rel: str) -> bytes:
        """Read the whole file ``rel``. Raises FileNotFoundError when it does not exist."""
        path = self.path(rel)
        info = self.fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{self.root}/{rel} does not exist")
        with self.fs.open_input_stream(path) as f:
            return bytes(f.read())

    # -- typed helpers -----------------------------------------------------------------------
    def write_json(self, rel: str, obj: Any) -> None:
        """Write a JSON document (UTF-8, sorted keys, indent 1) atomically."""
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True).encode())

    def read_json(self, rel: str) -> Any:
        """Read a JSON document written by ``write_json``."""
        return json.loads(self.read_bytes(rel))

    def write_npy(self, rel: str, arr: np.ndarray) -> None:
        """Write one array in .npy format (no pickles) atomically."""
        buf = io.BytesIO()
        np.save(buf, np.asarray(arr), allow_pickle=False)
        self.write_bytes(rel, buf.getbuffer())

    def read_npy(self, rel: str) -> np.ndarray:
        """Read an array written by ``write_npy``."""
        return np.load(io.BytesIO(self.read_bytes(rel)), allow_pickle=False)

    def write_npz(self, rel: str, **arrays: np.ndarray) -> None:
        """Write named arrays in .npz format (uncompressed, no pickles) atomically."""
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})  # type: ignore[arg-type]
        self.write_bytes(rel, buf.getbuffer())

    def read_npz(self, rel: str) -> dict[str, np.ndarray]:
        """Read the arrays written by ``write_npz`` into a plain dict."""
        with np.load(io.BytesIO(self.read_bytes(rel)), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def write_parquet(self, rel: str, table: pa.Table, **kwargs: Any) -> None:
        """Write a Parquet file atomically; ``kwargs`` go to ``pyarrow.parquet.write_table``."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **kwargs)
        self.write_bytes(rel, sink.getvalue())

    def read_parquet(self, rel: str, **kwargs: Any) -> pa.Table:
        """Read a Parquet file; ``kwargs`` go to ``pyarrow.parquet.read_table``."""
        path = self.path(rel)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            raise FileNotFoundError(f"{self.root}/{rel} does not exist")
        return pq.read_table(path, filesystem=self.fs, **kwargs)

    # -- directory operations ----------------------------------------------------------------
    def exists(self, rel: str = "") -> bool:
        """Whether ``rel`` exists (file or directory)."""
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def size(self, rel: str = "") -> int:
        """Bytes of the file ``rel``, or of every file below the directory ``rel``; 0 when it
        does not exist."""
        path = self.path(rel)
        info = self.fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return int(info.size)
        if info.type != pafs.FileType.Directory:
            return 0
        infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return sum(int(i.size) for i in infos if i.type == pafs.FileType.File)

    def list_dir(self, rel: str = "") -> list[str]:
        """Sorted names directly under ``rel`` (files and dirs); [] when it does not exist.

        In-flight temporary files of atomic writes are not listed.
        """
        path = self.path(rel)
        if self.fs.get_file_info(path).type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=False))
        names = (posixpath.basename(i.path.rstrip("/")) for i in infos)
        return sorted(n for n in names if TMP_MARKER not in n)

    def delete(self, rel: str) -> None:
        """Delete a file or a whole directory tree; a missing path is not an error."""
        path = self.path(rel)
        if path == self.base:
            raise ValueError("refusing to delete the storage root; delete its children instead")
        info = self.fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(path)


# -- checksums ---------------------------------------------------------------------------------
MANIFEST_VERSION = 1


class CorruptFileError(OSError):
    """A stored file differs from what was committed (checksum, size, or missing)."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"stored file {path} is corrupted: {why}")
        self.path = path


def digest(data: bytes | bytearray | memoryview) -> list[Any]:
    """``[sha256 hex, size]`` of ``data``: one manifest entry."""
    view = memoryview(data)
    return [hashlib.sha256(view).hexdigest(), view.nbytes]


def _manifest_hash(files: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def write_manifest(storage: Storage, rel: str, files: dict[str, list[list[Any]]]) -> None:
    """Write a manifest: ``files`` maps a path (relative to ``storage``) to the digests a reader
    accepts for it; the document carries its own sha256, so a damaged manifest is detected."""
    doc = {"version": MANIFEST_VERSION, "files": files, "sha256": _manifest_hash(files)}
    storage.write_bytes(rel, json.dumps(doc, sort_keys=True).encode())


def read_manifest(storage: Storage, rel: str) -> dict[str, list[list[Any]]] | None:
    """The ``files`` of the manifest at ``rel``; None when there is none.

    Raises
    ------
    CorruptFileError
        When the manifest itself is unreadable or fails its own checksum.
    """
    try:
        raw = storage.read_bytes(rel)
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw)
        files = doc["files"]
        ok = doc["sha256"] == _manifest_hash(files)
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptFileError(f"{storage.root}/{rel}", f"unreadable manifest ({exc})") from exc
    if not ok:
        raise CorruptFileError(f"{storage.root}/{rel}", "the manifest fails its own checksum")
    return files


def check_digest(storage: Storage, rel: str, data: bytes, accepted: list[list[Any]]) -> bytes:
    """Return ``data`` (the bytes of ``rel``) if its digest is one of ``accepted``.

    Raises
    ------
    CorruptFileError
        Naming the file, with the size found and the size committed.
    """
    got = digest(data)
    if got in [list(a) for a in accepted]:
        return data
    sizes = sorted({int(a[1]) for a in accepted})
    why = (
        f"{got[1]} bytes where {' or '.join(map(str, sizes))} were committed (truncated?)"
        if got[1] not in sizes
        else "its sha256 differs from the one recorded when it was committed"
    )
    raise CorruptFileError(f"{storage.root}/{rel}", why)


def tree_digests(storage: Storage, *, exclude: tuple[str, ...] = ()) -> dict[str, list[Any]]:
    """``{relative path: digest}`` of every file under ``storage`` (temporaries and ``exclude``
    left out); reads every byte."""
    out: dict[str, list[Any]] = {}
    if storage.fs.get_file_info(storage.base).type != pafs.FileType.Directory:
        return out
    infos = storage.fs.get_file_info(pafs.FileSelector(storage.base, recursive=True))
    prefix = storage.base.rstrip("/") + "/"
    for info in infos:
        if info.type != pafs.FileType.File or TMP_MARKER in info.path:
            continue
        rel = info.path[len(prefix) :] if info.path.startswith(prefix) else info.path
        if rel not in exclude:
            out[rel] = digest(storage.read_bytes(rel))
    return out


def verify_tree(storage: Storage, manifest_rel: str) -> str | None:
    """None when every file the manifest at ``manifest_rel`` lists is intact (or there is no
    manifest); else why the first bad one is bad, naming it."""
    try:
        files = read_manifest(storage, manifest_rel)
    except CorruptFileError as exc:
        return str(exc)
    for rel, accepted in sorted((files or {}).items()):
        try:
            check_digest(storage, rel, storage.read_bytes(rel), accepted)
        except FileNotFoundError:
            return f"stored file {storage.root}/{rel} is missing"
        except CorruptFileError as exc:
            return str(exc)
    return None
