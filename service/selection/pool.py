"""The small thread pool of a shard's per-epoch array work.

numpy's partitions, gathers and element-wise passes and scipy's sparse kernels release the GIL,
so a shard can run independent pieces of one epoch (row blocks of a sparse product, groups of
classes, the epoch shuffle) on a second core. Every user splits its work so that the result
does not depend on how many threads ran it.

Threads: ``SAELECT_SELECTION_THREADS`` (default: min(2, CPUs)).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["run_tasks", "selection_threads", "submit"]

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def selection_threads() -> int:
    """Threads of a shard's array work: ``SAELECT_SELECTION_THREADS`` or min(2, CPUs)."""
    raw = os.environ.get("SAELECT_SELECTION_THREADS", "")
    if raw.strip():
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"SAELECT_SELECTION_THREADS={raw!r} must be an integer >= 1")
        return value
    return max(1, min(2, os.cpu_count() or 1))


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=max(2, selection_threads()))
        return _POOL


def submit(task: Callable[[], Any]) -> Future:
    """Start the zero-argument function ``task`` on the shared pool; its Future."""
    return _pool().submit(task)


def run_tasks(tasks: list[Callable[[], Any]]) -> list[Any]:
    """The results of the zero-argument functions ``tasks``, in order: the last one runs on
    the calling thread, the others on the shared pool (one task: no thread at all)."""
    if not tasks:
        return []
    futures = [submit(t) for t in tasks[:-1]]
    last = tasks[-1]()
    return [*(f.result() for f in futures), last]
