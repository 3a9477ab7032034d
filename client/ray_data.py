"""Restrict a Ray Dataset to one epoch's subset. Imports ray only when called.

Example:
    >>> ds = ray.data.read_parquet(uri)                                     # doctest: +SKIP
    >>> ds = ds.add_column("index", ...)  # the global row index, if not already a column
    >>> epoch_ds = select_epoch(ds, client, job_id, epoch=3)                # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import numpy as np
from saelect.client.http import SelectionClient


def keep_selected(batch: dict[str, np.ndarray], selected: Any, index_column: str) -> dict:
    """Rows of ``batch`` whose ``index_column`` value is in ``selected`` (sorted int64 (m,))."""
    if not isinstance(selected, np.ndarray):  # an ObjectRef Ray did not resolve for us
        import ray

        selected = ray.get(selected)
    ids = np.asarray(batch[index_column], dtype=np.int64)
    pos = np.searchsorted(selected, ids)
    pos[pos >= selected.shape[0]] = 0
    mask = selected[pos] == ids if selected.shape[0] else np.zeros(ids.shape, dtype=bool)
    return {k: v[mask] for k, v in batch.items()}


def select_epoch(
    dataset: Any,
    client: SelectionClient,
    job_id: str,
    epoch: int,
    index_column: str = "index",
) -> Any:
    """The rows of ``dataset`` (a ``ray.data.Dataset``) in epoch ``epoch``'s subset.

    Fetches the whole epoch (``rank=0, world_size=1``) and filters on ``index_column``, which must
    hold each row's global index (the row number in the dataset the job was created on). Rows
    keep the dataset's order, not the epoch's serving order; shuffle with a seeded
    ``random_shuffle(seed=...)`` if the order matters.
    """
    import ray

    selected = np.unique(client.indices(job_id, epoch, rank=0, world_size=1))  # sorted int64
    ref = ray.put(selected)
    return dataset.map_batches(
        keep_selected,
        batch_format="numpy",
        fn_kwargs={"selected": ref, "index_column": index_column},
    )
