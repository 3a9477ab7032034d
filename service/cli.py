"""The `saelect` command line (README.md, Command line).

Every subcommand imports what it needs inside its handler, so `saelect --help` and the client-side
subcommands (`jobs ...`) start fast and do not load Ray.

Exit codes: 0 success; 1 the job failed (``jobs wait``, ``jobs create --wait``); 2 a usage error,
or the service answered an error or could not be reached; 3 the job was not ready in time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_OK, EXIT_JOB_FAILED, EXIT_ERROR, EXIT_TIMEOUT = 0, 1, 2, 3
"""Exit codes of every command (README, section Use it)."""

PHASE_UNITS: dict[str, str] = {
    "featurizing": "rows",
    "training_sae": "fit",
    "encoding": "rows",
    "scoring": "rows",
}
"""What a phase's ``progress {done, total}`` counts, shown on its bar."""

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


class PhaseProgress:
    """A tqdm bar per phase of a job, fed with polled statuses (``wait_ready``'s callback).

    Prints one line when the phase changes (with the reason while ``queued``), then a bar of the
    phase's ``progress {done, total}`` with its rate; bars go to ``file`` (stderr). Where ``file``
    is not a terminal (a log), each phase ends with one summary line instead of a bar.
    """

    def __init__(self, job_id: str, file: Any = None) -> None:
        from saelect.service.logs import is_terminal

        self.job_id = job_id
        self.file = file if file is not None else sys.stderr
        self.phases: list[str] = []
        """Phases seen, in order."""
        self._bar: Any = None
        self._reason: str | None = None
        self._tty = is_terminal(self.file)
        self._counted: tuple[int, int] | None = None
        """(done, total) of the current counted phase; None in the others."""
        self._since = 0.0

    def __call__(self, status: dict[str, Any]) -> None:
        from tqdm import tqdm

        phase = str(status["phase"])
        progress = status.get("progress") or {}
        done, total = int(progress.get("done", 0)), int(progress.get("total", 0))
        if not self.phases or phase != self.phases[-1]:
            self.close(finished=phase != "failed")
            self.phases.append(phase)
            print(f"job {self.job_id}: {phase}", file=self.file, flush=True)
            if phase in PHASE_UNITS:
                self._counted, self._since = (0, 0), time.monotonic()
                if self._tty:
                    self._bar = tqdm(
                        total=total or None,
                        desc=phase,
                        unit=PHASE_UNITS[phase],
                        file=self.file,
                        leave=True,
                        dynamic_ncols=True,
                    )
        reason = status.get("reason")
        if phase == "queued" and reason and reason != self._reason:
            print(f"  waits: {reason}", file=self.file, flush=True)
        self._reason = reason
        if self._counted is not None:
            self._counted = (done, total)
        if self._bar is not None:
            if total and self._bar.total != total:
                self._bar.total = total
            self._bar.update(max(0, done - self._bar.n))

    def close(self, finished: bool = False) -> None:
        """End the current phase: close its bar, or (no terminal) print its one summary line.

        ``finished``: the job went on to a later phase, so this one is complete, whatever its last
        polled progress said (a phase can end between two polls).
        """
        if finished and self._counted is not None and self._counted[1]:
            self._counted = (self._counted[1], self._counted[1])
            if self._bar is not None:
                self._bar.update(max(0, self._counted[1] - self._bar.n))
        if self._bar is not None:
            self._bar.close()
        elif self._counted is not None:
            phase, (done, total) = self.phases[-1], self._counted
            seconds = time.monotonic() - self._since
            unit = PHASE_UNITS[phase]
            rate = f", {done / seconds:.0f} {unit}/s" if seconds > 0 and done else ""
            print(
                f"{phase}: {done}/{total or '?'} {unit} in {seconds:.1f} s{rate}",
                file=self.file,
                flush=True,
            )
        self._bar, self._counted = None, None


def default_url() -> str:
    """The service URL `saelect jobs` uses without ``--url``.

    ``SAELECT_URL`` when set, else the URL file `saelect serve` wrote (``SAELECT_URL_FILE`` or
    ``~/.saelect/url``), else ``http://127.0.0.1:8000``.
    """
    env = os.environ.get("SAELECT_URL", "").strip()
    if env:
        return env
    from saelect.service.settings import url_file_path

    try:
        written = Path(url_file_path()).read_text().strip()
    except OSError:
        written = ""
    return written or DEFAULT_URL


