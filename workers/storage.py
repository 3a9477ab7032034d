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
import io
import json
import os
import posixpath
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

    def child(self, rel: str) -> Storage:
        """A Storage rooted at ``rel`` below this root, sharing the filesystem."""
        rel = self._check_rel(rel)
        sub = Storage.__new__(Storage)
        sub.root = f"{self.root.rstrip('/')}/{rel}" if rel else self.root
        sub.fs = self.fs
        sub.base = self.path(rel)
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
