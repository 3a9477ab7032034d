"""The deployment as written, on a real multi-process Ray cluster on loopback.

One cluster per module, every process started here from the deployment files themselves:

1. the ``ray-head`` command line of ``docker-compose.yml`` (``ray start --head ... --block``);
2. the ``ray-worker`` command line (``ray start --address=... --block``), a second raylet;
3. the ``saelect`` service's command line (``bash -c "ray start ... && exec saelect serve ..."``):
   a third raylet with no CPU and the ``saelect_service`` resource, and the service driver;
4. clients in separate processes: ``saelect jobs create`` (its URL from the URL file) and a
   script that fetches epochs through the URL the service reported.

Scoring is observed where it leaves records: the job's placement group (``saelect-scoring-*``,
kept by Ray after removal with the node of each bundle) and ``pipeline.json``'s
``encoding.nodes``, the nodes the shard encode tasks ran on.

The mapping from compose to this machine is only what a container network gives for free:
``ray-head`` is 127.0.0.1, the fixed ports are free ports chosen here, the volumes ``/data`` and
``/store`` are temporary directories, ``.env`` is a dict, and every node gets
``--node-ip-address=127.0.0.1`` plus explicit ports (three raylets share one host). Ray registers
the nodes of a multi-node cluster under the host's reachable address even then, so that address
is each node's IP here. The service still binds 0.0.0.0, so the URL it reports is its node's IP,
as in a container.

Every process is stopped by PID: each command runs in its own session and the test signals the
processes of that session (Ray's daemons stay in it). Never ``ray stop``: it kills every Ray
process of the user.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from saelect.client import SelectionClient
from saelect.workers.datasets import write_image_parquet

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
BIN = str(Path(sys.executable).parent)
TOKEN = "loopback-test-token"
SPEC = {
    "name": "deploy",
    "dataset": {
        "uri": "/data/digits/train.parquet",
        "label_column": "label",
        "feature": {"kind": "pixels", "column": "image", "dim": 16},
    },
    "policy": {"name": "factor", "ratio": 0.3, "epochs": 3, "seed": 0},
    "sae": {"units": 64, "k": 4, "epochs": 2},
    # two scoring workers: one per CPU raylet (SPREAD), fewer torch imports on a busy machine
    "scoring": {"cpu_workers": 2},
}
FETCH = """
import hashlib, json, sys
from saelect.client import SelectionClient
url, token, job = sys.argv[1:4]
c = SelectionClient(url, token=token, retries=20)
out = {}
for epoch in range(3):
    parts = [c.indices(job, epoch, rank, 2) for rank in range(2)]
    out[epoch] = [len(p) for p in parts] + [hashlib.sha256(b"".join(p.tobytes() for p in parts))
                                            .hexdigest()]