def _cmd_data(args: argparse.Namespace) -> int:
    from saelect.workers.datasets import write_image_parquet

    train, test = write_image_parquet(Path(args.out), args.name)
    print(f"wrote {train}\nwrote {test}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from saelect.service.server import serve_forever
    from saelect.service.settings import Settings

    overrides: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "insecure": args.insecure,
        "store": args.store,
        "ray_address": args.address,
        "advertise_url": args.advertise_url,
        "pin_resource": args.pin_resource,
        "url_file": args.url_file,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
    }
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    return serve_forever(settings)


def _client(args: argparse.Namespace):
    from saelect.client import SelectionClient

    return SelectionClient(
        args.url or default_url(),
        token=os.environ.get("SAELECT_API_TOKEN"),
        verify=os.environ.get("SAELECT_CA_BUNDLE") or True,  # a private CA for an HTTPS service
    )


def _read_spec(target: str) -> Any:
    """The job spec from a file, or from stdin for ``-``."""
    text = sys.stdin.read() if target == "-" else Path(target).read_text()
    return json.loads(text)


def _wait(client: Any, job_id: str, args: argparse.Namespace) -> int:
    """Follow the job with progress bars; print its final status. Returns the exit code."""
    from saelect.client import JobFailedError

    bars = PhaseProgress(job_id)
    try:
        status = client.wait_ready(job_id, timeout=args.timeout, poll=args.poll, on_progress=bars)
    except JobFailedError as exc:
        bars.close()
        print(f"error: job {job_id} failed: {exc.message}", file=sys.stderr)
        return EXIT_JOB_FAILED
    except TimeoutError as exc:
        bars.close()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    bars.close()
    print(json.dumps(status, indent=2))
    return EXIT_OK


def _epoch(client: Any, args: argparse.Namespace) -> dict[str, Any]:
    """One rank's indices of a served epoch: a summary, and the array in ``--out``."""
    import numpy as np

    if args.epoch is None:
        raise ValueError("jobs epoch needs the epoch: saelect jobs epoch JOB T")
    idx = client.indices(args.target, args.epoch, args.rank, args.world_size)
    out: dict[str, Any] = {
        "job": args.target,
        "epoch": args.epoch,
        "rank": args.rank,
        "world_size": args.world_size,
        "count": int(idx.shape[0]),
        "unique": int(np.unique(idx).shape[0]),
        "head": idx[:10].tolist(),
        "stats": client.stats(args.target, args.epoch),
    }
    if args.out:
        np.save(args.out, idx)
        out["out"] = str(Path(args.out).resolve())
    return out


def _plot(client: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The figure `saelect simulate` draws, from a live job's committed epochs' stats.

    Only committed epochs are read: asking the stats of a later epoch would compute it, ahead of
    the feedback a loss-based policy still waits for.
    """
    from saelect.service.plots import save_epoch_plot

    status = client.job(args.target)
    committed = int(status["epochs_committed"])
    if committed == 0:
        raise ValueError(f"job {args.target} has no committed epoch yet: nothing to plot")
    stats = [client.stats(args.target, t) for t in range(committed)]
    title = f"job {args.target} ({status['name']}): {committed} epochs committed"
    path = save_epoch_plot(stats, Path(args.out or f"{args.target}.png"), title)
    return {"job": args.target, "epochs": committed, "plot": str(path.resolve())}


def _cmd_jobs(args: argparse.Namespace) -> int:
    from saelect.client import SelectionError

    client = _client(args)
    try:
        if args.action == "create":
            out: object = client.create_job(_read_spec(args.target))
            if args.wait:
                return _wait(client, out["id"], args)  # type: ignore[index]
        elif args.action == "wait":
            return _wait(client, args.target, args)
        elif args.action == "epoch":
            out = _epoch(client, args)
        elif args.action == "plot":
            out = _plot(client, args)
        elif args.action == "list":
            out = client.jobs()
        elif args.action == "status":
            out = client.job(args.target)
        else:
            client.delete(args.target)
            out = {"deleted": args.target}
    except (SelectionError, OSError, ValueError) as exc:  # ValueError: a spec that is not JSON
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(out, indent=2))
    return EXIT_OK


def _cmd_simulate(args: argparse.Namespace) -> int:
    from saelect.service.simulate import run_simulation_cli

    return run_simulation_cli(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from saelect.service.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        epochs=args.epochs,
        ratio=args.ratio,
        out_dir=Path(args.out),
        train_limit=args.train_limit,
        test_limit=args.test_limit,
        workers=args.workers,
        policies=tuple(p.strip() for p in args.policies.split(",") if p.strip()),
        record_indices=args.record_indices,
    )
    run_demo(cfg)
    return 0


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
