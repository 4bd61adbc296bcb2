"""Small helpers shared by the benchmarks: core pinning, thread limits, peak memory, results."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def pin_cores(n: int) -> list[int]:
    """Restrict this process (and the threads/processes it starts) to its first n CPUs and set
    the thread counts of torch / BLAS to n. Returns the CPUs used."""
    cpus = sorted(os.sched_getaffinity(0))[:n] if hasattr(os, "sched_getaffinity") else list(range(n))
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass
    return cpus


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def rss_mb(field: str = "VmRSS") -> float:
    """Current (VmRSS) or peak (VmHWM) resident memory of this process in MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


class Timer:
    """``with Timer() as t: ...`` then ``t.s`` (wall seconds)."""

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0


class CpuTimer:
    """``with CpuTimer() as c: ...`` then ``c.s``: CPU seconds of this process, all threads."""

    def __enter__(self):
        self.t0 = time.process_time()
        return self

    def __exit__(self, *exc):
        self.s = time.process_time() - self.t0


def write_results(name: str, data: dict) -> Path:
    """bench/results/<name>.json with the machine context, so numbers can be compared later."""
    RESULTS.mkdir(exist_ok=True)
    data = {
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_end": load_average(), "python": platform.python_version()},
        **data,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path
