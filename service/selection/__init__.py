"""Epoch selection: hashing, exact top-m, the threshold protocol, shuffle, partition, engine."""

from __future__ import annotations

from typing import Any

from saelect.service.selection.hashing import gumbel, hash_u64, uniform01
from saelect.service.selection.partition import per_rank_length, rank_indices
from saelect.service.selection.shuffle import epoch_permutation, shuffle_epoch
from saelect.service.selection.threshold import (
    Broadcast,
    ProtocolTrace,
    global_top_m,
    local_broadcast,
)
from saelect.service.selection.topk import top_m

__all__ = [
    "Broadcast",
    "EpochResult",
    "ProtocolTrace",
    "SelectionEngine",
    "SingleProcessSelector",
    "epoch_permutation",
    "global_top_m",
    "gumbel",
    "hash_u64",
    "local_broadcast",
    "per_rank_length",
    "rank_indices",
    "shuffle_epoch",
    "top_m",
    "uniform01",
]


def __getattr__(name: str) -> Any:  # the engine imports the policies, so it loads on first use
    if name in ("EpochResult", "SelectionEngine", "SingleProcessSelector"):
        from saelect.service.selection import engine

        return getattr(engine, name)
    raise AttributeError(name)
