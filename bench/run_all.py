"""Run every benchmark, then write bench/results/summary.md (each figure beside its baseline).

    python bench/run_all.py            # full sizes: about an hour on a 2-CPU machine
    python bench/run_all.py --quick    # smoke runs of every harness (minutes)
    python bench/run_all.py --only train_throughput,serve_load

Each benchmark runs as its own subprocess, one after another (they would skew each other's
timings otherwise). A benchmark that fails does not stop the others; the exit status is 1
if any failed. The summary is written from whatever results files exist.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import summary  # noqa: E402

# Arguments per benchmark: full run, quick run.
COMMANDS = {
    "data_prepare": ([], ["--quick"]),
    "train_throughput": (["--repeats", "3"], ["--quick"]),
    "serve_load": ([], ["--quick"]),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke runs of every benchmark")
    p.add_argument("--only", help=f"comma list of {', '.join(COMMANDS)}")
    args = p.parse_args(argv)
    names = [n for n in (args.only or ",".join(COMMANDS)).split(",") if n]
    unknown = [n for n in names if n not in COMMANDS]
    if unknown:
        raise SystemExit(f"--only: unknown benchmark(s) {unknown}; allowed: {', '.join(COMMANDS)}")

    failed = []
    for name in names:
        extra = COMMANDS[name][1 if args.quick else 0]
        cmd = [sys.executable, str(BENCH_DIR / f"{name}.py"), *extra]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=BENCH_DIR.parent)
        print(f"== {name}: exit {rc} after {time.perf_counter() - t0:.0f}s", flush=True)
        if rc != 0:
            failed.append(name)
    summary.main([])
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
