"""The dependency rules (docs/architecture.md, Dependency rules), checked in fresh interpreters."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PURE_MODULES = [
    "service.schedules",
    "service.selection.hashing",
    "service.selection.topk",
    "service.selection.threshold",
    "service.selection.shuffle",
    "service.selection.partition",
    "service.selection.engine",
    "service.policies",
    "workers.features",
    "workers.sae",
    "workers.codes",
    "workers.factors",
    "workers.scores",
    "workers.selection_shard",
    "workers.datasets",
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
    loaded = _loaded_after_import("client", "client.http", "client.sampler", "client.errors")
    assert not loaded & {"ray", "service", "workers"}, loaded & {"ray", "service", "workers"}


def test_client_ray_helpers_import_ray_lazily() -> None:
    loaded = _loaded_after_import("client.ray_train", "client.ray_data")
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
