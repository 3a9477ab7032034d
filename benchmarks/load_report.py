"""The load benchmark's report: the markdown table, the py-spy summary, the page update.

Used by benchmarks/load.py; kept apart so that the runner stays short.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

IDLE = ("Condition.wait", "EpollSelector.select", "Worker.main_loop", "_worker (concurrent")
"""Leaf frames of a thread that waits (py-spy's --idle keeps them): not counted as work."""
WATCH = ("run_in_threadpool", "solve_dependencies", "H11Protocol", "rank_indices", "Thread.start")
"""Frames whose inclusive share of the work the report gives."""


def summarize_profile(
    path: Path, top: int = 12
) -> tuple[list[tuple[str, float]], dict[str, float]]:
    """The ``top`` leaf frames by share of the busy samples of a collapsed-stack file, and the
    inclusive share of each frame in ``WATCH``."""
    leaves: dict[str, int] = {}
    inclusive = dict.fromkeys(WATCH, 0)
    busy = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if not n.isdigit() or len(frames) < 2 or frames[-1].startswith(IDLE):
            continue
        busy += int(n)
        leaves[frames[-1]] = leaves.get(frames[-1], 0) + int(n)
        for w in WATCH:
            if any(f.startswith(w) for f in frames):
                inclusive[w] += int(n)
    ranked = sorted(leaves.items(), key=lambda kv: -kv[1])[:top]
    total = max(busy, 1)
    return [(f, k / total) for f, k in ranked], {w: k / total for w, k in inclusive.items()}


def report(rows: list[dict[str, Any]], cmd: str, seconds: float) -> str:
    """The markdown report of ``rows`` (``Result.row()`` of each pass, or the saved JSON)."""
    cols = [
        ("level", "level"),
        ("phase", "pass"),
        ("requests", "requests"),
        ("req_s", "req/s"),
        ("p50_ms", "p50 ms"),
        ("p99_ms", "p99 ms"),
        ("max_ms", "max ms"),
        ("errors", "errors"),
        ("healthz_p50_ms", "/healthz p50 ms"),
        ("healthz_p99_ms", "/healthz p99 ms"),
        ("epochs_computed", "epochs computed"),
        ("client_cpu_s", "client CPU s"),
        ("server_cpu_s", "server CPU s"),
        ("actor_cpu_s", "actor CPU s"),
        ("actor_ms_per_req", "actor CPU ms/request"),
        ("load_avg_1m", "load 1m"),
    ]
    lines = [
        "| " + " | ".join(h for _, h in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for row in rows:
        if "actor_ms_per_req" not in row:  # rows saved before the column existed
            row = {**row, "actor_ms_per_req": 1e3 * row["actor_cpu_s"] / max(1, row["requests"])}
        cells = []
        for key, _ in cols:
            v = row[key]
            cells.append(f"{v:.1f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    errs = [f"{r['level']}/{r['phase']}: {r.get('error_kinds')}" for r in rows if r["errors"]]
    head = (
        f"Command: `{cmd}`; {platform.node()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; total {seconds:.0f} s.\n"
    )
    return head + "\n" + "\n".join(lines) + "\n" + ("\nErrors: " + "; ".join(errs) if errs else "")


BEGIN, END = "<!-- load.py results: begin -->", "<!-- load.py results: end -->"


def write_page(path: Path, text: str) -> None:
    """Put ``text`` between the page's result markers (the prose around them stays); a page
    without them is written as the results alone."""
    block = f"{BEGIN}\n{text.rstrip()}\n{END}"
    page = path.read_text() if path.exists() else ""
    if BEGIN in page and END in page:
        head, rest = page.split(BEGIN, 1)
        page = head + block + rest.split(END, 1)[1]
    else:
        page = block + "\n"
    path.write_text(page)


if __name__ == "__main__":  # the table of a saved run: python benchmarks/load_report.py rows.json
    import json
    import sys

    print(report(json.loads(Path(sys.argv[1]).read_text()), sys.argv[2], float(sys.argv[3])))
