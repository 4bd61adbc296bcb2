"""onnxruntime vs torch per window, on the same model and the same windows, in one run.

    python bench/bench_export.py                       # musicnn-msd + lr and the scratch CNN, 2 cores
    python bench/bench_export.py --run runs/<id>       # one of your runs instead
    python bench/bench_export.py --quick               # fewer repeats

Without --run, it builds small runs on generated clips in a temporary folder (the models'
speed does not depend on what they learnt). For each model: export, then time
``Tagger.predict_segments`` (torch) and ``OnnxTagger.predict_segments`` (onnxruntime) on batches
of 1 and 16 windows of real audio (gtzan_mini when found, else generated), median of several
repeats after a warm-up, both pinned to ``--cores`` CPUs with that many threads. Prints ms per
window, the ratio torch / onnxruntime (> 1: onnxruntime faster) and the parity (max |p_onnx -
p_torch|); writes bench/results/export.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (as embedkit.cli.main)
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's embedkit
from common import pin_cores, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GTZAN = Path(os.environ.get("EMBEDKIT_SHARED", ROOT.parent / "shared")) / "data" / "gtzan_mini"


def build_runs(work: Path) -> dict[str, Path]:
    from embedkit.cnn.train import TrainConfig, train_cnn
    from embedkit.config import AudioConfig
    from embedkit.datasets import load_dataset
    from embedkit.extract import extract
    from embedkit.fit import fit_head
    from embedkit.synth import make_dataset

    tracks = load_dataset(make_dataset(work / "data", n_classes=4, per_class=4, duration_s=12.0))
    extract(tracks, "musicnn-msd", cache=work / "cache", workers=2)
    head = fit_head("musicnn-msd", "lr", cache=work / "cache", runs=work / "runs", protocol="holdout").run_dir
    cnn = train_cnn(
        tracks,
        train=TrainConfig(epochs=1, batch_size=4, patience=2),
        audio_cfg=AudioConfig(clip_s=12.0),
        runs_dir=work / "runs",
        cache=work / "cnn-cache",
        threads=2,
        workers=2,
    ).run_dir
    return {"musicnn-msd + lr": head, "scratch CNN": cnn}


def windows_for(tagger, n: int) -> np.ndarray:
    files = sorted(GTZAN.glob("*/*.flac"))[:: max(1, len(list(GTZAN.glob("*/*.flac"))) // 4)] if GTZAN.exists() else []
    out = [tagger.clip_windows(f)[0] for f in files]
    x = np.concatenate(out) if out else np.zeros((0, tagger.window_samples), np.float32)
    if len(x) < n:  # generated: tones and noise
        rng = np.random.default_rng(0)
        t = np.arange(tagger.window_samples) / tagger.sample_rate
        extra = [
            0.3 * np.sin(2 * np.pi * (110 + 40 * k) * t) + 0.05 * rng.standard_normal(len(t)) for k in range(n - len(x))
        ]
        x = np.concatenate([x, np.asarray(extra, np.float32)]) if len(x) else np.asarray(extra, np.float32)
    return np.ascontiguousarray(x[:n], dtype=np.float32)


def median_ms_per_window(fn, x: np.ndarray, repeats: int) -> float:
    fn(x)  # warm-up (first-call allocations, oneDNN / onnxruntime kernel selection)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times) / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", help="run directory (repeatable); default: build small runs")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cpus = pin_cores(args.cores)
    repeats = 3 if args.quick else 7

    from embedkit.deploy.onnx_export import export_onnx
    from embedkit.deploy.onnx_runtime import OnnxTagger
    from embedkit.deploy.tagger import load_tagger

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        work = Path(tmp)
        runs = {Path(r).name: Path(r) for r in args.run} if args.run else build_runs(work)
        for name, run in runs.items():
            tagger = load_tagger(run)
            path = work / f"{tagger.kind}.onnx"
            info = export_onnx(tagger, path)
            onnx_tagger = OnnxTagger.load(path, threads=args.cores)
            x16 = windows_for(tagger, 16)
            parity = float(np.abs(onnx_tagger.predict_segments(x16) - tagger.predict_segments(x16)).max())
            row = {
                "model": name,
                "kind": tagger.kind,
                "window_s": tagger.segment.segment_s,
                "onnx_mb": info["bytes"] / 1e6,
                "export_s": info["seconds"],
                "parity_max_abs": parity,
            }
            for batch in (1, 16):
                x = x16[:batch]
                t = median_ms_per_window(tagger.predict_segments, x, repeats)
                o = median_ms_per_window(onnx_tagger.predict_segments, x, repeats)
                row[f"torch_ms_per_window_b{batch}"] = t
                row[f"onnx_ms_per_window_b{batch}"] = o
                row[f"ratio_torch_over_onnx_b{batch}"] = t / o
            results.append(row)
            print(f"{name}: export {info['seconds']:.1f} s, {info['bytes'] / 1e6:.1f} MB, parity {parity:.2e}")
            for batch in (1, 16):
                print(
                    f"  batch {batch:>2}: torch {row[f'torch_ms_per_window_b{batch}']:7.2f} ms/window, onnxruntime {row[f'onnx_ms_per_window_b{batch}']:7.2f} ms/window, torch/onnx = {row[f'ratio_torch_over_onnx_b{batch}']:.2f}x"
                )
    load = os.getloadavg()[0]
    print(f"load average (1 min) at the end: {load:.1f} on {os.cpu_count()} CPUs")
    out = write_results("export", {"cores": cpus, "repeats": repeats, "load_avg_1m": load, "results": results})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