print(json.dumps(out))
"""


# ------------------------------------------------------------------------------ processes


def _session_pids(sid: int) -> list[int]:
    """PIDs of every live process whose session id is ``sid`` (from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@dataclass
class Proc:
    """A command started in its own session; its log goes to a file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    cwd: Path
    popen: subprocess.Popen[bytes] = field(init=False)

    def __post_init__(self) -> None:
        with open(self.log, "wb") as out:
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, first: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal the leader, wait, then TERM and KILL what is left of its session."""
        sid = self.popen.pid
        if self.popen.poll() is None:
            _signal([sid], first)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            left = _session_pids(sid)
            if not left:
                break
            _signal(left, sig)
            deadline = time.monotonic() + wait
            while _session_pids(sid) and time.monotonic() < deadline:
                time.sleep(0.2)
        if self.popen.poll() is None:
            self.popen.kill()
        return self.popen.wait(10)


def _free_port_block(count: int, exclude: set[int]) -> list[int]:
    """``count`` consecutive free TCP ports on 127.0.0.1, none in ``exclude``."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - count)
        ports = list(range(base, base + count))
        if exclude & set(ports):
            continue
        socks = []
        try:
            for port in ports:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return ports
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no block of {count} free ports")


class Ports:
    """Distinct free ports, handed out one block at a time."""

    def __init__(self) -> None:
        self.used: set[int] = set()

    def take(self, count: int) -> list[int]:
        ports = _free_port_block(count, self.used)
        self.used.update(ports)
        return ports

    def node_flags(self) -> list[str]:
        """Every port flag of a ``ray start`` (worker ports: a range of 40)."""
        named = [
            "node-manager-port",
            "object-manager-port",
            "dashboard-agent-grpc-port",
            "dashboard-agent-listen-port",
            "runtime-env-agent-port",
            "metrics-export-port",
        ]
        ports = self.take(len(named))
        workers = self.take(40)
        flags = [f"--{n}={p}" for n, p in zip(named, ports, strict=True)]
        return [*flags, f"--min-worker-port={workers[0]}", f"--max-worker-port={workers[-1]}"]


# ------------------------------------------------------------------------------ compose


def _interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's variable interpolation: ``$$``, ``${X}``, ``${X:-default}``, ``${X:?error}``."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        got = env.get(name, "")
        if op == ":?" and not got:
            raise KeyError(f"compose needs {name}: {arg}")
        return got or (arg if op == ":-" else "")

    out = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:[-?])?([^}]*)\}", one, value.replace("$$", "\0"))
    return out.replace("\0", "$")


@dataclass
class ComposeMap:
    """How compose's names become this machine's: hosts, ports, volumes, .env."""

    gcs: int
    api: int
    volumes: dict[str, str]
    dotenv: dict[str, str]

    def arg(self, value: str) -> str:
        value = _interpolate(value, self.dotenv)
        value = re.sub(r"(ray-head|127\.0\.0\.1):6379\b", f"127.0.0.1:{self.gcs}", value)
        value = re.sub(r"--port=6379\b", f"--port={self.gcs}", value)
        value = value.replace("--dashboard-host=0.0.0.0", "--dashboard-host=127.0.0.1")
        value = re.sub(r"--port(=|\s+)8000\b", rf"--port\g<1>{self.api}", value)
        for mount, local in self.volumes.items():
            value = re.sub(rf"(?<=[\s\"'=\[]){re.escape(mount)}(?=[\s\"'\]/]|$)", local, value)
        return value


def compose_service(name: str) -> dict[str, Any]:
    """One service of docker-compose.yml (YAML anchors and merges resolved by the loader)."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service: dict[str, Any] = compose["services"][name]
    return service


# ------------------------------------------------------------------------------ cluster


@dataclass
class Cluster:
    """The loopback cluster: head, worker and service processes, and what they were given."""

    tmp: Path
    temp_dir: str
    ports: Ports
    mapping: ComposeMap
    dashboard: int
    env: dict[str, str]
    head: Proc
    worker: Proc
    procs: list[Proc]


def _wait_for(check: Any, timeout: float, what: str, procs: list[Proc]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        for p in procs:
            if p.popen.poll() is not None:
                raise AssertionError(f"{p.name} exited ({p.popen.returncode}):\n{p.text()[-4000:]}")
        time.sleep(0.5)
    logs = "\n".join(f"--- {p.name}\n{p.text()[-3000:]}" for p in procs)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


@contextlib.contextmanager
def _logs_on_failure(procs: list[Proc]) -> Iterator[None]:
    """Re-raise a failure with the tail of each process's log (the service's is what tells)."""
    try:
        yield
    except Exception as exc:
        logs = "\n".join(f"--- {p.name}\n{p.text()[-3000:]}" for p in procs)
        raise AssertionError(f"{exc}\n{logs}") from exc


def _head_healthy(mapping: ComposeMap) -> bool:
    """The head's compose healthcheck (``ray health-check``), run here."""
    test = compose_service("ray-head")["healthcheck"]["test"]
    assert test[0] == "CMD"
    argv = [mapping.arg(a) for a in test[1:]]
    out = subprocess.run(argv, capture_output=True, timeout=30, env=_base_env())
    return out.returncode == 0


def _base_env() -> dict[str, str]:
    drop = ("RAY_ADDRESS", "SAELECT_", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")  # "0" forbids joining
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Head and worker from docker-compose.yml on loopback; stopped by PID afterwards."""
    if ray.is_initialized():
        ray.shutdown()
    tmp = Path(tempfile.mkdtemp(prefix="sd", dir="/tmp"))  # short: unix socket path limit
    temp_dir = str(tmp / "r")
    ports = Ports()
    gcs, api, dashboard, client_port = (ports.take(1)[0] for _ in range(4))
    volumes = {"/data": str(tmp / "data"), "/store": str(tmp / "store")}
    for local in volumes.values():
        Path(local).mkdir()
    write_image_parquet(tmp / "data" / "digits", "digits")
    mapping = ComposeMap(gcs, api, volumes, {"SAELECT_API_TOKEN": TOKEN})
    env = _base_env()
    node = ["--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    node += ["--object-store-memory=200000000"]
    head_cmd = [mapping.arg(a) for a in compose_service("ray-head")["command"]]
    head_cmd += [*node, "--num-cpus=2", "--include-dashboard=true", f"--dashboard-port={dashboard}"]
    head_cmd += [f"--ray-client-server-port={client_port}", *ports.node_flags()]
    procs: list[Proc] = []
    head = Proc("ray-head", head_cmd, env, tmp / "head.log", tmp)
    procs.append(head)
    try:
        _wait_for(lambda: _head_healthy(mapping), 120, "the head's healthcheck", procs)
        worker_cmd = [mapping.arg(a) for a in compose_service("ray-worker")["command"]]
        worker_cmd += [*node, "--num-cpus=2", *ports.node_flags()]
        worker = Proc("ray-worker", worker_cmd, env, tmp / "worker.log", tmp)
        procs.append(worker)
        ray.init(address=f"127.0.0.1:{gcs}", log_to_driver=False)
        _wait_for(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, 120, "2 nodes", procs)
        yield Cluster(tmp, temp_dir, ports, mapping, dashboard, env, head, worker, procs)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for proc in reversed(procs):
            proc.stop(timeout=15.0)
        shutil.rmtree(tmp, ignore_errors=True)


def _node_ids_by_port() -> dict[int, str]:
    """Alive Ray node ids keyed by their node manager port."""
    return {int(n["NodeManagerPort"]): n["NodeID"] for n in ray.nodes() if n["Alive"]}


def _node_ip(node_id: str) -> str:
    """The address a node registered (Ray turns ``--node-ip-address=127.0.0.1`` into the host's
    reachable address once a second node joins)."""
    return str(next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id))


def _port_of(flags: list[str], name: str) -> int:
    return int(next(f.split("=", 1)[1] for f in flags if f.startswith(f"--{name}=")))


# ------------------------------------------------------------------------------ tests


def test_compose_service_serves_scores_on_both_raylets_and_survives_a_kill(
    cluster: Cluster,
) -> None:
    spec = compose_service("saelect")
    service_flags = cluster.ports.node_flags()
    env = dict(cluster.env)
    for key, value in spec["environment"].items():
        env[key] = cluster.mapping.arg(str(value))
    env["RAY_START_ARGS"] = " ".join(
        [
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={cluster.temp_dir}",
            "--disable-usage-stats",
            "--object-store-memory=100000000",
            *service_flags,
        ]
    )
    url_file = cluster.tmp / "url"
    env["SAELECT_URL_FILE"] = str(url_file)
    argv = [cluster.mapping.arg(a) for a in spec["command"]]
    assert argv[:2] == ["bash", "-c"] and "saelect serve" in argv[2]
    service = Proc("saelect", argv, env, cluster.tmp / "service.log", cluster.tmp)
    cluster.procs.append(service)
    procs = [cluster.head, cluster.worker, service]
    with _logs_on_failure([service]):
        url = _wait_for(
            lambda: url_file.exists() and url_file.read_text().strip(), 180, "the URL file", procs
        )
        nodes = _node_ids_by_port()
        assert len(nodes) == 3
        service_node = nodes[_port_of(service_flags, "node-manager-port")]
        # the service node's registered IP, not the 0.0.0.0 bind
        assert url == f"http://{_node_ip(service_node)}:{cluster.mapping.api}"
        assert f"saelect serving on {url}" in service.text()
        client = SelectionClient(url, token=TOKEN, retries=30)
        assert client.healthz()["url"] == url
        actor = ray.get_actor("saelect", namespace="saelect")
        first = ray.get(actor.info.remote(), timeout=60)
        assert first["node_id"] == service_node and first["url"] == url

        # a client process: `saelect jobs create` finds the URL in the URL file
        spec_path = cluster.tmp / "spec.json"
        spec_path.write_text(json.dumps(SPEC).replace("/data", cluster.mapping.volumes["/data"]))
        jobs_env = {**cluster.env, "SAELECT_URL_FILE": str(url_file), "SAELECT_API_TOKEN": TOKEN}
        created = subprocess.run(
            [sys.executable, "-m", "saelect.service.cli", "jobs", "create", str(spec_path)],
            capture_output=True,
            text=True,
            timeout=120,
            env=jobs_env,
            cwd=ROOT,
        )
        assert created.returncode == 0, created.stderr
        job = json.loads(created.stdout)["id"]
        status = client.wait_ready(job, timeout=300, poll=0.5)
        assert status["phase"] == "ready", status

        # scoring reserved its workers on both raylets that have CPUs (the service's node has none),
        # encoded on both (shard tasks go round-robin over the bundles), and gave them back
        cpu_nodes = {node for node in nodes.values() if node != service_node}
        groups = [
            g
            for g in ray.util.placement_group_table().values()
            if str(g.get("name", "")).startswith("saelect-scoring-")
        ]
        assert len(groups) == 1, groups
        assert set(groups[0]["bundles_to_node_id"].values()) == cpu_nodes
        assert groups[0]["state"] == "REMOVED"
        records = [json.loads(p.read_text()) for p in cluster.tmp.glob("store/**/pipeline.json")]
        encoded_on = {n for r in records for n in r["encoding"]["nodes"]}
        assert encoded_on == cpu_nodes, (encoded_on, nodes)

        def fetch() -> dict[str, Any]:
            out = subprocess.run(
                [sys.executable, "-c", FETCH, url, TOKEN, job],
                capture_output=True,
                text=True,
                timeout=180,
                env=cluster.env,
                cwd=ROOT,
            )
            assert out.returncode == 0, out.stderr
            return dict(json.loads(out.stdout))

        before = fetch()
        m = round(0.3 * 1438)
        assert all(v[0] == v[1] == (m + 1) // 2 for v in before.values())

        # kill the actor's process: Ray restarts it on the same node, serving on the same port
        os.kill(int(first["pid"]), signal.SIGKILL)

        def restarted() -> dict[str, Any] | None:
            try:
                info = dict(ray.get(actor.info.remote(), timeout=10))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                return None
            return info if info["pid"] != first["pid"] else None

        second = _wait_for(restarted, 180, "the restarted SelectionActor", procs)
        assert second["node_id"] == service_node and second["url"] == url
        client = SelectionClient(url, token=TOKEN, retries=60)
        assert client.healthz()["url"] == url
        client.wait_ready(job, timeout=300, poll=0.5)  # the restarted actor re-attaches the job
        assert fetch() == before  # the same epochs, from the store, after the restart

    assert service.stop(first=signal.SIGTERM, timeout=60) == 0, service.text()[-3000:]
    # the token reached no file of the run (the store, the URL file, every log of Ray and of
    # the service) and no line the service printed
    leaks = [
        str(p)
        for p in cluster.tmp.rglob("*")
        if p.is_file() and not p.is_symlink() and TOKEN.encode() in p.read_bytes()
    ]
    assert leaks == [], leaks
    assert TOKEN not in service.text()
    assert "stopping" in service.text()
    assert not url_file.exists()  # a clean stop removes the URL it wrote
    cluster.procs.remove(service)


RUNTIME_ENVS = [
    "deploy/runtime-env-image.yaml",
    pytest.param(
        "deploy/runtime-env.yaml",
        marks=[
            pytest.mark.slow,
            pytest.mark.skipif(
                not os.environ.get("SAELECT_TEST_PIP_RUNTIME_ENV"),
                reason="pip runtime env: Ray clones this 2.3 GB venv first (3 to 4 min here); "
                "set SAELECT_TEST_PIP_RUNTIME_ENV=1 to run it",
            ),
        ],
    ),
]


@pytest.mark.parametrize("runtime_env", RUNTIME_ENVS)
def test_job_submit_recipe_serves_from_the_head(cluster: Cluster, runtime_env: str) -> None:
    """deploy/job-submit.sh as written, against the same cluster; the URL from the job's log.

    The cluster's Python has the dependencies, as the saelect image does, so the default run uses
    ``runtime-env-image.yaml``; the pip variant (for the plain rayproject/ray image) runs on
    request: in a venv, Ray's pip environment starts by cloning the whole venv.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    port = cluster.ports.take(1)[0]
    submission = f"saelect-test-{port}"
    env = {
        **cluster.env,
        "RAY_DASHBOARD": f"http://127.0.0.1:{cluster.dashboard}",
        "SAELECT_API_TOKEN": TOKEN,
        "SAELECT_PORT": str(port),
        "SAELECT_SUBMISSION_ID": submission,
        "SAELECT_RUNTIME_ENV": runtime_env,
    }
    extra = ["--store", str(cluster.tmp / "store-job"), "--url-file", str(cluster.tmp / "url2")]
    out = subprocess.run(
        ["bash", str(ROOT / "deploy" / "job-submit.sh"), *extra],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    jobs = JobSubmissionClient(f"http://127.0.0.1:{cluster.dashboard}")
    try:

        def url_in_logs() -> str | None:
            status = jobs.get_job_status(submission)
            logs = jobs.get_job_logs(submission)
            if status in (JobStatus.FAILED, JobStatus.STOPPED):
                raise AssertionError(f"job {status}:\n{logs[-4000:]}")
            m = re.search(r"saelect serving on (\S+)", logs)
            return m.group(1) if m else None

        url = _wait_for(url_in_logs, 300, "the job's service URL", [cluster.head])
        head = _node_ids_by_port()[_port_of(cluster.head.argv, "node-manager-port")]
        assert url == f"http://{_node_ip(head)}:{port}"
        client = SelectionClient(url, token=TOKEN, retries=30)
        assert client.healthz()["url"] == url
        assert client.jobs() == []
        info = ray.get(ray.get_actor("saelect", namespace="saelect").info.remote(), timeout=60)
        assert info["node_id"] == head  # the job's driver runs on the head: pinned there
    finally:
        jobs.stop_job(submission)
        _wait_for(lambda: jobs.get_job_status(submission).is_terminal(), 60, "the job to stop", [])
