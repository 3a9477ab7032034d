"""One-line loss feedback: `FeedbackReporter` batches per-sample losses and posts them behind
the training loop, and serves the epoch's loss weights (InfoBatch's rescaling).

Each post carries a key (rank, epoch, seq) that the service deduplicates, so a post retried after a
lost answer is applied once. Posts are cut at fixed sample counts (``post_samples``), at
`FeedbackReporter.flush` and at `FeedbackReporter.set_epoch`, never by time: the same run reports
the same keys with the same samples. ``set_epoch`` waits until every loss of the previous epoch is
acknowledged, so the service selects the next epoch with all of them.

Example (the trainer's loop; the dataset returns each sample's index):
    >>> sampler = SelectionSampler(client, job_id, rank, world_size)       # doctest: +SKIP
    >>> for epoch in range(sampler.num_epochs):                           # doctest: +SKIP
    ...     sampler.set_epoch(epoch)              # flushes the losses of epoch - 1
    ...     for x, y, idx in loader:
    ...         per_sample = F.cross_entropy(model(x), y, reduction="none")
    ...         loss = (per_sample * sampler.loss_weights(idx)).mean()
    ...         sampler.report(idx, per_sample)   # one line: batched, posted in the background
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import deque
from typing import Any

import numpy as np
from saelect.client.errors import SelectionError
from saelect.client.http import COUNT_HEADER, RETRY_STATUSES, SelectionClient

log = logging.getLogger(__name__)

TRANSIENT_STATUSES = RETRY_STATUSES | {0, 429}
"""Answers a post is retried on (0: no answer at all, the connection failed or timed out)."""


def _numpy(values: Any, dtype: str) -> np.ndarray:
    """A flat numpy copy of an array or a torch tensor (detached, on the CPU): (n,)."""
    if hasattr(values, "detach"):  # a torch tensor, without importing torch
        values = values.detach().cpu().numpy()
    return np.array(values, dtype=dtype).reshape(-1)


def post_feedback(
    client: SelectionClient,
    job_id: str,
    epoch: int,
    indices: np.ndarray,
    losses: np.ndarray,
    *,
    rank: int,
    seq: int,
) -> dict[str, Any]:
    """One keyed binary post: ``{"epoch", "count", "duplicate"}``; indices int (n,), losses
    float (n,). A repeated (rank, epoch, seq) is acknowledged with ``duplicate: true``."""
    idx = np.ascontiguousarray(indices, dtype="<i8")
    val = np.ascontiguousarray(losses, dtype="<f4")
    resp = client._request(
        "POST",
        f"{client._job(job_id)}/epochs/{int(epoch)}/feedback",
        params={"rank": rank, "seq": seq},
        content=idx.tobytes() + val.tobytes(),
        headers={"Content-Type": "application/octet-stream", COUNT_HEADER: str(idx.size)},
    )
    return dict(resp.json())


class FeedbackReporter:
    """Buffers one rank's per-sample losses and posts them from a background thread.

    Parameters
    ----------
    client, job_id, rank, world_size:
        The service, the job and this trainer's place in the world.
    epoch:
        The epoch the first reports belong to (`set_epoch` moves it).
    post_samples:
        Losses per post: the buffer is posted when it holds at least this many.
    retries:
        Attempts per post after the first, on transient errors (no answer, 429, 502-504),
        with delays ``backoff * 2**attempt`` capped at ``max_backoff`` seconds.
    max_pending:
        Posts waiting to be sent before `report` blocks (bounds the memory held).

    Raises
    ------
    SelectionError
        From `report`, `flush` or `set_epoch` once a post failed for good (a 4xx answer, or
        transient errors past ``retries``); the reporter stops posting then.
    """

    def __init__(
        self,
        client: SelectionClient,
        job_id: str,
        rank: int = 0,
        world_size: int = 1,
        *,
        epoch: int = 0,
        post_samples: int = 8192,
        retries: int = 8,
        backoff: float = 0.2,
        max_backoff: float = 10.0,
        max_pending: int = 16,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world={world_size}")
        if post_samples < 1 or max_pending < 1 or retries < 0:
            raise ValueError("post_samples and max_pending must be >= 1, retries >= 0")
        self.client = client
        self.job_id = job_id
        self.rank = rank
        self.world_size = world_size
        self.epoch = epoch
        self.post_samples = post_samples
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_pending = max_pending
        self._sleep = time.sleep
        self._seq = 0  # next post's sequence number in self.epoch
        self._idx: list[np.ndarray] = []
        self._loss: list[np.ndarray] = []
        self._buffered = 0
        self._queue: deque[tuple[int, int, np.ndarray, np.ndarray]] = deque()
        self._in_flight = 0  # posts queued or being sent
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self.posted = 0
        """Losses acknowledged by the service (duplicates not counted twice)."""
        self._weights: tuple[int, np.ndarray, np.ndarray] | None = None
        """(epoch, sorted indices int64 (per_rank,), their weights float32 (per_rank,))."""

    # -- reporting ---------------------------------------------------------------------------
    def report(self, indices: Any, losses: Any) -> None:
        """Buffer the per-sample losses of one batch: indices int (B,), losses float (B,)
        (numpy arrays, lists or torch tensors, on any device). Returns at once; blocks only when
        ``max_pending`` posts are already waiting."""
        idx, val = _numpy(indices, "int64"), _numpy(losses, "float32")
        if idx.shape != val.shape:
            raise ValueError(f"indices and losses differ in length: {idx.shape} vs {val.shape}")
        self._raise_failure()
        if not idx.size:
            return
        self._idx.append(idx)
        self._loss.append(val)
        self._buffered += idx.size
        if self._buffered >= self.post_samples:
            self._submit()

    def _submit(self) -> None:
        """Hand the buffer to the sender as one post keyed (epoch, next seq)."""
        if not self._buffered:
            return
        idx, val = np.concatenate(self._idx), np.concatenate(self._loss)
        self._idx, self._loss, self._buffered = [], [], 0
        with self._cond:
            while len(self._queue) >= self.max_pending and self._error is None:
                self._cond.wait()
            self._queue.append((self.epoch, self._seq, idx, val))
            self._in_flight += 1
            self._seq += 1
            self._cond.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="saelect-feedback", daemon=True)
            self._thread.start()
            atexit.register(self._flush_at_exit)

    def _flush_at_exit(self, timeout: float = 60.0) -> None:
        """At interpreter exit: post what a trainer reported but never flushed (bounded wait)."""
        if self._closed or self._error is not None:  # closed, or its failure already raised
            return
        try:
            self.flush(timeout=timeout)
        except Exception as exc:  # exiting anyway: say what was lost
            log.error("feedback not delivered at exit (%d posts pending): %s", self._in_flight, exc)

    def flush(self, timeout: float | None = None) -> None:
        """Post what is buffered and wait until every post is acknowledged.

        Raises
        ------
        TimeoutError
            When posts are still unacknowledged after ``timeout`` seconds.
        SelectionError
            When a post failed for good.
        """
        self._raise_failure()
        self._submit()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._in_flight and self._error is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"{self._in_flight} feedback posts unacknowledged")
                self._cond.wait(left)
        self._raise_failure()

    def set_epoch(self, epoch: int) -> None:
        """Flush the losses reported so far (all acknowledged on return), then report for
        ``epoch``: the service selects the next epoch with every loss of this one."""
        self.flush()
        if epoch != self.epoch:
            self.epoch = epoch
            self._seq = 0

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "seq"}``: where the post sequence stands (flush before saving it)."""
        return {"epoch": self.epoch, "seq": self._seq}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the post sequence of a checkpoint: the resumed run's posts get the keys the
        interrupted run's got after the checkpoint, so the service applies each key once."""
        self.epoch, self._seq = int(state["epoch"]), int(state["seq"])

    def close(self) -> None:
        """Flush, then stop the sender thread."""
        try:
            self.flush()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            if self._thread is not None:
                self._thread.join(timeout=10)
                atexit.unregister(self._flush_at_exit)

    def __enter__(self) -> FeedbackReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise SelectionError(
                getattr(self._error, "status", 0),
                getattr(self._error, "code", "feedback_failed"),
                f"feedback stopped: {self._error}",
            ) from self._error

    # -- the sender thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                epoch, seq, idx, val = self._queue[0]
            try:
                ack = self._post(epoch, seq, idx, val)
            except BaseException as exc:  # kept for the training thread to raise
                with self._cond:
                    self._error = exc
                    self._queue.clear()
                    self._in_flight = 0
                    self._cond.notify_all()
                return
            with self._cond:
                self._queue.popleft()
                self._in_flight -= 1
                if not ack.get("duplicate"):
                    self.posted += idx.size
                self._cond.notify_all()

    def _post(self, epoch: int, seq: int, idx: np.ndarray, val: np.ndarray) -> dict[str, Any]:
        """Send one post, retrying transient failures with the same key."""
        attempt = 0
        while True:
            try:
                return post_feedback(
                    self.client, self.job_id, epoch, idx, val, rank=self.rank, seq=seq
                )
            except SelectionError as exc:
                if exc.status not in TRANSIENT_STATUSES or attempt >= self.retries:
                    raise
                log.warning(
                    "feedback post (epoch %d, seq %d) failed: %s; retrying", epoch, seq, exc
                )
            self._sleep(min(self.max_backoff, self.backoff * 2**attempt))
            attempt += 1

    # -- weights -----------------------------------------------------------------------------
    def loss_weights(self, indices: Any) -> Any:
        """The epoch's loss weight of each sample in ``indices`` (int (B,)): float32 (B,), a
        torch tensor on ``indices``' device when ``indices`` is one, ready to multiply into the
        per-sample loss. All 1 unless the job's policy reweights (infobatch).

        Raises
        ------
        ValueError
            When an index is not among this rank's indices of the current epoch.
        """
        idx = _numpy(indices, "int64")
        if self._weights is None or self._weights[0] != self.epoch:
            order = self.client.indices(self.job_id, self.epoch, self.rank, self.world_size)
            w = self.client.weights(self.job_id, self.epoch, self.rank, self.world_size)
            perm = np.argsort(order, kind="stable")
            self._weights = (self.epoch, order[perm], w[perm])
        _, sorted_idx, sorted_w = self._weights
        pos = np.minimum(np.searchsorted(sorted_idx, idx), max(sorted_idx.size - 1, 0))
        if idx.size and (sorted_idx.size == 0 or not np.array_equal(sorted_idx[pos], idx)):
            bad = idx[sorted_idx[pos] != idx] if sorted_idx.size else idx
            raise ValueError(
                f"indices {bad[:5].tolist()} are not in rank {self.rank}'s epoch {self.epoch}"
            )
        out = sorted_w[pos].astype(np.float32)
        if hasattr(indices, "detach"):
            import torch

            return torch.from_numpy(out).to(indices.device)
        return out
