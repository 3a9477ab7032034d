"""The persistent job store (docs/reliability.md, Persistence) on ``workers.storage.Storage``.

Layout under the store root (a local directory or any pyarrow filesystem URI)::

    jobs/{job_id}/spec.json              the JobSpec (JobSpec.to_dict), written once
    jobs/{job_id}/state.json             JobState: last committed epoch, seeds, phase, extra
    jobs/{job_id}/epochs/{t:06d}.npy     int64 (size,): epoch t's indices in serving order
    jobs/{job_id}/epochs/{t:06d}.json    its stats; ``.weights.npy`` float32 (size,) if weighted
    jobs/{job_id}/feedback/{t:06d}.npz   indices int64 (n,), losses float32 (n,) of epoch t
    jobs/{job_id}/manifest.json          sha256 and size of every committed file above
    data/                                datasets prepared for this store

Every write is atomic (temporary name, then move), so a restarted service sees either the old or
the new file, never a torn one. Writing an epoch that is already stored with different indices
raises: a served epoch never changes.

Checksums: each commit (`write_file`, `write_epoch`, `write_state`...) writes its files, then the
job's manifest with their digests (`workers.storage.digest`); a read checks the file against the
manifest and raises `CorruptFileError` naming the file when it differs (a flipped byte, a
truncation, a missing file). A file the manifest does not list was never committed (a crash
between the file and the manifest): it reads as absent and the next commit replaces it. Files
rewritten in place (``state.json``, ``feedback/``) are listed with their new and their previous
digest, and the manifest is written before them: a crash in between leaves the previous content,
which is accepted. A job stored before manifests existed gets one from its current files the
first time it is read (`verify_job`).

Example:
    >>> import tempfile
    >>> store = JobStore(tempfile.mkdtemp())
    >>> store.write_epoch("job-1", 0, np.array([3, 1, 2]))
    >>> store.read_epoch("job-1", 0).tolist(), store.committed_epochs("job-1")
    ([3, 1, 2], [0])
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from saelect.service.errors import UnknownJob
from saelect.service.specs import JobSpec
from saelect.workers.storage import (
    CorruptFileError,
    Storage,
    WriteTally,
    check_digest,
    digest,
    read_manifest,
    tree_digests,
    write_manifest,
)

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
"""Per job: the digests of its committed files (`workers.storage.write_manifest`)."""

JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
"""Job ids are path-safe: letters, digits, ``_`` and ``-``."""


def new_job_id(name: str) -> str:
    """A fresh job id: a slug of ``name`` plus 10 hex chars of a uuid4 (ids need no seed)."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:40] or "job"
    return f"{slug}-{uuid.uuid4().hex[:10]}"


def check_job_id(job_id: str) -> str:
    """Return ``job_id`` or raise UnknownJob when it is not a valid (path-safe) id."""
    if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
        raise UnknownJob(f"invalid job id {job_id!r}: letters, digits, '_' and '-' only")
    return job_id


