"""Start the service: Ray (embedded or a cluster), the SelectionActor, its HTTP server.

Embedded default (DESIGN 3.6): with no address and no ``RAY_ADDRESS``, a private local Ray starts
on loopback; with ``--address``/``RAY_ADDRESS``/``SAELECT_RAY_ADDRESS`` the same code joins a
cluster.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

from service.actor import ACTOR_NAME, NAMESPACE, selection_actor_class
from service.settings import Settings

_LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # embedded Ray binds 127.0.0.1 only
    "RAY_USAGE_STATS_ENABLED": "0",
}


def init_ray(
    address: str | None = None, *, num_cpus: int | None = None, log_to_driver: bool = False
) -> bool:
    """Connect to Ray unless connected; returns True when this call started a local Ray.

    ``address`` None and no ``RAY_ADDRESS``: a private local Ray (no dashboard, loopback only).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=log_to_driver)
        return False
    for key, value in _LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(
        address="local",
        namespace=NAMESPACE,
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=log_to_driver,
        object_store_memory=512 * 1024**2,
    )
    return True


@dataclass
class ServiceHandle:
    """A running service: the SelectionActor handle and its URL."""

    actor: Any
    url: str

    def stop(self) -> None:
        """Stop the server and the jobs' shard actors, then the SelectionActor."""
        import ray

        try:
            ray.get(self.actor.shutdown.remote(), timeout=60)
        finally:
            ray.kill(self.actor, no_restart=True)


def start_service(
    settings: Settings,
    *,
    pipeline_options: Any = None,
    name: str | None = ACTOR_NAME,
    max_restarts: int = -1,
) -> ServiceHandle:
    """Start a SelectionActor serving ``settings`` (Ray must be initialized).

    Parameters
    ----------
    settings:
        Host, port (0 picks a free one, but a restarted actor then gets a new port), store...
    pipeline_options:
        ``workers.pipeline.PipelineOptions`` for every job.
    name:
        Actor name in the ``saelect`` namespace (None: anonymous, e.g. several in one test).
    """
    import ray

    settings.check_bind()
    cls = selection_actor_class(max_restarts=max_restarts)
    opts: dict[str, Any] = {"namespace": NAMESPACE}
    if name:
        opts.update(name=name, get_if_exists=False)
    actor = cls.options(**opts).remote(settings, pipeline_options)
    url = ray.get(actor.url.remote(), timeout=120)
    return ServiceHandle(actor=actor, url=url)


def serve_forever(settings: Settings) -> int:
    """`saelect serve`: run until interrupted; the store keeps every job for the next start."""
    started_local = init_ray(settings.ray_address)
    handle = start_service(settings)
    where = "embedded local Ray" if started_local else "Ray cluster"
    print(f"saelect serving on {handle.url} (store {settings.store}, {where}); Ctrl-C stops it")
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    print("stopping")
    handle.stop()
    return 0
