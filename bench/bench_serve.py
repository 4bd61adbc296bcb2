"""Bounded load test of `embedkit serve` on the loopback address; stops by itself.

    python bench/bench_serve.py                      # musicnn-msd + lr built on generated clips
    python bench/bench_serve.py --run runs/<id>      # your run (or an exported .onnx)
    python bench/bench_serve.py --requests 16        # requests per client level (default 32)

Starts `embedkit serve MODEL --host 127.0.0.1 --port <free>` in a subprocess, then for 1, 4 and
16 concurrent clients sends a fixed number of requests (each client loops over 30 s clips:
gtzan_mini files when found, else generated 30 s WAVs, uploaded as the raw body) and measures
throughput (clips/s), p50 / p99 latency, errors by status and the server's resident memory
before and after each level. The baseline, measured in the same run on the same clips: the
in-process Tagger (decode + windows + model, one clip after another), in clips/s.
Every loop is bounded (request count and a wall-clock cap per level); the server is stopped at
the end. Writes bench/results/serve.json.

Goal (issue 14, 2 cores, musicnn-msd + lr): >= 8 clips/s at 4 clients, p99 <= 1 s, no errors,
memory flat.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (as embedkit.cli.main)
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's embedkit
from common import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GTZAN = Path(os.environ.get("EMBEDKIT_SHARED", ROOT.parent / "shared")) / "data" / "gtzan_mini"
LEVEL_CAP_S = 300.0  # wall-clock cap per concurrency level


def build_run(work: Path) -> Path:
    from embedkit.datasets import load_dataset
    from embedkit.extract import extract
    from embedkit.fit import fit_head
    from embedkit.synth import make_dataset

    tracks = load_dataset(make_dataset(work / "data", n_classes=4, per_class=4, duration_s=12.0))
    extract(tracks, "musicnn-msd", cache=work / "cache", workers=2)
    return fit_head("musicnn-msd", "lr", cache=work / "cache", runs=work / "runs", protocol="holdout").run_dir


def clips(n: int = 8) -> list[tuple[str, bytes]]:
    if GTZAN.exists():
        files = sorted(GTZAN.glob("*/*.flac"))[:: max(1, 100 // n)][:n]
        return [(f.name, f.read_bytes()) for f in files]
    import soundfile as sf

    out = []
    for k in range(n):
        t = np.arange(30 * 22050) / 22050
        y = (0.3 * np.sin(2 * np.pi * (110 + 55 * k) * t) * (1 + np.sin(2 * np.pi * 0.5 * t)) / 2).astype(np.float32)
        buf = io.BytesIO()
        sf.write(buf, y, 22050, format="WAV", subtype="PCM_16")
        out.append((f"gen{k}.wav", buf.getvalue()))
    return out


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="run directory, model file or .onnx (default: build musicnn-msd + lr)")
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument(
        "--levels", default="1,4,16,4", help="client counts in order (the repeated 4 shows whether memory is flat)"
    )
    args = ap.parse_args()
    import requests

    from embedkit.deploy.tagger import load_tagger

    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        run = Path(args.run) if args.run else build_run(Path(tmp))
        data = clips()
        # baseline: the in-process Tagger on the same clips, one after another
        tagger = load_tagger(run)
        paths = []
        for name, b in data:
            p = Path(tmp) / name
            p.write_bytes(b)
            paths.append(p)
        tagger.predict_file(paths[0])  # warm-up
        t0 = time.perf_counter()
        for p in paths:
            tagger.predict_file(p)
        base_cps = len(paths) / (time.perf_counter() - t0)
        del tagger
        print(f"in-process Tagger: {base_cps:.2f} clips/s ({len(paths)} clips of ~30 s)")

        port = free_port()
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        server = subprocess.Popen(
            [sys.executable, "-m", "embedkit.cli", "serve", str(run), "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if requests.get(f"{url}/healthz", timeout=2).ok:
                        break
                except requests.ConnectionError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(
                        f"server did not start: {server.stderr.read().decode()[-2000:] if server.poll() is not None else 'timeout'}"
                    )
                time.sleep(0.2)
            ctype = "audio/flac" if data[0][0].endswith(".flac") else "audio/wav"
            requests.post(f"{url}/v1/tag", data=data[0][1], headers={"Content-Type": ctype}, timeout=60)  # warm-up
            results = []
            for n_clients in levels:
                rss_before = rss_mb(server.pid)
                lat: list[float] = []
                errors: dict[str, int] = {}
                stop_at = time.monotonic() + LEVEL_CAP_S
                counter = iter(range(args.requests))

                # This level's state bound as defaults: the clients run (and finish) within it.
                def client(cid: int, counter=counter, stop_at=stop_at, lat=lat, errors=errors):
                    s = requests.Session()
                    for i in counter:  # shared iterator: exactly args.requests requests in all
                        if time.monotonic() > stop_at:
                            return
                        name, body = data[(cid + i) % len(data)]
                        t = time.perf_counter()
                        try:
                            r = s.post(f"{url}/v1/tag", data=body, headers={"Content-Type": ctype}, timeout=120)
                            key = str(r.status_code)
                        except requests.RequestException as exc:
                            key = type(exc).__name__
                        if key == "200":
                            lat.append(time.perf_counter() - t)
                        else:
                            errors[key] = errors.get(key, 0) + 1

                t0 = time.perf_counter()
                with ThreadPoolExecutor(n_clients) as pool:
                    list(pool.map(client, range(n_clients)))
                wall = time.perf_counter() - t0
                lat.sort()
                row = {
                    "clients": n_clients,
                    "ok": len(lat),
                    "errors": errors,
                    "seconds": wall,
                    "clips_per_s": len(lat) / wall,
                    "p50_s": statistics.median(lat) if lat else None,
                    "p99_s": lat[min(len(lat) - 1, int(np.ceil(0.99 * len(lat))) - 1)] if lat else None,
                    "ratio_to_in_process": (len(lat) / wall) / base_cps,
                    "server_rss_mb_before": rss_before,
                    "server_rss_mb_after": rss_mb(server.pid),
                }
                results.append(row)
                print(
                    f"{n_clients:>2} clients: {row['clips_per_s']:.2f} clips/s ({row['ratio_to_in_process']:.2f}x in-process), p50 {row['p50_s']:.3f} s, p99 {row['p99_s']:.3f} s, "
                    f"errors {errors or 0}, server RSS {rss_before:.0f} -> {row['server_rss_mb_after']:.0f} MB"
                )
        finally:
            server.terminate()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
    load = os.getloadavg()[0]
    print(f"load average (1 min) at the end: {load:.1f} on {os.cpu_count()} CPUs")
    print(
        f"wrote {write_results('serve', {'model': str(run), 'in_process_clips_per_s': base_cps, 'requests_per_level': args.requests, 'load_avg_1m': load, 'levels': results})}"
    )


if __name__ == "__main__":
    main()
