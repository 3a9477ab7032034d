"""Admission of a scoring run: reserve its GPUs or CPUs as one placement group, or say why not.

A scoring run asks for W workers, each ``{"GPU": 1, "CPU": c}`` on a GPU cluster or
``{"CPU": c}`` on a CPU cluster (`ScoringResources`, part of the job spec). `reserve` creates a
placement group of W bundles (``SPREAD`` over the nodes) and waits until Ray can place it. While
it waits, ``on_wait(reason)`` is told what the run waits for and what the cluster has free; when
it is not placed within ``placement_timeout_s`` the group is removed and `PlacementTimeoutError`
names the missing resource. Once placed, every scoring task runs inside the group, and `release`
removes it when the run ends: a scored job holds no CPU or GPU.

The group is named after the run (``saelect-scoring-{key}``). A group of the same name left by a
service process that died mid-run is removed before a new one is made, so a restarted service
never waits on its own leftovers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PlacementTimeoutError",
    "Reservation",
    "ResourceRequest",
    "ScoringResources",
    "describe_resources",
    "plan_request",
    "reserve",
]


@dataclass(frozen=True)
class ScoringResources:
    """What a job's scoring may reserve on the cluster, and for how long it may wait."""

    gpus: int | None = None
    """GPUs the scoring uses, one worker each; None: every GPU of the cluster (none on a CPU
    cluster); 0: CPU workers even on a GPU cluster."""
    cpu_workers: int | None = None
    """CPU workers when the scoring uses no GPU; None: one per CPU of the cluster."""
    cpus_per_worker: float | None = None
    """CPUs each worker reserves; None: 1 for a CPU worker, 0.25 beside a GPU."""
    placement_timeout_s: float = 3600.0
    """Seconds the scoring may wait for its resources before the job fails."""

    def __post_init__(self) -> None:
        if self.gpus is not None and self.gpus < 0:
            raise ValueError(f"gpus must be None or >= 0, got {self.gpus}")
        if self.cpu_workers is not None and self.cpu_workers < 1:
            raise ValueError(f"cpu_workers must be None or >= 1, got {self.cpu_workers}")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be None or > 0, got {self.cpus_per_worker}")
        if not self.placement_timeout_s > 0:
            raise ValueError(f"placement_timeout_s must be > 0, got {self.placement_timeout_s}")


@dataclass(frozen=True)
class ResourceRequest:
    """W identical bundles: the resolved request of one scoring run."""

    workers: int
    """Number of bundles (parallel scoring tasks)."""
    cpus: float
    """CPUs per bundle."""
    gpus: int
    """GPUs per bundle: 0 or 1."""

    @property
    def bundle(self) -> dict[str, float]:
        """One bundle as Ray takes it."""
        out = {"CPU": self.cpus}
        if self.gpus:
            out["GPU"] = float(self.gpus)
        return out

    def total(self) -> dict[str, float]:
        """Everything the run reserves while it scores."""
        return {k: v * self.workers for k, v in self.bundle.items()}

    def describe(self) -> str:
        """``2 x {CPU: 1, GPU: 1}``."""
        return f"{self.workers} x {describe_resources(self.bundle)}"


def describe_resources(res: Mapping[str, float]) -> str:
    """CPU, GPU and memory of a resource dict as ``{CPU: 2, GPU: 1, memory: 3.2 GiB}``."""
    parts = []
    for key in ("CPU", "GPU"):
        if key in res:
            parts.append(f"{key}: {float(res[key]):g}")
    if "memory" in res:
        parts.append(f"memory: {float(res['memory']) / 2**30:.1f} GiB")
    return "{" + ", ".join(parts) + "}"


