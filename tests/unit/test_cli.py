"""The `saelect` command line: data, simulate, and the parser of every subcommand."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from saelect.service.app import create_app
from saelect.service.backend import JobStatus, Progress
from saelect.service.cli import EXAMPLES, build_parser, main
from saelect.service.cli_commands import DEFAULT_URL, default_url
from saelect.service.selection.partition import rank_indices
from saelect.service.server import write_url_file
from saelect.service.settings import Settings
from saelect.workers.datasets import load_image_parquet

from tests.unit.fakes import FakeBackend
from tests.unit.test_client import ServerThread, free_socket


def test_data_digits_writes_train_and_test_parquet(tmp_path: Path) -> None:
    assert main(["data", "digits", "--out", str(tmp_path)]) == 0
    x_tr, y_tr = load_image_parquet(tmp_path / "train.parquet")
    x_te, _ = load_image_parquet(tmp_path / "test.parquet")
    assert x_tr.shape[1] == x_te.shape[1] == 64
    assert x_tr.shape[0] + x_te.shape[0] == 1797
    assert set(np.unique(y_tr)) == set(range(10))


def test_simulate_prints_every_epoch_and_writes_a_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["data", "digits", "--out", str(tmp_path)])
    plot = tmp_path / "sim.png"
    argv = ["simulate", str(tmp_path / "train.parquet"), "--epochs", "6", "--ratio", "0.3"]
    argv += ["--dim", "16", "--units", "64", "--k", "4", "--sae-epochs", "2", "--plot", str(plot)]
    # the ranking (the literal form): its penalty rotates through everything
    assert main([*argv, "--params", '{"sampling": "topm"}']) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(6))
    coverage = [float(r[3]) for r in rows]
    assert coverage == sorted(coverage) and coverage[-1] == 1.0  # 6 epochs of 30% cover all
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("argv", "handler", "values"),
    [
        (["data", "digits", "--out", "d"], "_cmd_data", {"name": "digits", "out": "d"}),
        (
            ["serve", "--port", "9000", "--insecure"],
            "_cmd_serve",
            {"port": 9000, "insecure": True, "host": None, "address": None},
        ),
        (
            ["serve", "--address", "auto", "--host", "0.0.0.0", "--pin-resource", "svc"],
            "_cmd_serve",
            {"address": "auto", "host": "0.0.0.0", "pin_resource": "svc", "port": None},
        ),
        (
            ["serve", "--advertise-url", "https://s.example.com", "--url-file", "/tmp/u"],
            "_cmd_serve",
            {"advertise_url": "https://s.example.com", "url_file": "/tmp/u"},
        ),
        (["jobs", "list"], "_cmd_jobs", {"action": "list", "target": None}),
        (["jobs", "status", "abc"], "_cmd_jobs", {"action": "status", "target": "abc"}),
        (
            ["jobs", "create", "-", "--wait", "--timeout", "5"],
            "_cmd_jobs",
            {"action": "create", "target": "-", "wait": True, "timeout": 5.0},
        ),
        (
            ["jobs", "epoch", "abc", "3", "--rank", "1", "--world-size", "4", "--out", "e.npy"],
            "_cmd_jobs",
            {"action": "epoch", "target": "abc", "epoch": 3, "rank": 1, "world_size": 4},
        ),
        (
            ["simulate", "t.parquet", "--policy", "rs2", "--ratio", "0.2", "--epochs", "3"],
            "_cmd_simulate",
            {"uri": "t.parquet", "policy": "rs2", "ratio": 0.2, "epochs": 3},
        ),
        (
            ["demo", "--epochs", "2", "--train-limit", "1000"],
            "_cmd_demo",
            {"epochs": 2, "train_limit": 1000, "ratio": 0.5, "workers": 2},
        ),
    ],
)
def test_parser_routes_every_documented_command_to_its_handler_with_its_values(
    argv: list[str], handler: str, values: dict[str, Any]
) -> None:
    args = build_parser().parse_args(argv)
    assert args.func.__name__ == handler
    assert {key: getattr(args, key) for key in values} == values


def test_jobs_status_without_a_target_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["jobs", "status"])
    assert exc.value.code == 2


def test_console_script_help_runs_without_loading_ray() -> None:
    """`saelect --help` through the installed console script, then the same entry point traced.

    The script must exist beside the interpreter (the entry point of pyproject.toml) and print the
    usage; the traced run calls that entry point (`service.cli:main`) and reports, at exit,
    whether `ray` was imported on the way.
    """
    script = Path(sys.executable).with_name("saelect")
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("usage: saelect") and "serve" in out.stdout
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('ray loaded:', 'ray' in sys.modules, file=sys.stderr))\n"
        "from importlib.metadata import entry_points\n"
        "(main,) = [e for e in entry_points(group='console_scripts') if e.name == 'saelect']\n"
        "sys.argv = ['saelect', '--help']\n"
        "sys.exit(main.load()())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("usage: saelect")
    assert "ray loaded: False" in out.stderr


def test_jobs_url_defaults_to_the_env_then_the_url_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url_file = tmp_path / "url"
    monkeypatch.setenv("SAELECT_URL_FILE", str(url_file))
    monkeypatch.delenv("SAELECT_URL", raising=False)
    assert default_url() == DEFAULT_URL  # nothing written yet
    write_url_file("http://10.0.0.7:8000", str(url_file))  # what `saelect serve` does
    assert url_file.read_text() == "http://10.0.0.7:8000\n"
    assert default_url() == "http://10.0.0.7:8000"
    monkeypatch.setenv("SAELECT_URL", "http://other:9000")
    assert default_url() == "http://other:9000"
    assert build_parser().parse_args(["jobs", "list"]).url is None  # resolved when it runs


# --- version, help, and the jobs commands against a fake service -----------------------------

JOB_SPEC = {
    "name": "cli",
    "dataset": {
        "uri": "/usr/share/datasets/x.parquet",
        "label_column": "label",
        "feature": {"kind": "pixels", "column": "image", "dim": 16},
    },
    "policy": {"name": "rs2", "ratio": 0.25, "epochs": 3, "seed": 5},
}
SCRIPT = [("pending", 0, 0), ("queued", 0, 0), ("featurizing", 0, 40), ("featurizing", 40, 40)]
SCRIPT += [("training_sae", 1, 1), ("encoding", 20, 40), ("encoding", 40, 40)]
SCRIPT += [("scoring", 40, 40)]


class ScriptedBackend(FakeBackend):
    """A fake service whose job walks through SCRIPT, one step per status poll, then ends
    ``ready`` (or ``failed`` with ``FAIL`` when the job's name says ``fail``)."""

    FAIL = "KeyError: column 'nope' not in the dataset"

    def __init__(self) -> None:
        super().__init__(400, ready=False)
        self.polls: dict[str, int] = {}

    async def get_job(self, job_id: str) -> JobStatus:
        step = self.polls[job_id] = self.polls.get(job_id, -1) + 1
        job = self.jobs[job_id]
        if step < len(SCRIPT):
            phase, done, total = SCRIPT[step]
            reason = "waits for 2 x {CPU: 1} to score" if phase == "queued" else None
            job.status = JobStatus(
                job_id, job.status.name, phase, Progress(done, total), None, reason=reason
            )
        elif job.spec.name == "fail":
            self.set_phase(job_id, "failed", self.FAIL)
        else:
            self.set_phase(job_id, "ready")
        return job.status


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[str, ScriptedBackend]]:
    backend = ScriptedBackend()
    settings = Settings(store="/tmp/unused-store", allowed_roots=["/usr/share/datasets"])
    server = ServerThread(create_app(backend, settings), free_socket()).start()
    yield server.url, backend
    server.stop()


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert re.fullmatch(r"saelect (\d+\.\d+\.\d+\S*|unknown)\n", capsys.readouterr().out)


