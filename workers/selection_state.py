"""Where a ready job's per-sample selection state lives: actors that reserve no CPU or GPU.

A `SelectionStateActor` owns the global rows ``[lo, hi)`` of one shard. It loads what the
policy reads (R, D, labels, codes, p) from the scoring storage, or, for a policy that reads no
scores, only the labels from the dataset, and holds a pure `SelectionShard` whose methods the
coordinator calls through `call` (the threshold protocol, commits, feedback). The actor does
the per-epoch O(n) work but reserves ``num_cpus=0``: a live job costs the cluster memory only
(a ``memory`` reservation sized to the arrays it holds).

After a crash Ray restarts the actor (its constructor runs again): it has no selection state,
so `call` raises and the job manager re-attaches the policy and replays the stored epochs.

The class is plain Python (tests use it in-process); `SelectionShards` starts one Ray actor per
shard and is the handle the job manager keeps.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from saelect.workers.selection_shard import SelectionShard
from saelect.workers.shard_data import ShardData
from saelect.workers.shard_plan import ShardPlan, ShardSpec
from saelect.workers.shard_scoring import (
    FACTORS_FILE,
    load_shard_codes,
    load_shard_labels,
    load_shard_scores,
    read_shard_labels,
)
from saelect.workers.storage import Storage

__all__ = [
    "SelectionShards",
    "SelectionStateActor",
    "actor_broadcast",
    "shard_memory",
    "state_bytes",
]

_BASE_MEMORY = 64 * 2**20
"""Bytes reserved per state actor beyond its arrays (interpreter, numpy, transient copies)."""


_HELD_PER_ROW = 8 + 16 + 24 + 8
"""Bytes per sample held by every state actor: labels, their class layout (order and inverse,
int64 each), usage and policy counters (about 24 B), the reused float64 stage-score buffer."""
_SCORED_PER_ROW = 16 + 4 + 5 + 12
"""Bytes per sample held with scores, besides the codes: R and D (float64), the sparse
matrix's row pointers (int32), per-sample activation mass and its sign, and up to three
memoized coverage profiles (float32)."""
_CODES_PER_UNIT = 6 + 8
"""Bytes per sample and code unit: the stored codes (int32 id, float16 value), the float32
sparse matrix of the activations (the ids are shared) and, where some activation is 0, the
int32 ids the unit counts read (0-activation entries masked)."""
_TRANSIENT_PER_ROW = 64
"""Bytes per sample of an epoch's transient arrays: the score keys (uint64) and their class
order, the class-ordered scores, the selection mask, usage after the epoch, the unit-count
vector and gathers of the selection."""


def state_bytes(num_rows: int, k: int | None, with_scores: bool) -> int:
    """An upper estimate of the bytes one state actor holds for ``num_rows`` samples.

    What it keeps (:data:`_HELD_PER_ROW`; with scores also :data:`_SCORED_PER_ROW` and
    :data:`_CODES_PER_UNIT` per code unit, k per sample: R, D, the codes and the structures
    derived from them, see ``workers.shard_derived``) plus an epoch's transient arrays
    (:data:`_TRANSIENT_PER_ROW`), and a fixed base for the interpreter.
    """
    per_row = _HELD_PER_ROW + _TRANSIENT_PER_ROW
    if with_scores:
        per_row += _SCORED_PER_ROW + _CODES_PER_UNIT * (k or 0)
    return _BASE_MEMORY + per_row * num_rows


class SelectionStateActor:
    """One shard's selection state (plain class; `SelectionShards` wraps it with ray.remote).

    Parameters
    ----------
    spec: the shard (global rows ``[lo, hi)``).
    storage: the scoring storage holding ``shards/{s:05d}/scores.npz`` and the codes; None for
        a policy that reads no scores.
    label_column: read the labels from the dataset when there is no scoring storage.
    """

    def __init__(self, spec: ShardSpec, storage: Storage | None, label_column: str | None) -> None:
        self.spec = spec
        self.storage = storage
        self.label_column = label_column
        self._selection: SelectionShard | None = None

    def info(self) -> dict[str, Any]:
        """Shard id, range, the Ray node id (None outside Ray) and the process id."""
        node = None
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
        return {
            "shard_id": self.spec.shard_id,
            "lo": self.spec.lo,
            "hi": self.spec.hi,
            "node_id": node,
            "pid": os.getpid(),
        }

    def shard_data(self, with_codes: bool = True) -> ShardData:
        """What the policy reads: range, R, D, labels, codes and p (None where absent)."""
        spec = self.spec
        if self.storage is None:
            labels = read_shard_labels(spec, self.label_column)
            return ShardData(lo=spec.lo, hi=spec.hi, labels=labels)
        r, d = load_shard_scores(self.storage, spec.shard_id)
        codes = load_shard_codes(self.storage, spec.shard_id) if with_codes else None
        p = self.storage.read_npy(FACTORS_FILE) if self.storage.exists(FACTORS_FILE) else None
        return ShardData(
            lo=spec.lo,
            hi=spec.hi,
            R=r,
            D=d,
            labels=load_shard_labels(self.storage, spec.shard_id),
            code_ids=None if codes is None else codes.ids,
            code_values=None if codes is None else codes.values,
            p=p,
        )

    def attach(self, policy: Any, with_codes: bool = True) -> int:
        """Hold a fresh `SelectionShard` driven by ``policy``; returns the shard's row count."""
        self._selection = SelectionShard(self.shard_data(with_codes), policy)
        return self.spec.num_rows

    def call(self, method: str, *args: Any) -> Any:
        """Forward ``method(*args)`` to the attached `SelectionShard`."""
        if self._selection is None:
            raise ValueError(f"shard {self.spec.shard_id} has no selection state attached")
        if method.startswith("_"):
            raise ValueError(f"refusing to call private method {method!r}")
        return getattr(self._selection, method)(*args)

    def memory_bytes(self) -> dict[str, int]:
        """:func:`shard_memory` of the attached shard ({} before ``attach``)."""
        return {} if self._selection is None else shard_memory(self._selection)


