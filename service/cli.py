"""The `saelect` command line (DESIGN section 5).

Every subcommand imports what it needs inside its handler, so `saelect --help` and the client-side
subcommands (`jobs ...`) start fast and do not load Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"


def default_url() -> str:
    """The service URL `saelect jobs` uses without ``--url``.

    ``SAELECT_URL`` when set, else the URL file `saelect serve` wrote (``SAELECT_URL_FILE`` or
    ``~/.saelect/url``), else ``http://127.0.0.1:8000``.
    """
    env = os.environ.get("SAELECT_URL", "").strip()
    if env:
        return env
    from service.settings import url_file_path

    try:
        written = Path(url_file_path()).read_text().strip()
    except OSError:
        written = ""
    return written or DEFAULT_URL


def _cmd_data(args: argparse.Namespace) -> int:
    from workers.datasets import write_image_parquet

    train, test = write_image_parquet(Path(args.out), args.name)
    print(f"wrote {train}\nwrote {test}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from service.server import serve_forever
    from service.settings import Settings

    overrides: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "insecure": args.insecure,
        "store": args.store,
        "ray_address": args.address,
        "advertise_url": args.advertise_url,
        "pin_resource": args.pin_resource,
        "url_file": args.url_file,
    }
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    return serve_forever(settings)


def _client(args: argparse.Namespace):
    from client import SelectionClient

    return SelectionClient(args.url or default_url(), token=os.environ.get("SAELECT_API_TOKEN"))


def _cmd_jobs(args: argparse.Namespace) -> int:
    from client import SelectionError

    client = _client(args)
    try:
        if args.action == "create":
            spec = json.loads(Path(args.target).read_text())
            out: object = client.create_job(spec)
        elif args.action == "list":
            out = client.jobs()
        elif args.action == "status":
            out = client.job(args.target)
        else:
            client.delete(args.target)
            out = {"deleted": args.target}
    except SelectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from service.simulate import run_simulation_cli

    return run_simulation_cli(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from service.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        epochs=args.epochs,
        ratio=args.ratio,
        out_dir=Path(args.out),
        train_limit=args.train_limit,
        workers=args.workers,
    )
    run_demo(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `saelect`, one subparser per command of DESIGN section 5."""
    parser = argparse.ArgumentParser(prog="saelect", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="write a dataset as Parquet (image, label)")
    data.add_argument("name", choices=["fashion-mnist", "digits"])
    data.add_argument("--out", required=True, help="output directory")
    data.set_defaults(func=_cmd_data)

    serve = sub.add_parser("serve", help="run the selection service (embedded Ray by default)")
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
    serve.set_defaults(func=_cmd_serve)

    jobs = sub.add_parser("jobs", help="create, list, inspect and delete jobs over HTTP")
    jobs.add_argument("action", choices=["create", "list", "status", "delete"])
    jobs.add_argument("target", nargs="?", help="SPEC.json for create, a job id for status/delete")
    jobs.add_argument(
        "--url",
        default=None,
        help="service URL (default: SAELECT_URL, else the URL file saelect serve wrote, "
        f"else {DEFAULT_URL})",
    )
    jobs.set_defaults(func=_cmd_jobs)

    sim = sub.add_parser("simulate", help="preview a policy's epochs in-process (no training)")
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

    demo = sub.add_parser("demo", help="the whole main job on an embedded local Ray")
    demo.add_argument("--epochs", type=int, default=6)
    demo.add_argument("--ratio", type=float, default=0.5)
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--train-limit", type=int, default=None, help="use only the first N rows")
    demo.add_argument("--out", default=".saelect/demo")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `saelect` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines show up when piped
    if args.command == "jobs" and args.action != "list" and not args.target:
        parser.error(f"jobs {args.action} needs a target")
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
