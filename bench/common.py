"""Helpers shared by the benchmarks: environment info, peak memory of a process tree,
running a measured subprocess, JSON results and a plain-text table.

Results go to bench/results/<name>.json with the environment they were measured in, so a
number is never separated from the machine, library versions and commit behind it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
SHARED_DATA = REPO.parent / "shared" / "data"

if str(REPO) not in sys.path:  # `python bench/x.py` from anywhere imports this checkout
    sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_info() -> dict[str, Any]:
    """Machine, library versions and code version, for the record."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "transformers", "peft", "ray", "mlflow", "datasets", "pyarrow",
                "tokenizers", "accelerate"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count_logical": psutil.cpu_count(logical=True),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_total_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "versions": versions,
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    try:
        from ift.tracking import code_version

        info["code_version"] = code_version()
    except Exception as e:  # noqa: BLE001 - the record is still useful without it
        info["code_version"] = f"unknown ({e})"
    return info


# ---------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------


def tree_rss(root: psutil.Process) -> int:
    """Resident bytes of a process and all its descendants (shared pages count once per
    process, as `ps` shows them)."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass  # exited between listing and reading
    return total


class PeakRSS:
    """Samples the summed RSS of a process tree in a background thread; keeps the peak.

    with PeakRSS(pid) as m: ...;  m.peak_mb
    Without a pid it watches the current process (and whatever it spawns).
    """

    def __init__(self, pid: int | None = None, interval: float = 0.1):
        self.pid = pid or os.getpid()
        self.interval = interval
        self.peak_bytes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            self.sample(root)
            self._stop.wait(self.interval)
        self.sample(root)

    def sample(self, root: psutil.Process | None = None) -> int:
        rss = tree_rss(root or psutil.Process(self.pid))
        self.peak_bytes = max(self.peak_bytes, rss)
        self.samples += 1
        return rss

    def start(self) -> PeakRSS:
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> PeakRSS:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        return self

    @property
    def peak_mb(self) -> float:
        return round(self.peak_bytes / 2**20, 1)

    def __enter__(self) -> PeakRSS:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_measured(cmd: Sequence[str], *, env: dict[str, str] | None = None,
                 cwd: str | Path | None = None, timeout: float | None = None,
                 log_path: str | Path | None = None, interval: float = 0.1) -> dict[str, Any]:
    """Run a command to completion while sampling its process tree's RSS.

    Returns {returncode, wall_s, peak_rss_mb, log_tail}. Output goes to log_path (or is
    captured) so that a failure can be reported with its last lines.
    """
    log_file = open(log_path, "w+b") if log_path else None  # noqa: SIM115
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(cmd), env=env, cwd=cwd,
                            stdout=log_file or subprocess.PIPE, stderr=subprocess.STDOUT)
    meter = PeakRSS(proc.pid, interval=interval).start()
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        rc = -9
    finally:
        meter.stop()
    wall = time.perf_counter() - t0
    if log_file is not None:
        log_file.seek(0)
        out = log_file.read()
        log_file.close()
    text = (out or b"").decode("utf-8", "replace")
    return {"returncode": rc, "wall_s": round(wall, 2), "peak_rss_mb": meter.peak_mb,
            "log_tail": text[-4000:]}


# ---------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------


def write_result(name: str, result: dict[str, Any], results_dir: str | Path | None = None) -> str:
    """Write bench/results/<name>.json (atomically) with timestamp and environment added."""
    out_dir = Path(results_dir) if results_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "env": env_info(),
        **result,
    }
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return str(path)


def format_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A fixed-width text table of the given columns (missing values shown as '-')."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in
                        enumerate(zip(row, widths))) for row in cells]
    return "\n".join(lines)
