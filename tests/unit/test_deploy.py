"""The deployment files parse and agree with the service's rules (no Docker engine runs here).

What can be checked without an engine: the YAML is valid, every compose service builds the one
Dockerfile, the service binds off-loopback only with a token, the image pins the same torch and
Ray as pyproject.toml, and the Kubernetes manifests are well-formed RayCluster/Service objects.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[\[=<>]", d)[0]: d for d in deps}


def test_compose_services_build_the_image_and_require_a_token() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"ray-head", "ray-worker", "saelect"}
    for svc in services.values():
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
    api = services["saelect"]
    assert "--host" in api["command"] and "0.0.0.0" in api["command"]
    assert "SAELECT_API_TOKEN" in api["environment"]  # off-loopback needs a token
    assert ":?" in api["environment"]["SAELECT_API_TOKEN"]  # compose refuses to start without
    assert api["environment"]["RAY_ADDRESS"].startswith("ray-head:")
    assert "--address=ray-head:6379" in services["ray-worker"]["command"]


def test_dockerfile_pins_the_project_versions_and_runs_unprivileged() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM python:3.11" in text
    assert '"torch==2.13.0"' in text and _pins()["torch"] == "torch==2.13.0"
    assert re.search(r"^USER saelect$", text, re.M)
    assert 'CMD ["saelect", "serve"' in text
    assert "COPY pyproject.toml README.md ./" in text
    for package in ("service", "workers", "client"):
        assert f"COPY {package} ./{package}" in text


def test_kuberay_manifest_is_a_raycluster_and_a_service() -> None:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kuberay-cluster.yaml").read_text()))
    kinds = [d["kind"] for d in docs]
    assert kinds == ["RayCluster", "Service"]
    cluster = docs[0]
    ray_pin = _pins()["ray"]
    assert cluster["spec"]["rayVersion"] in ray_pin
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"] for e in head["env"]}
    assert {"SAELECT_API_TOKEN", "SAELECT_STORE", "SAELECT_ALLOWED_ROOTS"} <= env
    assert 8000 in [p["containerPort"] for p in head["ports"]]
    assert docs[1]["spec"]["ports"][0]["targetPort"] == 8000
