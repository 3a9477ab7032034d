"""`SelectionActor`: the async Ray actor that owns the jobs and serves the HTTP API.

The class is plain Python (`SelectionActorImpl`); `selection_actor_class()` wraps it with
``ray.remote`` (``num_cpus=0``, restarted by Ray after a crash). Its constructor schedules, on the
actor's own event loop, the resume of every stored job and a uvicorn server running the FastAPI
app, so a restarted actor serves again on the same port from the same store with no call from
outside. `service.server.start_service` pins it to one node, so a restart binds the same node's
port again, and the URL it reports (``Settings.public_url``) stays valid. Ray Train workers inside
the cluster may call the actor's methods directly (the same answers as HTTP, without the HTTP hop).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from typing import Any

import numpy as np
from saelect.service.backend import JobStatus, Plan
from saelect.service.jobs import JobManager
from saelect.service.settings import Settings
from saelect.service.specs import JobSpec, job_spec_from_dict
from saelect.service.store import JobStore

log = logging.getLogger(__name__)

ACTOR_NAME = "saelect"
"""Name of the SelectionActor in its namespace."""
NAMESPACE = "saelect"


class SelectionActorImpl:
    """Jobs plus the HTTP server, on one event loop.

    Parameters
    ----------
    settings:
        Service settings (host, port, store, token...).
    pipeline_options:
        ``workers.pipeline_types.PipelineOptions`` for every job (None: defaults).
    """

    def __init__(self, settings: Settings, pipeline_options: Any = None) -> None:
        from saelect.service.logs import configure_logging

        configure_logging()  # SAELECT_LOG_LEVEL / SAELECT_LOG_FORMAT of the node's environment
        # Every blocking Ray call of the job manager runs in a worker thread (asyncio.to_thread),
        # never on this event loop; Ray warns about any ray.get in an async actor's process.
        os.environ.setdefault("RAY_WARN_BLOCKING_GET_INSIDE_ASYNC", "0")
        self.settings = settings
        self.manager = JobManager(
            JobStore(settings.store),
            allowed_roots=list(settings.allowed_roots),
            pipeline_options=pipeline_options,
        )
        self._server: Any = None
        self._url: str | None = None
        self._started = asyncio.get_event_loop().create_task(self._start())

    async def _start(self) -> str:
        import uvicorn
        from saelect.service.app import create_app
        from saelect.service.server import server_config

        self.settings.check_bind()
        await self.manager.resume()
        app = create_app(self.manager, self.settings)
        self._server = uvicorn.Server(server_config(app, self.settings))
        self._server.install_signal_handlers = lambda: None  # the actor owns no signals
        serving = asyncio.get_running_loop().create_task(self._server.serve())
        while not self._server.started:
            if serving.done():  # bind failed: surface the error
                serving.result()
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.02)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self._url = self.settings.public_url(port, _node_ip())
        app.state.public_url = self._url  # /healthz reports it
        # Python's full collections walk every object of the heap (about 250k once Ray, torch
        # and the app are imported: 100-150 ms, a pause every request in flight waits out).
        # What exists now lives as long as the process: frozen, later full collections skip it.
        gc.collect()
        gc.freeze()
        log.info("saelect serving on %s (bound to %s:%d)", self._url, self.settings.host, port)
        return self._url

    async def url(self) -> str:
        """The service URL, once the server listens (raises what stopped it otherwise)."""
        return await asyncio.shield(self._started)

    async def info(self) -> dict[str, Any]:
        """``{"url", "pid", "node_id", "jobs"}`` of this actor instance.

        A restarted actor has a new pid; ``node_id`` (None outside Ray) stays the pinned node's.
        """
        url = await asyncio.shield(self._started)
        return {
            "url": url,
            "pid": os.getpid(),
            "node_id": _node_id(),
            "jobs": len(await self.manager.list_jobs()),
        }

    async def shutdown(self) -> None:
        """Stop serving and kill the jobs' shard actors (the store keeps everything)."""
        await asyncio.shield(self._started)
        if self._server is not None:
            self._server.should_exit = True
        await self.manager.close()

    # -- the Backend, for callers that hold the actor handle ------------------------------------
    async def create_job(self, spec: dict[str, Any] | JobSpec) -> JobStatus:
        """Create a job from a spec dict (validated like ``POST /v1/jobs``) or a JobSpec."""
        await asyncio.shield(self._started)
        if not isinstance(spec, JobSpec):
            spec = job_spec_from_dict(
                spec,
                allowed_roots=list(self.settings.allowed_roots),
                allowed_modules=list(self.settings.allowed_modules),
            )
        return await self.manager.create_job(spec)

    async def wait_ready(self, job_id: str, timeout: float = 600.0) -> JobStatus:
        await asyncio.shield(self._started)
        return await self.manager.wait_ready(job_id, timeout)

    async def get_job(self, job_id: str) -> JobStatus:
        await asyncio.shield(self._started)
        return await self.manager.get_job(job_id)

    async def list_jobs(self) -> list[JobStatus]:
        await asyncio.shield(self._started)
        return await self.manager.list_jobs()

    async def plan(self, job_id: str, world_size: int) -> Plan:
        await asyncio.shield(self._started)
        return await self.manager.plan(job_id, world_size)

    async def epoch_indices(
        self, job_id: str, epoch: int, rank: int, world_size: int
    ) -> np.ndarray:
        await asyncio.shield(self._started)
        return await self.manager.epoch_indices(job_id, epoch, rank, world_size)

    async def feedback(
        self,
        job_id: str,
        epoch: int,
        indices: np.ndarray,
        losses: np.ndarray,
        key: tuple[int, int] | None = None,
    ) -> bool:
        await asyncio.shield(self._started)
        return await self.manager.feedback(job_id, epoch, indices, losses, key)

    async def epoch_stats(self, job_id: str, epoch: int) -> dict[str, Any]:
        await asyncio.shield(self._started)
        return await self.manager.epoch_stats(job_id, epoch)

    async def shard_info(self, job_id: str) -> list[dict[str, Any]]:
        """Where a ready job's shards run: shard id, range, node id, pid."""
        await asyncio.shield(self._started)
        return await self.manager.shard_info(job_id)

    async def delete_job(self, job_id: str) -> None:
        await asyncio.shield(self._started)
        await self.manager.delete_job(job_id)


def _node_ip() -> str | None:
    """The IP this process's Ray node registered (``--node-ip-address``); None outside Ray.

    The node's own record, not the host's outbound address: they differ where a node was started
    with an explicit address (several nodes on one host, a pod IP behind NAT).
    """
    node_id = _node_id()
    if node_id is None:
        return None
    import ray

    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            return str(node["NodeManagerAddress"])
    log.warning("node %s not in ray.nodes(); reporting the host's IP", node_id)
    return str(ray.util.get_node_ip_address())


def _node_id() -> str | None:
    """This process's Ray node id (None outside a Ray worker)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def selection_actor_class(max_restarts: int = -1) -> Any:
    """``ray.remote`` of `SelectionActorImpl`: no CPU reserved, restarted after a crash."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=max_restarts)(SelectionActorImpl)
