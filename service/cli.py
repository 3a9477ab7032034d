"""The `saelect` command line (README.md, Command line).

This module parses the arguments (`build_parser`, `main`); the subcommands' handlers are in
`service.cli_commands`, the phase progress bars in `service.cli_progress`. Every subcommand
imports what it needs inside its handler, so `saelect --help` and the client-side
subcommands (`jobs ...`) start fast and do not load Ray.

Exit codes: 0 success; 1 the job failed (``jobs wait``, ``jobs create --wait``); 2 a usage error,
or the service answered an error or could not be reached; 3 the job was not ready in time.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from saelect.service.cli_commands import (
    DEFAULT_URL,
    _cmd_data,
    _cmd_demo,
    _cmd_jobs,
    _cmd_serve,
    _cmd_simulate,
)

__all__ = ["EXAMPLES", "build_parser", "main"]

EXAMPLES: dict[str, str] = {
    "data": "saelect data fashion-mnist --out data/fmnist",
    "serve": "saelect serve --port 8000",
    "jobs": "saelect jobs create spec.json --wait",
    "simulate": "saelect simulate data/fmnist/train.parquet --policy factor --ratio 0.3",
    "demo": "saelect demo --epochs 2 --train-limit 2000",
}
"""One example per command, shown in its ``--help``."""

JOBS_EXAMPLES = """examples:
  saelect jobs create spec.json --wait        create a job, follow it to ready
  cat spec.json | saelect jobs create -       the spec from stdin
  saelect jobs list
  saelect jobs status JOB
  saelect jobs wait JOB                       progress bars until ready (exit 1 on failure)
  saelect jobs epoch JOB 3 --rank 0 --world-size 2 --out e3.npy
  saelect jobs plot JOB --out job.png         coverage, usage, class shares of its epochs
  saelect jobs delete JOB"""


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("saelect")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `saelect`, one subparser per command (README.md, Command line)."""
    parser = argparse.ArgumentParser(
        prog="saelect",
        description="Dynamic data selection as a service on Ray.",
        epilog="examples:\n"
        + "\n".join(f"  {e}" for e in EXAMPLES.values())
        + "\n\nexit codes: 0 success, 1 the job failed, 2 usage or service error, 3 timed out",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"saelect {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def example(name: str) -> dict[str, Any]:
        return {
            "epilog": f"example:\n  {EXAMPLES[name]}",
            "formatter_class": argparse.RawDescriptionHelpFormatter,
        }

    data = sub.add_parser(
        "data", help="write a dataset as Parquet (image, label)", **example("data")
    )
    data.add_argument("name", choices=["fashion-mnist", "digits"])
    data.add_argument("--out", required=True, help="output directory")
    data.set_defaults(func=_cmd_data)

    serve = sub.add_parser(
        "serve", help="run the selection service (embedded Ray by default)", **example("serve")
    )
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--store", default=None, help="store root: a path or a pyarrow URI")
    serve.add_argument(
        "--address", default=None, help="Ray address (default: RAY_ADDRESS or local)"
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow a non-loopback bind without token",
    )
    serve.add_argument(
        "--advertise-url",
        default=None,
        help="URL reported to clients (default: http://<node IP>:<port> of the service's node)",
    )
    serve.add_argument(
        "--pin-resource",
        default=None,
        help="custom Ray resource of the node to run on (default: the node of this process)",
    )
    serve.add_argument(
        "--url-file",
        default=None,
        help="where to write the URL for saelect jobs (default: SAELECT_URL_FILE, ~/.saelect/url)",
    )
    serve.add_argument("--tls-cert", default=None, help="PEM certificate: serve HTTPS")
    serve.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    serve.set_defaults(func=_cmd_serve)

    jobs = sub.add_parser(
        "jobs",
        help="create, follow, inspect and delete jobs over HTTP",
        epilog=JOBS_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    jobs.add_argument(
        "action", choices=["create", "list", "status", "wait", "epoch", "plot", "delete"]
    )
    jobs.add_argument(
        "target",
        nargs="?",
        help="SPEC.json (or - for stdin) for create, a job id for status/wait/epoch/plot/delete",
    )
    jobs.add_argument("epoch", nargs="?", type=int, help="the epoch T of jobs epoch")
    jobs.add_argument("--wait", action="store_true", help="create: follow the job until ready")
    jobs.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for ready")
    jobs.add_argument("--poll", type=float, default=1.0, help="seconds between status polls")
    jobs.add_argument("--rank", type=int, default=0, help="epoch: this rank's share")
    jobs.add_argument("--world-size", type=int, default=1, help="epoch: number of ranks")
    jobs.add_argument(
        "--out",
        default=None,
        help="epoch: save the indices as .npy here; plot: the PNG (default: JOB.png)",
    )
    jobs.add_argument(
        "--url",
        default=None,
        help="service URL (default: SAELECT_URL, else the URL file saelect serve wrote, "
        f"else {DEFAULT_URL})",
    )
    jobs.set_defaults(func=_cmd_jobs)

    sim = sub.add_parser(
        "simulate",
        help="preview a policy's epochs in-process (no training)",
        **example("simulate"),
    )
    sim.add_argument("uri", help="Parquet file or directory")
    sim.add_argument("--policy", default="factor")
    sim.add_argument("--ratio", type=float, default=0.3)
    sim.add_argument("--epochs", type=int, default=20)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument(
        "--params", default=None, help="policy params as JSON, e.g. '{\"gamma\": 0.5}'"
    )
    sim.add_argument(
        "--feature", default="pixels", help="feature kind: pixels, selfsup, column, text"
    )
    sim.add_argument("--column", default="image")
    sim.add_argument("--dim", type=int, default=64)
    sim.add_argument("--label", default="label")
    sim.add_argument("--units", type=int, default=512)
    sim.add_argument("--k", type=int, default=16)
    sim.add_argument("--sae-epochs", type=int, default=5)
    sim.add_argument("--plot", default=".saelect/simulate.png")
    sim.set_defaults(func=_cmd_simulate)

    demo = sub.add_parser(
        "demo", help="the whole main job on an embedded local Ray", **example("demo")
    )
    demo.add_argument("--epochs", type=int, default=6)
    demo.add_argument("--ratio", type=float, default=0.5)
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--train-limit", type=int, default=None, help="use only the first N rows")
    demo.add_argument(
        "--test-limit", type=int, default=None, help="evaluate on only the first N test rows"
    )
    demo.add_argument("--out", default=".saelect/demo")
    demo.add_argument(
        "--policies", default="factor,full", help="runs, in order (comma-separated policy names)"
    )
    demo.add_argument(
        "--record-indices",
        action="store_true",
        help="write the indices each rank trained on per epoch (OUT/indices_POLICY_rankR.json)",
    )
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `saelect` console script."""
    from saelect.service.logs import configure_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()  # SAELECT_LOG_LEVEL, SAELECT_LOG_FORMAT; httpx at WARNING
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines show up when piped
    if args.command == "jobs" and args.action != "list" and not args.target:
        parser.error(f"jobs {args.action} needs a target")
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