def shard_memory(sel: SelectionShard) -> dict[str, int]:
    """Bytes held per structure (arrays only): the shard data's arrays, the counters, the
    derived structures (class layout, sparse code matrices, memoized profiles) and the
    stage-score buffer."""
    out: dict[str, int] = {}
    data = sel.data
    for name in ("R", "D", "labels", "code_ids", "code_values"):
        arr = getattr(data, name, None)
        if arr is not None:
            out[name] = int(arr.nbytes)
    out["counters"] = int(sum(v.nbytes for v in sel.counters.values()))
    out["derived"] = int(data.derived.nbytes())
    out["score_buffer"] = sel.buffer_nbytes()
    return out


_PUT_BYTES = 1 << 16
"""Array arguments at least this large are put in the object store once per broadcast."""


def actor_broadcast(actors: Sequence[Any]) -> Callable[..., list[Any]]:
    """A ``broadcast(method, *args)`` over state actors' attached selection (submit all, get)."""
    import ray

    def broadcast(method: str, *args: Any) -> list[Any]:
        # a large array argument (feedback indices, exact picks) goes to the object store once
        shared = tuple(
            ray.put(a) if isinstance(a, np.ndarray) and a.nbytes >= _PUT_BYTES else a for a in args
        )
        return ray.get([a.call.remote(method, *shared) for a in actors])

    return broadcast


@dataclass
class SelectionShards:
    """The state actors of one job, in shard order."""

    plan: ShardPlan
    actors: list[Any] = field(default_factory=list)
    memory: list[int] = field(default_factory=list)
    """Bytes each actor reserves (Ray's ``memory`` resource)."""

    @classmethod
    def start(
        cls,
        plan: ShardPlan,
        storage: Storage | None,
        label_column: str | None,
        *,
        k: int | None = None,
        max_restarts: int = -1,
        max_task_retries: int = 3,
    ) -> SelectionShards:
        """One ``num_cpus=0`` actor per shard, spread over the nodes, restarted after a crash.

        ``k`` (codes per sample) sizes the memory reservation; None when the policy reads no
        codes.
        """
        import ray

        cls_remote = ray.remote(SelectionStateActor)
        out = cls(plan)
        for s in plan.shards:
            mem = state_bytes(s.num_rows, k, storage is not None)
            handle = cls_remote.options(
                num_cpus=0,
                num_gpus=0,
                memory=mem,
                max_restarts=max_restarts,
                max_task_retries=max_task_retries,
                scheduling_strategy="SPREAD",
            ).remote(s, storage, label_column)
            out.actors.append(handle)
            out.memory.append(mem)
        return out

    def attach(self, policy: Any, *, with_codes: bool = True) -> None:
        """Give every shard a fresh `SelectionShard` driven by ``policy``."""
        import ray

        policy_ref = ray.put(policy)  # one copy in the object store for every shard
        ray.get([a.attach.remote(policy_ref, with_codes) for a in self.actors])

    def broadcast(self) -> Callable[..., list[Any]]:
        """A `service.selection.threshold` broadcast over the attached shards."""
        return actor_broadcast(self.actors)

    def info(self) -> list[dict[str, Any]]:
        """Per shard: id, range, node and process id."""
        import ray

        return ray.get([a.info.remote() for a in self.actors])

    def shutdown(self) -> None:
        """Kill the state actors (the store keeps everything they were built from)."""
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
