"""`make bench`: run every benchmark script in turn; each prints and writes its figures to docs/.

Usage: python benchmarks/run_all.py [--only NAME ...] [--quick]

The training sweep (train_bench.py) is long: by default it runs in its --quick form here; run it
directly for the full tables (see docs/benchmarks_train.md for the commands).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

BENCHES: dict[str, list[str]] = {
    "selection": ["selection_bench.py"],
    "sae": ["sae_bench.py"],
    "serving": ["serving_bench.py"],
    "scoring": ["scoring_bench.py"],
    "jobs": ["jobs_bench.py"],
    "overhead": ["overhead_bench.py"],
    "train": ["train_bench.py", "--quick"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHES), default=None)
    args = parser.parse_args()
    failed = []
    for name, argv in BENCHES.items():
        if args.only and name not in args.only:
            continue
        print(f"=== {name}: {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(HERE / argv[0]), *argv[1:]], cwd=HERE.parent)
        print(f"=== {name}: exit {rc} in {time.perf_counter() - t0:.0f}s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