@pytest.mark.parametrize("command", ["data", "serve", "jobs", "simulate", "demo"])
def test_every_command_help_shows_an_example(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    help_text = capsys.readouterr().out
    assert f"\n  saelect {command} " in help_text, help_text
    assert EXAMPLES[command] in help_text or command == "jobs"


def test_jobs_create_reads_stdin_and_epoch_saves_a_rank_share(
    scripted: tuple[str, ScriptedBackend],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, backend = scripted
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(JOB_SPEC)))
    assert main(["jobs", "create", "-", "--url", url]) == 0
    job = json.loads(capsys.readouterr().out)["id"]
    assert backend.jobs[job].spec.name == "cli"
    backend.set_phase(job, "ready")
    out = tmp_path / "e1.npy"
    argv = ["jobs", "epoch", job, "1", "--rank", "1", "--world-size", "2", "--out", str(out)]
    assert main([*argv, "--url", url]) == 0
    summary = json.loads(capsys.readouterr().out)
    expected = rank_indices(backend.epoch_order(backend.jobs[job].spec, 1), 1, 2)
    assert np.array_equal(np.load(out), expected)
    assert summary["count"] == expected.size and summary["head"] == expected[:10].tolist()
    assert summary["stats"]["epoch"] == 1
    assert main(["jobs", "epoch", job, "--url", url]) == 2  # no epoch given
    assert main(["jobs", "epoch", job, "3", "--url", url]) == 2  # out of range: the 404
    assert "epoch_out_of_range" in capsys.readouterr().err