def plan_request(
    resources: ScoringResources, cluster: Mapping[str, float], num_shards: int
) -> ResourceRequest:
    """Resolve a job's `ScoringResources` against the cluster's totals.

    GPUs: the asked number (None: the cluster's), never more workers than shards. CPU: the asked
    number of workers (None: the cluster's CPUs), at most one per shard. The request may exceed
    the cluster (an autoscaler may add nodes); `reserve` then waits and times out.
    """
    cluster_gpus = int(cluster.get("GPU", 0.0))
    cluster_cpus = float(cluster.get("CPU", 1.0))
    gpus = cluster_gpus if resources.gpus is None else resources.gpus
    if gpus > 0:
        workers = gpus if resources.gpus is not None else min(gpus, max(num_shards, 1))
        cpus = 0.25 if resources.cpus_per_worker is None else resources.cpus_per_worker
        return ResourceRequest(workers=workers, cpus=cpus, gpus=1)
    cpus = 1.0 if resources.cpus_per_worker is None else resources.cpus_per_worker
    default = max(int(cluster_cpus // cpus), 1)
    workers = resources.cpu_workers or min(default, max(num_shards, 1))
    return ResourceRequest(workers=workers, cpus=cpus, gpus=0)


class PlacementTimeoutError(RuntimeError):
    """The scoring could not be placed in time; the message names the missing resource."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (PlacementTimeoutError, (self.message,))


def _shortfall(request: ResourceRequest, total: Mapping[str, float]) -> list[str]:
    """What the cluster lacks in total for the request: ``GPU: needs 4, the cluster has 2``."""
    out = []
    for key, need in request.total().items():
        have = float(total.get(key, 0.0))
        if need > have + 1e-9:
            out.append(f"{key}: needs {need:g}, the cluster has {have:g} in total")
    # a bundle must fit on one node
    return out


def _wait_reason(request: ResourceRequest) -> str:
    import ray

    free = describe_resources(ray.available_resources())
    total = ray.cluster_resources()
    missing = _shortfall(request, total)
    if missing:
        return (
            f"waits for {request.describe()} to score; more than the cluster has "
            f"({'; '.join(missing)}): waiting for nodes to join"
        )
    return f"waits for {request.describe()} to score; the cluster has {free} free"


@dataclass
class Reservation:
    """A placed scoring reservation: run tasks with `options`, then `release`."""

    request: ResourceRequest
    group: Any
    """The Ray placement group."""
    waited_s: float = 0.0
    """Seconds spent waiting for placement."""

    def options(self, *, gpu: bool = False, bundle: int | None = None) -> dict[str, Any]:
        """Task options that run inside the reservation (a GPU task takes its bundle's GPU).

        ``bundle`` pins the task to bundle ``bundle % W`` (shard tasks go round-robin, so the
        work spreads over every reserved node); None lets Ray pick any free bundle.
        """
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        index = -1 if bundle is None else bundle % self.request.workers
        return {
            "num_cpus": self.request.cpus,
            "num_gpus": float(self.request.gpus) if gpu else 0.0,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.group, placement_group_bundle_index=index
            ),
        }

    def release(self) -> None:
        """Give every reserved CPU and GPU back to the cluster (idempotent)."""
        from ray.util import remove_placement_group

        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None


def _remove_leftover(name: str) -> None:
    from ray.util import get_placement_group, remove_placement_group

    try:
        old = get_placement_group(name)
    except ValueError:
        return
    remove_placement_group(old)
    time.sleep(0.1)


def reserve(
    request: ResourceRequest,
    *,
    name: str,
    timeout_s: float,
    on_wait: Callable[[str | None], None] | None = None,
    poll_s: float = 0.5,
) -> Reservation:
    """Reserve ``request`` as a placement group; wait for it at most ``timeout_s`` seconds.

    ``on_wait(reason)`` is called with a sentence while the group is not placed, and with None
    once it is; an exception it raises cancels the wait (the group is removed) and propagates.

    Raises
    ------
    PlacementTimeoutError: not placed in time (the group is removed; nothing stays reserved).
    """
    import ray
    from ray.util import placement_group, remove_placement_group

    _remove_leftover(name)
    group = placement_group([request.bundle] * request.workers, strategy="SPREAD", name=name)
    start = time.monotonic()
    ready = group.ready()
    while True:
        done, _ = ray.wait([ready], timeout=poll_s)
        if done:
            break
        waited = time.monotonic() - start
        if waited >= timeout_s:
            reason = _wait_reason(request)
            remove_placement_group(group)
            raise PlacementTimeoutError(
                f"scoring could not be placed within {timeout_s:g} s: it {reason}. "
                "Free resources (delete jobs that are scoring, or finish training), or ask for "
                "fewer (the job spec's scoring.gpus, scoring.cpu_workers)"
            )
        if on_wait is not None:
            try:
                on_wait(_wait_reason(request))  # may raise to cancel the wait
            except BaseException:
                remove_placement_group(group)
                raise
    if on_wait is not None:
        on_wait(None)
    return Reservation(request, group, waited_s=time.monotonic() - start)
