"""Start the service: Ray (embedded or a cluster), the SelectionActor, its HTTP server.

Embedded default: with no address and no ``RAY_ADDRESS``, a private local Ray starts on loopback;
with ``--address``/``RAY_ADDRESS``/``SAELECT_RAY_ADDRESS`` the same code joins a cluster.

The SelectionActor runs uvicorn, so the node it runs on is where the port must be reachable. It is
pinned (`actor_placement`): to the node that declares the custom resource ``pin_resource``, or by
default to the node of the process that starts the service, with a hard node affinity that also
holds for the actor's restarts. `serve_forever` prints the advertised URL and writes it to the URL
file that `saelect jobs` reads (deploy/README.md).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saelect.service.actor import ACTOR_NAME, NAMESPACE, selection_actor_class
from saelect.service.lease import StoreLease, StoreOwnedError
from saelect.service.ray_local import check_embedded, prepare_embedded_env
from saelect.service.settings import Settings
from saelect.workers.storage import Storage

API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
"""Where Ray's state API (``ray.util.state``) sends its queries; read in every Ray process."""


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    log_to_driver: bool = False,
    include_dashboard: bool = False,
) -> bool:
    """Connect to Ray unless connected; returns True when this call started a local Ray.

    ``address`` None and no ``RAY_ADDRESS``: a private local Ray, every socket of every one of its
    processes on 127.0.0.1 and Ray's token authentication on, whatever the caller's environment
    says (`service.ray_local`); no dashboard unless ``include_dashboard`` (Ray Train's state
    queries need it, the service does not).

    With the dashboard, its port is chosen here and written to ``RAY_API_SERVER_ADDRESS`` before
    Ray starts, so that every process of this Ray (they inherit the environment) sends its state
    queries to this Ray's dashboard. Without it, Ray's state API looks for the one Ray instance
    on the host, and every query fails while another one runs there (Ray Train's
    ``PlacementGroupCleaner`` then logs a traceback per query).

    Raises
    ------
    RuntimeError
        When the started Ray is not on loopback or runs without token authentication.
    """
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        prepare_embedded_env()  # before ray is imported here, and corrected if it already was
    import ray

    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=log_to_driver)
        return False
    dashboard: dict[str, Any] = {}
    if include_dashboard:
        port = free_port()
        dashboard = {"dashboard_host": "127.0.0.1", "dashboard_port": port}
        os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    ray.init(
        address="local",
        namespace=NAMESPACE,
        logging_level=logging.WARNING,  # not Ray's start-up banner (colour codes included)
        num_cpus=num_cpus,
        include_dashboard=include_dashboard,
        log_to_driver=log_to_driver,
        object_store_memory=512 * 1024**2,
        **dashboard,
    )
    check_embedded()
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class ServiceHandle:
    """A running service: the SelectionActor handle and its URL."""

    actor: Any
    url: str
    lease: StoreLease | None = None
    """The store's lease, held by this process while the service runs (`service.lease`)."""

    def stop(self) -> None:
        """Stop the server and the jobs' shard actors, then the SelectionActor; free the store."""
        import ray

        try:
            ray.get(self.actor.shutdown.remote(), timeout=60)
        finally:
            ray.kill(self.actor, no_restart=True)
            if self.lease is not None:
                self.lease.release()


