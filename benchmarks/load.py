"""Load benchmark: many concurrent ranks against the real `saelect serve` on loopback.

Starts `saelect serve` (embedded Ray, the SelectionActor, uvicorn) on a fresh store, creates
``rs2`` jobs (no scoring: ready in seconds) and lets W ranks fetch their binary indices of every
epoch. Each rank is an ``httpx.AsyncClient`` with its own connection; the ranks are spread over
several client processes (asyncio in each) so that one client process is not the bottleneck.
Per level a fresh job: the "cold" pass fetches epochs 0..E-1 as they are computed (the first
request of an epoch computes it, the others wait on it), the "warm" pass fetches the same epochs
again (already computed: the serving path alone). A separate process polls ``/healthz`` every
50 ms throughout. Reported: requests/s, p50/p99/max latency, errors, /healthz latency, epochs
computed (``saelect_epochs_computed_total`` from /metrics, before and after), CPU seconds of the
client processes and of the server's process tree (psutil), and the load average.

Usage:
    .venv/bin/python benchmarks/load.py [--quick] [--out docs/benchmarks_load.md]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from load_clients import CLIENTS  # noqa: E402
from load_passes import Level, Result, run_pass  # noqa: E402
from load_report import report, summarize_profile, write_page  # noqa: E402
from load_server import SERVING, start_server  # noqa: E402


def write_rows(path: Path, rows: int) -> Path:
    """A Parquet file of ``rows`` rows with one int64 column ``x`` (enough for rs2)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"x": np.arange(rows, dtype=np.int64)}), path)
    return path


def create_job(url: str, data: Path, level: Level) -> str:
    """A ready rs2 job over ``data`` for ``level``."""
    from saelect.client import SelectionClient

    spec = {
        "name": f"load-{level.name}",
        "dataset": {"uri": str(data), "feature": {"kind": "pixels", "column": "x"}},
        "policy": {"name": "rs2", "ratio": level.ratio, "epochs": level.epochs, "seed": 7},
    }
    with SelectionClient(url) as c:
        job = c.create_job(spec)["id"]
        c.wait_ready(job, timeout=600, poll=0.2)
    return job


def serve_levels(
    work: Path, serving: str, levels: list[Level], data: dict[int, Path], args: Any
) -> list[Result]:
    """Start a server in mode ``serving``, run the cold and warm pass of every level, stop it.
    Level names get `` [routes]`` for the routes-only mode."""
    results: list[Result] = []
    proc, url = start_server(work, serving)
    try:
        for level in levels:
            job = create_job(url, data[level.rows], level)
            if serving != "fast":
                level = Level(**{**level.__dict__, "name": f"{level.name} [{serving}]"})
            kinds = args.clients.split(",")
            passes = [("cold", kinds[0])] + [("warm", kind) for kind in kinds]
            for phase, kind in passes:
                aim = level.ranks == 256 or (args.quick and level.rows == levels[-1].rows)
                aim = aim and serving == args.serving.split(",")[0] and kind == kinds[-1]
                spy = Path(args.profile) if args.profile and phase == "warm" and aim else None
                label = phase if len(kinds) == 1 else f"{phase} ({kind})"
                res = run_pass(url, proc.pid, job, level, label, args.procs, spy, kind)
                results.append(res)
                print(json.dumps(res.row()), flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="16 and 64 ranks, 3 epochs, 100k rows")
    p.add_argument("--procs", type=int, default=4, help="client processes")
    p.add_argument(
        "--out", default=None, help="the page to write the results into (docs/benchmarks_load.md)"
    )
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    p.add_argument(
        "--serving",
        default="fast",
        help="comma-separated serving modes, each a server of its own run after the other: "
        "fast (in-memory epochs answered before the routes, the default) and routes (every "
        "request through FastAPI)",
    )
    p.add_argument(
        "--clients",
        default="httpx,raw",
        help="comma-separated load clients of the warm passes (httpx, raw); the cold pass "
        "uses the first",
    )
    p.add_argument(
        "--profile",
        default=None,
        help="py-spy the SelectionActor during the warm pass of the 256-rank level (the last "
        "level with --quick) into this collapsed-stack file",
    )
    p.add_argument(
        "--ranks",
        default=None,
        help="comma-separated rank counts: only these levels (20 epochs over 60,000 rows each), "
        "without the 1M-sample epoch; e.g. 256 to repeat the level the target is set for",
    )
    args = p.parse_args(argv)
    for kind in args.clients.split(","):
        if kind not in CLIENTS:
            p.error(f"--clients: unknown client {kind!r} (one of {', '.join(CLIENTS)})")
    for serving in args.serving.split(","):
        if serving not in SERVING:
            p.error(f"--serving: unknown mode {serving!r} (one of {', '.join(SERVING)})")
    if args.ranks:
        levels = [Level(f"{w} ranks", w, 20, 60_000, 0.5) for w in map(int, args.ranks.split(","))]
    elif args.quick:
        levels = [Level("16 ranks", 16, 3, 60_000, 0.5), Level("64 ranks", 64, 3, 60_000, 0.5)]
        levels.append(Level("64 ranks, 100k-sample epoch", 64, 2, 100_000, 1.0))
    else:
        levels = [Level(f"{w} ranks", w, 20, 60_000, 0.5) for w in (64, 256)]
        levels.append(Level("64 ranks, 1M-sample epoch", 64, 3, 1_000_000, 1.0))
        levels.append(Level("1024 ranks", 1024, 20, 60_000, 0.5))  # last: the longest
    start = time.perf_counter()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="saelect-load-") as tmp:
        work = Path(tmp)
        data = {
            n: write_rows(work / f"rows{n}" / "data.parquet", n) for n in {x.rows for x in levels}
        }
        for serving in args.serving.split(","):
            results += serve_levels(work, serving, levels, data, args)
    cmd = "python benchmarks/load.py" + (" --quick" if args.quick else "")
    cmd += f" --procs {args.procs}" + (f" --ranks {args.ranks}" if args.ranks else "")
    cmd += f" --serving {args.serving}" if args.serving != "fast" else ""
    cmd += f" --clients {args.clients}" if args.clients != "httpx,raw" else ""
    cmd += f" --profile {Path(args.profile).name}" if args.profile else ""
    cmd += f" --out {args.out}" if args.out else ""
    text = report([r.row() for r in results], cmd, time.perf_counter() - start)
    if args.profile and Path(args.profile).exists():
        rows, inclusive = summarize_profile(Path(args.profile))
        text += "\nSelectionActor, busy samples (py-spy): inclusive "
        text += ", ".join(f"`{w}` {share:.1%}" for w, share in inclusive.items())
        text += "; top leaf frames:\n\n"
        text += "\n".join(f"- {share:.1%} `{frame}`" for frame, share in rows) + "\n"
    print(text)
    if args.out:
        write_page(Path(args.out), text)
    if args.json:
        Path(args.json).write_text(json.dumps([r.row() for r in results], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
