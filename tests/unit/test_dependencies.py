"""The dependency rules (docs/architecture.md, Dependency rules), checked in fresh interpreters."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PURE_MODULES = [
    "saelect.service.schedules",
    "saelect.service.selection.hashing",
    "saelect.service.selection.topk",
    "saelect.service.selection.threshold",
    "saelect.service.selection.shuffle",
    "saelect.service.selection.partition",
    "saelect.service.selection.engine",
    "saelect.service.policies",
    "saelect.service.policies.factor_scores",
    "saelect.workers.features",
    "saelect.workers.sae",
    "saelect.workers.sae_fit",
    "saelect.workers.sae_encode",
    "saelect.workers.sae_files",
    "saelect.workers.codes",
    "saelect.workers.factors",
    "saelect.workers.scores",
    "saelect.workers.selection_shard",
    "saelect.workers.shard_data",
    "saelect.workers.shard_threshold",
    "saelect.workers.shard_derived",
    "saelect.workers.datasets",
]


def _loaded_after_import(*modules: str) -> set[str]:
    """Top-level package names present in sys.modules after importing `modules` afresh."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {list(modules)!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted({k.split('.')[0] for k in sys.modules})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_client_loads_no_ray_service_or_workers() -> None:
    loaded = _loaded_after_import(
        "client", "saelect.client.http", "saelect.client.sampler", "saelect.client.errors"
    )
    assert not loaded & {"ray", "service", "workers"}, loaded & {"ray", "service", "workers"}


def test_client_ray_helpers_import_ray_lazily() -> None:
    loaded = _loaded_after_import("saelect.client.ray_train", "saelect.client.ray_data")
    assert "ray" not in loaded


@pytest.mark.parametrize("module", PURE_MODULES)
def test_math_modules_import_no_ray_fastapi_or_pydantic(module: str) -> None:
    loaded = _loaded_after_import(module)
    assert not loaded & {"ray", "fastapi", "pydantic"}, (module, loaded & {"ray", "fastapi"})


def _imported_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_workers_never_import_service() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in sorted((ROOT / "workers").rglob("*.py"))
        if "service" in _imported_names(p)
    ]
    assert offenders == []


def test_importing_every_workers_module_leaves_service_unloaded() -> None:
    modules = [
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in sorted((ROOT / "workers").rglob("*.py"))
    ]
    assert "service" not in _loaded_after_import(*modules)


def _requirements() -> tuple[list[str], dict[str, list[str]]]:
    """pyproject.toml's base requirements and its extras."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"]), dict(project["optional-dependencies"])


def _name(requirement: str) -> str:
    return re.split(r"[\[=<>!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_the_base_install_is_a_trainers_ranges_without_ray_or_plotting() -> None:
    """A remote trainer's ``pip install saelect`` pins nothing and brings no service stack;
    `make venv` gets the exact versions from constraints.txt, one for every requirement."""
    base, extras = _requirements()
    assert {_name(r) for r in base} == {"numpy", "httpx"}, base
    for req in base + [r for reqs in extras.values() for r in reqs]:
        assert "==" not in req and "===" not in req, f"exact pin in pyproject.toml: {req}"
    service = {_name(r) for r in extras["service"]}
    assert {"ray", "torch", "matplotlib", "fastapi"} <= service
    pins = {
        _name(line.split("==")[0])
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    wanted = {_name(r) for r in base + extras["service"] + extras["dev"] + extras["text"]}
    assert wanted <= pins, sorted(wanted - pins)
    makefile = (ROOT / "Makefile").read_text()
    assert '-c constraints.txt -e ".[service,dev,text]"' in makefile


def _top(module: str) -> str:
    """The distribution-level name of an import: ``saelect.<part>`` for saelect's own modules,
    the top-level name for everything else."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "saelect" else parts[0]


def test_client_imports_only_what_the_base_install_brings() -> None:
    """Every module of ``client`` imports, at its top level, only the standard library, numpy,
    httpx and ``saelect.client`` itself (no other part of saelect); ray (the Ray helpers) loads
    inside functions. The one exception is ``client.sampler`` (a torch ``Sampler``: the
    trainer's torch, or the ``sampler`` extra), which ``client`` loads on first use of
    ``SelectionSampler``."""
    base = set(sys.stdlib_module_names) | {"numpy", "httpx", "saelect.client", "__future__"}
    offenders = {}
    for path in sorted((ROOT / "client").glob("*.py")):
        allowed = base | ({"torch"} if path.name == "sampler.py" else set())
        tree = ast.parse(path.read_text(), filename=str(path))
        top = set()
        for node in tree.body:  # module level only; TYPE_CHECKING blocks never run
            if isinstance(node, ast.Import):
                top.update(_top(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                top.add(_top(node.module))
        if top - allowed:
            offenders[path.name] = sorted(top - allowed)
    assert offenders == {}


def test_client_and_its_feedback_load_no_ray_matplotlib_or_torch() -> None:
    loaded = _loaded_after_import(
        "client", "saelect.client.http", "saelect.client.feedback", "saelect.client.errors"
    )
    assert not loaded & {"ray", "matplotlib", "torch", "service", "workers"}, loaded