def actor_placement(settings: Settings) -> dict[str, Any]:
    """The ``.options(...)`` that pin the SelectionActor to its node (Ray must be initialized).

    ``settings.pin_resource`` set: ask for 1 unit of that custom resource, so the actor (and every
    restart) lands on the node started with ``--resources='{"<name>": 1}'``. Otherwise a hard
    ``NodeAffinitySchedulingStrategy`` to this process's node: the service's port is published
    where it was started.

    Raises
    ------
    ValueError
        When no node of the cluster declares ``pin_resource``.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = settings.pin_resource
    if name:
        total = ray.cluster_resources().get(name, 0.0)
        if total < 1:
            raise ValueError(
                f"no node of the Ray cluster declares the custom resource {name!r} (found "
                f"{total}); start the service's node with ray start --resources='{{\"{name}\": 1}}'"
            )
        return {"resources": {name: 1}}
    node_id = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)}


KEEP_ALIVE_S = 75
"""Seconds uvicorn keeps an idle connection open (its default, 5, races busy clients)."""


def server_config(app: Any, settings: Settings, **overrides: Any) -> Any:
    """The ``uvicorn.Config`` the SelectionActor serves ``app`` with: host, port, quiet logs,
    HTTPS when ``settings.tls_cert``/``tls_key`` are set (uvicorn's ``ssl_certfile`` and
    ``ssl_keyfile``, read here, on the actor's node), and, for an app with the fast path on and
    httptools installed, uvicorn's httptools protocol answering the fast path itself
    (`service.fast_protocol`).

    Raises
    ------
    FileNotFoundError
        When a TLS file does not exist on this node.
    """
    import uvicorn

    tls: dict[str, str] = {}
    if settings.tls_cert and settings.tls_key:
        for label, path in (("certificate", settings.tls_cert), ("key", settings.tls_key)):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"TLS {label} {path!r} not found on this node")
        tls = {"ssl_certfile": settings.tls_cert, "ssl_keyfile": settings.tls_key}
    kw: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": "warning",
        "lifespan": "off",
        "access_log": False,
        # uvicorn closes a connection idle for 5 s by default: a rank whose next request races
        # that close gets "server disconnected" (1024 ranks lost 27 % of their fetches so,
        # docs/benchmarks_load.md); ranks idle for a whole epoch reconnect anyway
        "timeout_keep_alive": KEEP_ALIVE_S,
        **tls,
    }
    fast = getattr(app, "fast_indices", None)
    if fast is not None and fast.enabled and "http" not in overrides and _has_httptools():
        from saelect.service.fast_protocol import fast_httptools_protocol

        kw["http"] = fast_httptools_protocol(fast)  # the fast path without an ASGI task
    kw.update(overrides)
    return uvicorn.Config(app, **kw)


def _has_httptools() -> bool:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return False
    return True


def write_url_file(url: str, path: str) -> Path:
    """Write ``url`` (one line) to ``path`` atomically, creating its directory; returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".url-", dir=target.parent)
    with os.fdopen(fd, "w") as f:
        f.write(url + "\n")
    os.replace(tmp, target)
    return target


def start_service(
    settings: Settings,
    *,
    pipeline_options: Any = None,
    name: str | None = ACTOR_NAME,
    max_restarts: int = -1,
    lease: StoreLease | None = None,
) -> ServiceHandle:
    """Start a SelectionActor serving ``settings`` (Ray must be initialized).

    Parameters
    ----------
    settings:
        Host, port (0 picks a free one, but a restarted actor then gets a new port), store...
    pipeline_options:
        ``workers.pipeline_types.PipelineOptions`` for every job.
    name:
        Actor name in the ``saelect`` namespace (None: anonymous, e.g. several in one test).
    max_restarts:
        Ray restarts of the actor after a crash (-1: always); each restart lands on the same node
        (`actor_placement`) and binds the same port.
    lease:
        The store's lease, already taken (None: take it here). This process renews it until
        `ServiceHandle.stop`; a second service on the store refuses to start meanwhile.

    Raises
    ------
    ValueError
        A non-loopback bind without a token, or a ``pin_resource`` no node declares.
    service.lease.StoreOwnedError
        When another live service owns the store.
    """
    import ray

    settings.check_bind()
    lease = lease or StoreLease(Storage(settings.store)).acquire()
    try:
        cls = selection_actor_class(max_restarts=max_restarts)
        opts: dict[str, Any] = {"namespace": NAMESPACE, **actor_placement(settings)}
        if name:
            opts.update(name=name, get_if_exists=False)
        actor = cls.options(**opts).remote(settings, pipeline_options)
        url = ray.get(actor.url.remote(), timeout=settings.start_timeout_s)
    except BaseException:
        lease.release()
        raise
    return ServiceHandle(actor=actor, url=url, lease=lease)


def serve_forever(settings: Settings) -> int:
    """`saelect serve`: run until interrupted; the store keeps every job for the next start.

    The store's lease is taken before Ray starts, so a second service on a store that a live one
    owns refuses at once (rc 3, the owner named); losing the lease to another service stops this
    one (rc 3).
    """
    try:
        lease = StoreLease(Storage(settings.store)).acquire()
    except StoreOwnedError as exc:
        print(f"saelect serve: {exc}", file=sys.stderr)
        return 3
    try:
        started_local = init_ray(settings.ray_address)
        handle = start_service(settings, lease=lease)
    except BaseException:
        lease.release()
        raise
    where = "embedded local Ray" if started_local else "Ray cluster"
    url_file = write_url_file(handle.url, settings.url_path)
    print(f"saelect serving on {handle.url} (store {settings.store}, {where}); Ctrl-C stops it")
    print(f"URL written to {url_file} (the default --url of saelect jobs)")
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(1.0):
        if lease.lost.is_set():
            print("saelect serve: another service took the store's lease", file=sys.stderr)
            break
    print("stopping")
    try:
        handle.stop()
    finally:
        _remove_url_file(url_file, handle.url)
    return 3 if lease.lost.is_set() else 0


def _remove_url_file(path: Path, url: str) -> None:
    """Remove the URL file if it still names ``url`` (another service may have replaced it)."""
    try:
        if path.read_text().strip() == url:
            path.unlink()
    except OSError:
        pass
