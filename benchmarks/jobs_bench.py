"""Jobs on a small cluster: time from POST to ready, and what a job reserves while and after.

For 1, 3 and 5 jobs created at once (policies `factor`, `factor` in its literal form (the same
scoring), `rs2`, `ucb`, `static_random`, in that order), on a private local Ray with 2 CPUs, it
measures each job's seconds from ``POST /v1/jobs`` to ``ready`` and samples Ray's reserved
resources (total - available) every poll: their peak while any job scores, and what stays
reserved per live job once all are ready. A last run declares 2 logical GPUs and creates one
`factor` job. It uses the public API only (the service, the HTTP client), so the same script
measures an earlier design: run it with ``PYTHONPATH`` pointing at an older checkout and
``--json``, then pass that file as ``--baseline-json`` to the current run. The results go to a
generated block of docs/scaling.md and, with --json, to a file.

    .venv/bin/python benchmarks/jobs_bench.py                   # 20k rows, writes docs/
    PYTHONPATH=/tmp/old .venv/bin/python benchmarks/jobs_bench.py --no-doc --json /tmp/old.json
    .venv/bin/python benchmarks/jobs_bench.py --baseline-json /tmp/old.json
    .venv/bin/python benchmarks/jobs_bench.py --n 60000 --jobs 1 --policies rs2 --no-gpu-row
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

for _key, _value in {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}.items():
    os.environ.setdefault(_key, _value)

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from benchmarks.doc_block import replace_block  # noqa: E402

DOC = ROOT / "docs" / "scaling.md"
BEGIN = "<!-- BEGIN GENERATED: benchmarks/jobs_bench.py -->"
END = "<!-- END GENERATED: benchmarks/jobs_bench.py -->"
POLICIES: list[tuple[str, dict[str, Any]]] = [
    ("factor", {}),
    ("factor", {"sampling": "topm", "class_quotas": False, "dynamic_coverage": False}),
    ("rs2", {}),
    ("ucb", {}),
    ("static_random", {}),
]


def _spec(uri: str, name: str, params: dict[str, Any], i: int) -> dict[str, Any]:
    return {
        "name": f"bench-{i}-{name}",
        "dataset": {
            "uri": uri,
            "label_column": "label",
            "feature": {"kind": "pixels", "column": "image", "dim": 64},
        },
        "policy": {"name": name, "ratio": 0.3, "epochs": 10, "seed": 0, "params": params},
        "sae": {"units": 1024, "k": 32, "epochs": 2, "max_train_samples": 20_000},
    }


def _reserved() -> dict[str, float]:
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    return {k: round(total.get(k, 0.0) - free.get(k, 0.0), 4) for k in ("CPU", "GPU", "memory")}


def one_run(uri: str, jobs: int, gpus: int, store: Path, timeout: float) -> dict[str, Any]:
    """Create ``jobs`` jobs at once; poll until all are ready or ``timeout`` passes."""
    import ray
    from saelect.client import SelectionClient
    from saelect.service.server import start_service
    from saelect.service.settings import Settings

    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=gpus,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=512 * 1024**2,
    )
    try:
        settings = Settings(
            host="127.0.0.1", port=0, store=str(store), allowed_roots=[str(Path(uri).parent)]
        )
        service = start_service(settings, name=None)
        base = _reserved()  # the service itself
        client = SelectionClient(service.url)
        t0 = time.monotonic()
        ids = [
            client.create_job(_spec(uri, n, p, i))["id"] for i, (n, p) in enumerate(POLICIES[:jobs])
        ]
        ready: dict[str, float] = {}
        phases: dict[str, list[str]] = {j: [] for j in ids}
        peak = {"CPU": 0.0, "GPU": 0.0, "memory": 0.0}
        while time.monotonic() - t0 < timeout and len(ready) < len(ids):
            res = _reserved()
            peak = {k: max(peak[k], res[k] - base[k]) for k in peak}
            for s in client.jobs():
                j = s["id"]
                if j in phases and (not phases[j] or phases[j][-1] != s["phase"]):
                    phases[j].append(s["phase"])
                if s["phase"] in ("ready", "failed") and j not in ready:
                    ready[j] = time.monotonic() - t0
            time.sleep(0.25)
        time.sleep(1.0)  # let a released reservation show up as free
        held = _reserved()
        after = {k: round((held[k] - base[k]) / jobs, 4) for k in held}
        service.stop()
        return {
            "jobs": jobs,
            "gpus": gpus,
            "policies": [POLICIES[i][0] for i in range(jobs)],
            "ready_s": [round(ready[j], 2) if j in ready else None for j in ids],
            "final_phase": [phases[j][-1] if phases[j] else None for j in ids],
            "phases": [phases[j] for j in ids],
            "peak_reserved": {k: round(v, 4) for k, v in peak.items()},
            "held_per_job": after,
        }
    finally:
        ray.shutdown()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from saelect.workers.datasets import FMNIST_DIR, load_fashion_mnist, write_image_parquet

    data = load_fashion_mnist(FMNIST_DIR, "train")
    rows = []
    with tempfile.TemporaryDirectory(prefix="saelect-jobs-bench-") as tmp:
        uri = str(
            write_image_parquet(
                Path(tmp) / "train.parquet", data.images[: args.n], data.labels[: args.n]
            )
        )
        runs = [(c, 0) for c in args.jobs] + ([] if args.no_gpu_row else [(1, 2)])
        for jobs, gpus in runs:
            row = one_run(uri, jobs, gpus, Path(tmp) / f"store-{jobs}-{gpus}", args.timeout)
            rows.append(row)
            print(json.dumps(row), flush=True)
    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=_code_root()
    ).stdout.strip()
    return {
        "n": args.n,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "timeout_s": args.timeout,
        "revision": rev,
        "rows": rows,
        "command": "python benchmarks/jobs_bench.py " + " ".join(sys.argv[1:]),
        "load_average": os.getloadavg(),
    }


def _code_root() -> str:
    import saelect.service as service

    return str(Path(service.__file__).resolve().parents[1])


def _fmt_ready(row: dict[str, Any]) -> str:
    out = []
    for pol, t, ph in zip(row["policies"], row["ready_s"], row["final_phase"], strict=True):
        out.append(f"{pol} {t:.1f}" if t is not None and ph == "ready" else f"{pol} never ({ph})")
    return ", ".join(out)


def _fmt_res(res: dict[str, float]) -> str:
    return f"{res['CPU']:g} CPU, {res['GPU']:g} GPU, {res['memory'] / 2**20:,.0f} MiB"


def render(result: dict[str, Any]) -> str:
    lines = [
        BEGIN,
        "",
        f"Measured by `{result['command'].strip()}` on {result['machine']} (local Ray, 2 CPUs; "
        f"the last row declares 2 logical GPUs); Fashion-MNIST N = {result['n']:,}, pixels PCA "
        f"d = 64, SAE M = 1024, k = 32; a job not ready after {result['timeout_s']:g} s counts "
        "as never. Seconds from `POST /v1/jobs` to ready, per job; reserved = Ray's total minus "
        "available, less what the idle service holds.",
        "",
        "| design | jobs at once | seconds to ready, per job | peak reserved while scoring "
        "| reserved per job once ready |",
        "|---|---|---|---|---|",
    ]
    sets = []
    if result.get("baseline"):
        sets.append((result["baseline"]["label"], result["baseline"]["rows"]))
    sets.append((f"tasks in a placement group ({result['revision']})", result["rows"]))
    for label, rows in sets:
        for r in rows:
            jobs = f"{r['jobs']}" + (f" ({r['gpus']} logical GPUs)" if r["gpus"] else "")
            lines.append(
                f"| {label} | {jobs} | {_fmt_ready(r)} | {_fmt_res(r['peak_reserved'])} "
                f"| {_fmt_res(r['held_per_job'])} |"
            )
    lines += ["", END]
    return "\n".join(lines)


def write_doc(block: str, path: Path = DOC) -> None:
    """Replace the generated block of docs/scaling.md (append it when the markers are absent)."""
    replace_block(path, BEGIN, END, block, heading="Jobs on a small cluster")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20_000, help="Fashion-MNIST training rows")
    p.add_argument("--jobs", type=lambda s: [int(x) for x in s.split(",")], default=[1, 3, 5])
    p.add_argument("--timeout", type=float, default=180.0, help="seconds before 'never'")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--baseline-json", type=Path, default=None)
    p.add_argument("--baseline-label", default="shard actors, before")
    p.add_argument("--no-doc", action="store_true")
    p.add_argument(
        "--policies",
        default=None,
        help="comma-separated policy names to create instead of the default five, in order "
        "(e.g. rs2 for the seconds to ready of a score-free job); implies --no-doc",
    )
    p.add_argument("--no-gpu-row", action="store_true", help="skip the 2-logical-GPU run")
    args = p.parse_args(argv)
    if args.policies:
        known: dict[str, dict[str, Any]] = {}
        for name, params in POLICIES:
            known.setdefault(name, params)  # `factor`: its defaults, not the literal form
        names = [x for x in args.policies.split(",") if x]
        unknown = [x for x in names if x not in known]
        if unknown:
            p.error(f"unknown policies {unknown}; known: {sorted(known)}")
        POLICIES[:] = [(x, known[x]) for x in names]
        args.no_doc = True
    result = run(args)
    if args.baseline_json is not None:
        base = json.loads(args.baseline_json.read_text())
        result["baseline"] = {
            "label": f"{args.baseline_label} ({base.get('revision', '?')})",
            "rows": base["rows"],
        }
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    if not args.no_doc:
        write_doc(render(result))
        print(f"wrote {DOC}")
    return result


if __name__ == "__main__":
    main()
