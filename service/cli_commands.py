"""What the `saelect` subcommands do: one handler per command, called with the parsed arguments
(the parser is `service.cli.build_parser`).

Every handler imports what it needs inside itself, so `saelect --help` and the client-side
subcommands (`jobs ...`) start fast and do not load Ray. A handler returns the exit code
(``EXIT_*``; see `service.cli`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from saelect.service.cli_progress import PhaseProgress

__all__ = ["DEFAULT_URL", "EXIT_ERROR", "EXIT_JOB_FAILED", "EXIT_OK", "EXIT_TIMEOUT", "default_url"]

DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_OK, EXIT_JOB_FAILED, EXIT_ERROR, EXIT_TIMEOUT = 0, 1, 2, 3
"""Exit codes of every command (README, section Use it)."""


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
