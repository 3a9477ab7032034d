"""The `saelect` command line: data, simulate, and the parser of every subcommand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.cli import DEFAULT_URL, build_parser, default_url, main
from service.server import write_url_file
from workers.datasets import load_image_parquet


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
    "argv",
    [
        ["serve", "--port", "9000", "--insecure"],
        ["serve", "--address", "auto", "--host", "0.0.0.0", "--pin-resource", "saelect_service"],
        ["serve", "--advertise-url", "https://saelect.example.com", "--url-file", "/tmp/url"],
        ["jobs", "list"],
        ["jobs", "status", "abc"],
        ["demo", "--epochs", "2", "--train-limit", "1000"],
    ],
)
def test_parser_accepts_every_documented_command(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert callable(args.func)


def test_jobs_status_without_a_target_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["jobs", "status"])
    assert exc.value.code == 2


def test_console_script_help_runs_without_loading_ray() -> None:
    code = (
        "import sys; from service.cli import build_parser; build_parser(); "
        "print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


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
