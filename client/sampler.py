"""A torch ``Sampler`` that yields this rank's indices of the current epoch from the service.

Every rank of an epoch gets the same length (the service pads the epoch order like torch's
DistributedSampler), so DDP never hangs on unequal batch counts. Lengths of every epoch come from
the plan, fetched once.

Example:
    >>> sampler = SelectionSampler(client, job_id, rank=0, world_size=2)   # doctest: +SKIP
    >>> for epoch in range(len(sampler.plan["epochs"])):                   # doctest: +SKIP
    ...     sampler.set_epoch(epoch)
    ...     for x, y in DataLoader(train_set, batch_size=256, sampler=sampler): ...
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from client.errors import SelectionError
from client.http import SelectionClient


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
        return iter(self.indices().tolist())
