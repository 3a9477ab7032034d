"""A torch ``Sampler`` that yields this rank's indices of the current epoch from the service.

Every rank of an epoch gets the same length (the service pads the epoch order like torch's
DistributedSampler), so DDP never hangs on unequal batch counts. Lengths of every epoch come from
the plan, fetched once.

Resumable: ``state_dict()`` holds (job id, world size, rank, epoch, position within this rank's
list) and ``load_state_dict()`` makes the next iteration start at that position. torchdata's
``StatefulDataLoader`` calls both on its own (its snapshots also cover prefetching workers); with a
plain ``DataLoader`` and ``num_workers=0`` the sampler's state after k batches of B is position
k * B, so ``sampler.state_dict()`` can be saved beside the model.

Example:
    >>> sampler = SelectionSampler(client, job_id, rank=0, world_size=2)   # doctest: +SKIP
    >>> for epoch in range(len(sampler.plan["epochs"])):                   # doctest: +SKIP
    ...     sampler.set_epoch(epoch)
    ...     for x, y in DataLoader(train_set, batch_size=256, sampler=sampler): ...
    >>> loader = StatefulDataLoader(train_set, batch_size=256, sampler=sampler)  # doctest: +SKIP
    >>> ckpt = loader.state_dict()          # mid-epoch; later, in a new process:  # doctest: +SKIP
    >>> loader.load_state_dict(ckpt)        # the next batch is the one after ckpt # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from saelect.client.errors import SelectionError
from saelect.client.http import SelectionClient
from torch.utils.data import Sampler

if TYPE_CHECKING:
    from saelect.client.feedback import FeedbackReporter

STATE_KEYS = ("job_id", "world_size", "rank", "epoch", "position")
"""Keys of `SelectionSampler.state_dict`."""


class SelectionSampler(Sampler[int]):
    """Yields the service's indices for (job, epoch, rank, world_size).

    Parameters
    ----------
    client:
        A ``SelectionClient``.
    job_id:
        The job (must be ready: the plan is fetched here).
    ready_timeout:
        How long ``set_epoch`` waits when the service answers ``job_not_ready`` (a restarted
        service re-attaching its stored scoring) before it asks again.
    rank, world_size:
        This trainer's rank and the number of ranks, ``0 <= rank < world_size``.

    Notes
    -----
    Do not pass a DataLoader with this sampler through ``ray.train.torch.prepare_data_loader``
    (it replaces the sampler with a DistributedSampler); use ``add_dist_sampler=False`` or no
    prepare step.
    """

    def __init__(
        self,
        client: SelectionClient,
        job_id: str,
        rank: int,
        world_size: int,
        *,
        ready_timeout: float = 600.0,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world={world_size}")
        self.client = client
        self.job_id = job_id
        self.rank = rank
        self.world_size = world_size
        self.ready_timeout = ready_timeout
        self.plan: dict[str, Any] = client.plan(job_id, world_size)
        self._per_rank = [int(e["per_rank"]) for e in self.plan["epochs"]]
        self.epoch = 0
        self._indices: np.ndarray | None = None  # int64 (per_rank,) of self.epoch, once fetched
        self._position = 0
        """Indices of ``self.epoch`` yielded so far (or to skip, after a resume)."""
        self._resume_at: int | None = None
        """Where the next iteration starts (set by `load_state_dict`, taken by `__iter__`)."""
        self._reporter: FeedbackReporter | None = None

    @property
    def num_epochs(self) -> int:
        """Epochs in the job's plan."""
        return len(self._per_rank)

    def set_epoch(self, epoch: int) -> None:
        """Select ``epoch`` and fetch this rank's indices for it.

        Raises
        ------
        ValueError
            When ``epoch`` is outside the plan.
        """
        if not 0 <= epoch < self.num_epochs:
            raise ValueError(f"epoch must be in [0, {self.num_epochs}), got {epoch}")
        if self._reporter is not None:  # the losses of the epoch before land first
            self._reporter.set_epoch(epoch)
        if epoch != self.epoch:  # a resumed position belongs to its own epoch only
            self._resume_at = None
            self._position = 0
        self.epoch = epoch
        try:
            self._indices = self.client.indices(self.job_id, epoch, self.rank, self.world_size)
        except SelectionError as exc:
            if exc.code != "job_not_ready":
                raise
            # the service restarted and is re-attaching its stored scoring: wait, then ask again
            self.client.wait_ready(self.job_id, timeout=self.ready_timeout)
            self._indices = self.client.indices(self.job_id, epoch, self.rank, self.world_size)

    def indices(self) -> np.ndarray:
        """int64 (per_rank,): this rank's indices of the current epoch (fetched on demand)."""
        if self._indices is None:
            self.set_epoch(self.epoch)
        if self._indices is None:  # set_epoch either sets them or raises
            raise RuntimeError(f"no indices for epoch {self.epoch}")
        return self._indices

    def __len__(self) -> int:
        return self._per_rank[self.epoch]

    def __iter__(self) -> Iterator[int]:
        """This rank's indices of the current epoch, from the resumed position (else 0).

        A generator: nothing runs before the first ``next``, so an iterator made and dropped
        before ``load_state_dict`` (as ``StatefulDataLoader`` does) takes no resumed position.
        """
        start = self._resume_at or 0
        self._resume_at = None
        indices = self.indices().tolist()
        self._position = start
        for i in range(start, len(indices)):
            self._position = i + 1  # counted before the yield: a snapshot then includes it
            yield indices[i]

    # -- loss feedback -----------------------------------------------------------------------
    @property
    def feedback(self) -> FeedbackReporter:
        """This rank's `client.feedback.FeedbackReporter` (made on first use, at this epoch);
        `set_epoch` flushes it before moving on."""
        if self._reporter is None:
            from saelect.client.feedback import FeedbackReporter

            self._reporter = FeedbackReporter(
                self.client, self.job_id, self.rank, self.world_size, epoch=self.epoch
            )
        return self._reporter

    def report(self, indices: Any, losses: Any) -> None:
        """Per-sample losses of one batch (indices int (B,), losses float (B,), numpy or torch):
        buffered and posted in the background by `feedback`."""
        self.feedback.report(indices, losses)

    def loss_weights(self, indices: Any) -> Any:
        """float32 (B,) loss weights of the batch's ``indices`` in the current epoch (a tensor on
        their device for a tensor): multiply them into the per-sample loss."""
        return self.feedback.loss_weights(indices)

    def state_dict(self) -> dict[str, Any]:
        """Where this rank stands: ``{"job_id", "world_size", "rank", "epoch", "position"}``.

        ``position`` is the number of this epoch's indices already yielded (0 to per_rank).
        """
        return {
            "job_id": self.job_id,
            "world_size": self.world_size,
            "rank": self.rank,
            "epoch": self.epoch,
            "position": self._position,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from `state_dict`: the next iteration yields the same indices, from the same
        position, as the interrupted one would have.

        Raises
        ------
        ValueError
            When ``state`` lacks a key, or was saved for another job, world size or rank, or
            for an epoch or position outside this job's plan.
        """
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"sampler state lacks {missing} (keys: {sorted(state)})")
        mine = {"job_id": self.job_id, "world_size": self.world_size, "rank": self.rank}
        for key, value in mine.items():
            if state[key] != value:
                raise ValueError(
                    f"sampler state is for {key}={state[key]!r}, this sampler has {value!r}"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if not 0 <= epoch < self.num_epochs:
            raise ValueError(f"sampler state epoch {epoch} outside [0, {self.num_epochs})")
        if not 0 <= position <= self._per_rank[epoch]:
            raise ValueError(
                f"sampler state position {position} outside [0, {self._per_rank[epoch]}] "
                f"(epoch {epoch})"
            )
        if epoch != self.epoch or self._indices is None:
            self.set_epoch(epoch)
        self._position = position
        self._resume_at = position
