"""Build a ``SelectionSampler`` inside a Ray Train worker. Imports ray only when called.

Example (inside ``train_loop_per_worker``):
    >>> sampler = sampler_from_context("http://head:8000", job_id)          # doctest: +SKIP
    >>> loader = DataLoader(train_set, batch_size=256, sampler=sampler)     # doctest: +SKIP
    >>> # NOT ray.train.torch.prepare_data_loader(loader): it swaps the sampler for a
    >>> # DistributedSampler. Use prepare_data_loader(loader, add_dist_sampler=False) if you
    >>> # need its device placement.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from client.http import SelectionClient

if TYPE_CHECKING:
    from client.sampler import SelectionSampler


def sampler_from_context(
    client_or_url: SelectionClient | str, job_id: str, token: str | None = None
) -> SelectionSampler:
    """A sampler for this worker's world rank and size from ``ray.train.get_context()``.

    Parameters
    ----------
    client_or_url:
        A ``SelectionClient`` or the service URL (a client is then made with ``token``).
    job_id:
        The ready job to sample from.
    token:
        Bearer token, used only when a URL is given.
    """
    import ray.train

    from client.sampler import SelectionSampler

    ctx = ray.train.get_context()
    client = (
        client_or_url
        if isinstance(client_or_url, SelectionClient)
        else SelectionClient(client_or_url, token=token)
    )
    return SelectionSampler(
        client, job_id, rank=ctx.get_world_rank(), world_size=ctx.get_world_size()
    )
