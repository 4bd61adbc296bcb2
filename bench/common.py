"""Small helpers shared by the benchmarks: core pinning, thread limits, peak memory, results."""

from __future__ import annotations

import json
import os
import platform
import subprocess
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


def distinct_clips(root: Path, n: int, sources: list, sr: int = 16000) -> Path:
    """root/c<i % 4>/<i>.wav for i < n: n distinct contents (two 16-bit samples of the
    ``sources`` clips differ per file; copies or links of one file would be one track, done
    once). Files already there are kept."""
    import soundfile as sf

    for i in range(n):
        p = root / f"c{i % 4}" / f"{i:05d}.wav"
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            y = sources[i % len(sources)].copy()
            y[0], y[1] = (i % 256) / 32768, (i // 256) / 32768
            sf.write(p, y, sr)
    return root


def memory_runs(sizes: list[int], child_cmd, done_key: str, unit: str, explain: str) -> dict:
    """Peak-memory children (``child_cmd(n)``: a command printing the child's JSON last), one
    fresh process per size; each must report ``done_key`` == n. Prints each size and the rise
    per extra ``unit`` between the first and last size (``explain``: what that rise holds)."""
    out = {}
    for n in sizes:
        proc = subprocess.run(child_cmd(n), capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"memory child failed:\n{proc.stderr[-2000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        if r[done_key] != n:
            raise SystemExit(
                f"memory child {done_key} {r[done_key]} of {n} {unit}s: the measurement would not mean anything"
            )
        out[n] = r
        print(
            f"  {n:5d} {unit}s: peak RSS {r['peak_mb']:.0f} MiB, rise over start {r['rise_mb']:.1f} MiB, {r['seconds']:.1f} s",
            flush=True,
        )
    small, big = out[sizes[0]], out[sizes[-1]]
    ratio = big["rise_mb"] / max(small["rise_mb"], 1.0)
    per_item_kb = 1024 * (big["rise_mb"] - small["rise_mb"]) / (sizes[-1] - sizes[0])
    print(
        f"  rise at {sizes[-1]} / rise at {sizes[0]} {unit}s: {ratio:.2f} (+{big['rise_mb'] - small['rise_mb']:.1f} MiB for"
        f" {sizes[-1] - sizes[0]} more {unit}s = {per_item_kb:.2f} KiB per {unit}: {explain})",
        flush=True,
    )
    return {"runs": out, "rise_ratio": ratio, f"kib_per_extra_{unit}": per_item_kb}


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
