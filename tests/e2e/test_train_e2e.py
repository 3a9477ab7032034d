"""End to end: `saelect demo` as a user runs it, the smallest run that still goes through Ray Train.

One subprocess for the module: `saelect demo` on the first 2000 Fashion-MNIST rows, 2 epochs of
`factor`, 2 Ray Train CPU workers that pull their per-epoch subsets over HTTP from the service the
demo started (stdout is a pipe, not a terminal). Two checks share that run:

- its output is clean: no traceback, error or failure line, no warning, no colour codes, each
  epoch line exactly once;
- each worker trained on exactly its share of the epoch: with ``--record-indices`` every rank
  writes the dataset indices its DataLoader yielded; per epoch the ranks' indices are disjoint,
  equal in number and together exactly the epoch the service stored.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from saelect.service.store import JobStore
from saelect.workers import scoring_tasks

from tests.optional import requires_fashion_mnist

# without the data: a skip that names the install command (not a FileNotFoundError)
pytestmark = [pytest.mark.ray, pytest.mark.slow, requires_fashion_mnist]

ROOT = Path(__file__).resolve().parents[2]
ROWS = 2000
EPOCHS = 2
WORKERS = 2
POLICY = "factor"
BAD = re.compile(r"traceback|error|exception|failed|fatal|abort|warn", re.IGNORECASE)
"""What a clean run never prints (Ray's and Python's tracebacks, errors, warnings)."""
OVERLOAD = re.compile(r"^(\(TrainController pid=\d+\)) Failed to send resource request .*overload")
"""Ray Train's own notice that its autoscaling coordinator answered too late on an overloaded
machine ("safe to ignore", says Ray): printed with its traceback, it depends on the machine's
load, not on saelect, so it is set aside (and counted) before the checks."""


WORKER_EXIT_ABORT = re.compile(r"^\((\w+) pid=(\d+)\) \[mutex\.cc : \d+\] RAW: ")
"""The first line of Ray's core-worker shutdown race: a scoring task's worker process, idle once
its placement group is removed, aborts in abseil's mutex check while it exits ("Mutex corrupt:
both reader and writer lock held", then SIGABRT and a stack dump). Seen in about one demo run in
four on an overloaded machine, always after the worker's tasks had finished and their outputs
were stored (the demo's results and the exact-share check are unaffected). It is Ray's (a race in
core worker shutdown; see ray-project/ray pull request 58435), so that worker's lines from the
abort on are set aside (and counted) before the checks."""

SCORING_TASKS = {
    name
    for name, fn in vars(scoring_tasks).items()
    if inspect.isfunction(fn) and fn.__module__ == scoring_tasks.__name__
}
"""The scoring pipeline's Ray task names: the only workers whose exit abort is set aside."""
WORKER_PREFIX = re.compile(r"^\(\w+ pid=(\d+)\) ")


@dataclass(frozen=True)
class DemoRun:
    out_dir: Path
    returncode: int
    lines: list[str]
    """What the demo printed (stdout and stderr), less Ray's overload notices."""
    overload_notices: int
    worker_exit_aborts: int


def _drop_worker_exit_aborts(lines: list[str]) -> tuple[list[str], int]:
    """The lines without the dumps of workers that aborted while exiting (`WORKER_EXIT_ABORT`:
    every line of that worker from its first mutex line on), and how many workers did."""
    kept: list[str] = []
    aborted: set[str] = set()
    for line in lines:
        match = WORKER_EXIT_ABORT.match(line)
        if match and match.group(1) in SCORING_TASKS:  # an abort elsewhere stays in the log
            aborted.add(match.group(2))
        prefix = WORKER_PREFIX.match(line)
        if prefix and prefix.group(1) in aborted:
            continue
        kept.append(line)
    return kept, len(aborted)


def _drop_overload_notices(lines: list[str]) -> tuple[list[str], int]:
    """The lines without Ray Train's overload notices (each with its traceback, which ends at
    the exception line), and how many there were."""
    kept: list[str] = []
    notices, prefix = 0, None
    for line in lines:
        if prefix is not None:
            if line.startswith(prefix) and not line.startswith(f"{prefix} ray.exceptions."):
                continue
            if line.startswith(prefix):
                prefix = None
                continue
            prefix = None
        match = OVERLOAD.match(line)
        if match:
            notices, prefix = notices + 1, match.group(1)
            continue
        kept.append(line)
    return kept, notices


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    out_dir = tmp_path_factory.mktemp("demo")
    # the environment a user's shell has: not the Ray settings this test session uses for its own
    # in-process Ray (the demo's embedded Ray sets what it needs)
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    argv = ["demo", "--train-limit", str(ROWS), "--test-limit", "1000", "--epochs", str(EPOCHS)]
    argv += ["--policies", POLICY, "--workers", str(WORKERS), "--record-indices"]
    proc = subprocess.run(
        [sys.executable, "-m", "saelect.service.cli", *argv, "--out", str(out_dir)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=540,
    )
    (out_dir / "demo.log").write_text(proc.stdout)  # kept for a look after a failure
    lines, notices = _drop_overload_notices(proc.stdout.splitlines())
    lines, aborts = _drop_worker_exit_aborts(lines)
    return DemoRun(out_dir, proc.returncode, lines, notices, aborts)


def test_demo_output_is_clean_with_each_epoch_line_once(demo: DemoRun) -> None:
    log = "\n".join(demo.lines)
    assert demo.returncode == 0, log[-5000:]
    assert "\x1b" not in log  # no colour codes: stdout is not a terminal
    bad = [line for line in demo.lines if BAD.search(line)]
    assert not bad, "\n".join(bad[:40])
    for t in range(EPOCHS):
        epoch_line = re.compile(rf"^\(RayTrainWorker pid=\d+\) \[{POLICY}\] epoch {t}: test acc ")
        assert sum(bool(epoch_line.match(line)) for line in demo.lines) == 1, log[-5000:]
    assert sum(line.startswith("plot: ") for line in demo.lines) == 1
    assert any(re.match(rf"^{POLICY}\s+0\.\d{{4}}\s+0\.\d{{4}}\s+0\.500\s", x) for x in demo.lines)


def test_ray_train_workers_use_exactly_the_epoch_subset(demo: DemoRun) -> None:
    assert demo.returncode == 0
    results = json.loads((demo.out_dir / "demo_results.json").read_text())
    job = results[POLICY]["job_id"]
    store = JobStore(str(demo.out_dir / "store"))
    used = [
        json.loads((demo.out_dir / f"indices_{POLICY}_rank{r}.json").read_text())
        for r in range(WORKERS)
    ]
    epochs = []
    for t in range(EPOCHS):
        subset = store.read_epoch(job, t)
        assert subset is not None and subset.size == ROWS // 2  # r = 0.5
        ranks = [used[r][str(t)] for r in range(WORKERS)]
        assert len(ranks[0]) == len(ranks[1]) == subset.size // WORKERS
        assert not set(ranks[0]) & set(ranks[1])
        assert set(ranks[0]) | set(ranks[1]) == set(subset.tolist())
        epochs.append(subset)
    assert not np.array_equal(np.sort(epochs[0]), np.sort(epochs[1]))  # a new subset each epoch