def test_jobs_create_wait_shows_each_phase_once_in_order_and_exits_0(
    scripted: tuple[str, ScriptedBackend],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, _ = scripted
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(JOB_SPEC))
    assert main(["jobs", "create", str(spec), "--wait", "--poll", "0.01", "--url", url]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["phase"] == "ready"
    shown = re.findall(r"^job \S+: (\w+)$", captured.err, flags=re.M)
    assert shown == [
        "pending",
        "queued",
        "featurizing",
        "training_sae",
        "encoding",
        "scoring",
        "ready",
    ]
    assert "waits: waits for 2 x {CPU: 1} to score" in captured.err
    assert re.search(r"^encoding: 40/40 rows in [\d.]+ s", captured.err, flags=re.M)  # no tty


def test_jobs_wait_on_a_failing_job_exits_1_with_its_error(
    scripted: tuple[str, ScriptedBackend], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = scripted
    from saelect.client import SelectionClient

    job = SelectionClient(url).create_job({**JOB_SPEC, "name": "fail"})["id"]
    capsys.readouterr()
    assert main(["jobs", "wait", job, "--poll", "0.01", "--url", url]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"error: job {job} failed: {ScriptedBackend.FAIL}" in captured.err


def test_wait_ready_calls_back_with_every_status(scripted: tuple[str, ScriptedBackend]) -> None:
    from saelect.client import SelectionClient

    url, _ = scripted
    client = SelectionClient(url)
    job = client.create_job(JOB_SPEC)["id"]
    seen: list[dict[str, Any]] = []
    final = client.wait_ready(job, timeout=30, poll=0.001, on_progress=seen.append)
    assert [s["phase"] for s in seen[: len(SCRIPT)]] == [p for p, _, _ in SCRIPT]
    assert seen[-1] == final and final["phase"] == "ready"


def test_a_phase_that_ends_between_two_polls_is_summarized_as_complete() -> None:
    from saelect.service.cli_progress import PhaseProgress

    log = io.StringIO()  # not a terminal: one summary line per counted phase
    bars = PhaseProgress("j", file=log)
    bars({"phase": "featurizing", "progress": {"done": 10, "total": 40}})
    bars({"phase": "training_sae", "progress": {"done": 0, "total": 1}})  # featurizing is done
    bars({"phase": "failed", "progress": {"done": 0, "total": 0}})  # the fit is not
    assert re.search(r"^featurizing: 40/40 rows in [\d.]+ s", log.getvalue(), flags=re.M)
    assert re.search(r"^training_sae: 0/1 fit in [\d.]+ s", log.getvalue(), flags=re.M)
