"""The built wheel: one import name, and what a trainer's client-only install can do.

The wheel is built once for the module (``pip wheel --no-deps``, no network). A client-only
install is simulated without a network: a fresh interpreter without site-packages (``-S``) sees
the unpacked wheel plus the distributions of the base requirements (pyproject.toml's
``[project].dependencies`` and what they require, linked from this environment), and nothing
else: no Ray, torch or matplotlib.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from saelect.client import SelectionClient

from tests.unit.fakes import FakeBackend
from tests.unit.test_client import SPEC, TOKEN, ServerThread, free_socket, make_app

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("client", "service", "workers")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the files git sees (tracked or not ignored): a build in
    the working tree would reuse a stale ``build/`` folder."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    for name in listed:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*cmd, "-w", str(out), str(src)], check=True, capture_output=True)
    (path,) = out.glob("saelect-*.whl")
    return path


def test_wheel_installs_only_the_saelect_package_with_every_module(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"saelect"}
    expected = {"saelect/__init__.py"} | {
        f"saelect/{p.relative_to(ROOT).as_posix()}"
        for part in PARTS
        for p in (ROOT / part).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert expected <= set(names), sorted(expected - set(names))
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "saelect = saelect.service.cli:main" in text


def _closure(requirements: list[str]) -> set[str]:
    """Distribution names of the requirements and everything they require (markers evaluated
    for this interpreter, no extras)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = req.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        todo += [Requirement(r) for r in md.requires(name) or []]
    return seen


def _top_levels(dist_name: str) -> set[Path]:
    """The files and folders a distribution put at the top of site-packages."""
    dist = md.distribution(dist_name)
    tops = {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}
    return {Path(str(dist.locate_file(t))) for t in tops}


@pytest.fixture(scope="module")
def client_only_site(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("client-site")
    zipfile.ZipFile(wheel).extractall(site)
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    dists = _closure(base)
    assert {"numpy", "httpx"} <= dists and not dists & {"ray", "torch", "matplotlib"}
    for dist in dists:
        for top in _top_levels(dist):
            if not (site / top.name).exists():
                (site / top.name).symlink_to(top)
    return site


@pytest.fixture(scope="module")
def served_job() -> Iterator[tuple[str, str]]:
    server = ServerThread(make_app(FakeBackend(125), TOKEN), free_socket()).start()
    with SelectionClient(server.url, token=TOKEN) as client:
        job = client.create_job(SPEC)["id"]
        client.wait_ready(job, timeout=5, poll=0.01)
    yield server.url, job
    server.stop()


def test_client_only_install_fetches_an_epoch_without_ray_or_matplotlib(
    client_only_site: Path, served_job: tuple[str, str]
) -> None:
    url, job = served_job
    code = f"""
import json, sys
sys.path.insert(0, {str(client_only_site)!r})
from saelect.client import SelectionClient
with SelectionClient({url!r}, token={TOKEN!r}) as client:
    indices = client.indices({job!r}, 1, 1, 2)
missing = []
for name in ("ray", "matplotlib", "torch", "fastapi"):
    try:
        __import__(name)
    except ModuleNotFoundError:
        missing.append(name)
import saelect.client
print(json.dumps({{"indices": indices.tolist(), "missing": missing,
                  "from": saelect.client.__file__, "loaded": sorted(sys.modules)}}))
"""
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert got["from"].startswith(str(client_only_site))
    assert got["missing"] == ["ray", "matplotlib", "torch", "fastapi"]
    with SelectionClient(url, token=TOKEN) as client:
        expected = client.indices(job, 1, 1, 2)
    assert np.array_equal(np.asarray(got["indices"]), expected) and expected.size > 0