@dataclass(frozen=True)
class JobState:
    """What a restarted service needs to resume a job; stored as ``state.json``."""

    last_committed_epoch: int = -1
    """Highest epoch whose selection was committed; -1 before the first."""
    seed: int = 0
    """The policy's seed (every random draw derives from (seed, epoch, index))."""
    phase: str = "pending"
    """Job phase when the state was written (see ``service.backend.PHASES``)."""
    num_samples: int | None = None
    """Dataset rows, once known."""
    error: str | None = None
    """Failure message for phase ``failed``."""
    extra: dict[str, Any] = field(default_factory=dict)
    """JSON-ready policy/coordinator state (e.g. ``Policy.state_dict`` scalars)."""

    def __post_init__(self) -> None:
        if self.last_committed_epoch < -1:
            raise ValueError(f"last_committed_epoch must be >= -1, got {self.last_committed_epoch}")
        if self.num_samples is not None and self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {self.num_samples}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobState:
        """Inverse of ``to_dict``; unknown keys (from newer versions) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class JobStore:
    """Jobs under one storage root. Methods are synchronous and cheap except epoch I/O.

    Parameters
    ----------
    root:
        Store root path or URI, or an existing ``Storage``.
    """

    def __init__(self, root: str | Storage) -> None:
        self.storage = root if isinstance(root, Storage) else Storage(root)
        self._jobs = self.storage.child("jobs", tally=WriteTally())
        self._manifests: dict[str, dict[str, list[list[Any]]]] = {}
        """Per job, the manifest's files (this process is the store's one writer)."""

    @property
    def bytes_written(self) -> int:
        """Bytes this process wrote under ``jobs/`` (specs, states, epochs, feedback, manifests)."""
        return self._jobs.tally.bytes

    def __repr__(self) -> str:
        return f"JobStore({self.storage.root!r})"

    # -- jobs --------------------------------------------------------------------------------
    def job_storage(self, job_id: str) -> Storage:
        """The job's directory, for scoring outputs (features, SAE, shards...)."""
        return self._jobs.child(check_job_id(job_id))

    def data_storage(self) -> Storage:
        """``{root}/data``: datasets prepared for this store."""
        return self.storage.child("data")

    def create_job(self, job_id: str, spec: JobSpec, state: JobState | None = None) -> None:
        """Write a new job's spec and initial state.

        Raises
        ------
        ValueError
            When a job with that id already exists.
        """
        js = self.job_storage(job_id)
        if js.exists("spec.json"):
            raise ValueError(f"job {job_id!r} already exists in {self!r}")
        self._manifests[job_id] = {}
        state_doc = (state or JobState(seed=_policy_seed(spec))).to_dict()
        # the spec is written last: it marks the job as created
        self._commit(job_id, replace={"state.json": _json(state_doc), "spec.json": _json(spec)})

    def has_job(self, job_id: str) -> bool:
        """Whether the job exists (its spec was written)."""
        try:
            return self.job_storage(job_id).exists("spec.json")
        except UnknownJob:
            return False

    def list_jobs(self) -> list[str]:
        """Ids of every stored job, sorted."""
        return [j for j in self._jobs.list_dir() if JOB_ID_RE.match(j) and self.has_job(j)]

    def read_spec(self, job_id: str) -> JobSpec:
        """The job's spec. Raises UnknownJob."""
        return JobSpec.from_dict(self._read_json(job_id, "spec.json"))

    def read_state(self, job_id: str) -> JobState:
        """The job's state. Raises UnknownJob."""
        return JobState.from_dict(self._read_json(job_id, "state.json"))

    def write_state(self, job_id: str, state: JobState) -> None:
        """Replace the job's state atomically. Raises UnknownJob."""
        self._require(job_id)
        self._commit(job_id, replace={"state.json": _json(state.to_dict())})

    def delete_job(self, job_id: str) -> None:
        """Drop the job and everything stored under it. Raises UnknownJob.

        The spec goes first, so a crash midway leaves no half-deleted job that looks alive.
        """
        js = self._require(job_id)
        js.delete("spec.json")
        self._jobs.delete(job_id)
        self._manifests.pop(job_id, None)

    # -- epochs ------------------------------------------------------------------------------
    def write_epoch(
        self,
        job_id: str,
        epoch: int,
        indices: np.ndarray,
        *,
        stats: dict[str, Any] | None = None,
        weights: np.ndarray | None = None,
    ) -> None:
        """Commit epoch ``epoch``: indices int64 (size,) in serving order, with its JSON-ready
        ``stats`` and float32 (size,) loss ``weights`` when given, in one manifest update.

        Idempotent: writing the same indices again is a no-op.

        Raises
        ------
        ValueError
            When the epoch is already stored with different indices, or ``epoch < 0``.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        idx = np.ascontiguousarray(indices, dtype=np.int64)
        if idx.ndim != 1:
            raise ValueError(f"epoch indices must be 1-D, got shape {idx.shape}")
        old = self.read_epoch(job_id, epoch)
        if old is not None:
            if not np.array_equal(old, idx):
                raise ValueError(f"epoch {epoch} of job {job_id!r} is already stored differently")
            return
        files = {_epoch_rel(epoch): _npy(idx)}
        if stats is not None:
            files[f"epochs/{epoch:06d}.json"] = _json(stats)
        if weights is not None:
            files[f"epochs/{epoch:06d}.weights.npy"] = _npy(weights)
        self._commit(job_id, new=files)

    def read_epoch(self, job_id: str, epoch: int) -> np.ndarray | None:
        """Epoch ``epoch``'s indices int64 (size,), or None when not committed.

        Raises CorruptFileError when the stored file differs from the committed one."""
        data = self.read_file(job_id, _epoch_rel(epoch)) if epoch >= 0 else None
        return None if data is None else _load_npy(data).astype(np.int64, copy=False)

    def read_epoch_stats(self, job_id: str, epoch: int) -> dict[str, Any] | None:
        """The stats committed with epoch ``epoch``, or None."""
        data = self.read_file(job_id, f"epochs/{epoch:06d}.json")
        return None if data is None else json.loads(data)

    def read_epoch_weights(self, job_id: str, epoch: int) -> np.ndarray | None:
        """float32 (size,) loss weights committed with epoch ``epoch``, or None (unweighted)."""
        data = self.read_file(job_id, f"epochs/{epoch:06d}.weights.npy")
        return None if data is None else _load_npy(data).astype(np.float32, copy=False)

    def committed_epochs(self, job_id: str) -> list[int]:
        """Sorted epochs committed for the job."""
        names = self.committed_files(job_id, "epochs/")
        return sorted(int(n[:-4]) for n in names if n.endswith(".npy") and n[:-4].isdigit())

    # -- committed files ---------------------------------------------------------------------
    def write_file(self, job_id: str, rel: str, data: bytes, *, replace: bool = False) -> None:
        """Commit ``data`` as the job's file ``rel`` (write-once unless ``replace``)."""
        if replace:
            self._commit(job_id, replace={rel: data})
        else:
            self._commit(job_id, new={rel: data})

    def read_file(self, job_id: str, rel: str) -> bytes | None:
        """The committed bytes of the job's file ``rel``; None when it was never committed.

        Raises
        ------
        CorruptFileError
            When the file is missing, truncated or altered since its commit (names the file).
        """
        accepted = self._files(job_id).get(rel)
        if accepted is None:
            return None
        js = self.job_storage(job_id)
        try:
            data = js.read_bytes(rel)
        except FileNotFoundError as exc:
            raise CorruptFileError(f"{js.root}/{rel}", "committed but missing") from exc
        return check_digest(js, rel, data, accepted)

    def committed_files(self, job_id: str, prefix: str) -> list[str]:
        """Sorted names of the committed files directly under the directory ``prefix`` ('a/')."""
        names = (r[len(prefix) :] for r in self._files(job_id) if r.startswith(prefix))
        return sorted(n for n in names if "/" not in n)

    def verify_job(self, job_id: str) -> None:
        """Check every committed file of the job (reads them all).

        Raises
        ------
        CorruptFileError
            Naming the first file that is missing, truncated or altered, or a bad manifest.
        """
        for rel in sorted(self._files(job_id)):
            self.read_file(job_id, rel)

    def _files(self, job_id: str) -> dict[str, list[list[Any]]]:
        """The job's manifest (cached); a job stored before manifests gets one now."""
        files = self._manifests.get(job_id)
        if files is None:
            js = self.job_storage(job_id)
            files = read_manifest(js, MANIFEST_FILE)
            if files is None:
                files = {r: [d] for r, d in tree_digests(js, exclude=(MANIFEST_FILE,)).items()}
                if files:
                    log.warning("job %s: no manifest; adopting its %d files", job_id, len(files))
                    write_manifest(js, MANIFEST_FILE, files)
            self._manifests[job_id] = files
        return files

    def _commit(
        self,
        job_id: str,
        *,
        new: dict[str, bytes] | None = None,
        replace: dict[str, bytes] | None = None,
    ) -> None:
        """Write ``new`` files, then the manifest, then the ``replace`` files (see the module
        docstring for why this order survives a crash at any point)."""
        js = self.job_storage(job_id)
        files = dict(self._files(job_id))
        for rel, data in (new or {}).items():
            js.write_bytes(rel, data)
            files[rel] = [digest(data)]
        for rel, data in (replace or {}).items():
            files[rel] = [digest(data), *files.get(rel, [])[:1]]
        write_manifest(js, MANIFEST_FILE, files)
        self._manifests[job_id] = files
        for rel, data in (replace or {}).items():
            js.write_bytes(rel, data)

    # -- feedback ----------------------------------------------------------------------------
    def append_feedback(
        self, job_id: str, epoch: int, indices: np.ndarray, losses: np.ndarray
    ) -> int:
        """Merge per-sample losses into ``feedback/{epoch:06d}.npz``; returns its sample count.

        Several ranks post for one epoch; a sample sent again keeps its latest loss, so a
        retried request changes nothing. indices int64 (n,), losses float32 (n,).
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        val = np.asarray(losses, dtype=np.float32).reshape(-1)
        if idx.shape != val.shape:
            raise ValueError(f"indices and losses differ in length: {idx.shape} vs {val.shape}")
        old = self.read_feedback(job_id, epoch)
        if old is not None:
            idx = np.concatenate([old[0], idx])
            val = np.concatenate([old[1], val])
        # keep the last occurrence of each index: unique over the reversed arrays
        _, first_rev = np.unique(idx[::-1], return_index=True)
        keep = len(idx) - 1 - first_rev  # ascending index order
        data = _npz(indices=idx[keep], losses=val[keep])
        self.write_file(job_id, _feedback_rel(epoch), data, replace=True)
        return int(keep.shape[0])

    def read_feedback(self, job_id: str, epoch: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(indices int64 (n,), losses float32 (n,)) sorted by index, or None."""
        data = self.read_file(job_id, _feedback_rel(epoch))
        if data is None:
            return None
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return z["indices"].astype(np.int64), z["losses"].astype(np.float32)

    # -- helpers -----------------------------------------------------------------------------
    def _require(self, job_id: str) -> Storage:
        js = self.job_storage(job_id)
        if not js.exists("spec.json"):
            raise UnknownJob(f"no job {job_id!r}")
        return js

    def _read_json(self, job_id: str, rel: str) -> Any:
        self._require(job_id)
        data = self.read_file(job_id, rel)
        if data is None:
            raise UnknownJob(f"job {job_id!r} has no committed {rel}")
        return json.loads(data)


def _epoch_rel(epoch: int) -> str:
    return f"epochs/{epoch:06d}.npy"


def _feedback_rel(epoch: int) -> str:
    return f"feedback/{epoch:06d}.npz"


def _json(obj: Any) -> bytes:
    """``obj`` (or ``obj.to_dict()``) as the JSON bytes `Storage.write_json` writes."""
    doc = obj.to_dict() if hasattr(obj, "to_dict") else obj
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr), allow_pickle=False)
    return buf.getvalue()


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _policy_seed(spec: JobSpec) -> int:
    return int(getattr(spec.policy, "seed", 0))
