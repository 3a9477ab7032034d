"""What a trainer imports to pull its per-epoch subsets from a saelect service.

``import client`` loads only httpx and numpy; ``SelectionSampler`` loads torch on first use, and
``client.ray_train`` / ``client.ray_data`` import ray inside their functions.

Example:
    >>> from client import SelectionClient, SelectionSampler           # doctest: +SKIP
    >>> c = SelectionClient("http://head:8000", token="...")            # doctest: +SKIP
    >>> sampler = SelectionSampler(c, job_id, rank=rank, world_size=world)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from saelect.client.errors import JobFailedError, SelectionError
from saelect.client.http import SelectionClient

if TYPE_CHECKING:
    from saelect.client.sampler import SelectionSampler

__all__ = ["JobFailedError", "SelectionClient", "SelectionError", "SelectionSampler"]


def __getattr__(name: str) -> Any:
    if name == "SelectionSampler":  # lazy: torch is only needed for the Sampler
        from saelect.client.sampler import SelectionSampler

        return SelectionSampler
    raise AttributeError(f"module 'client' has no attribute {name!r}")
