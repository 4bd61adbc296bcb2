"""onnxruntime vs torch per window, on the same model and the same windows, in one run.

    python bench/bench_export.py                       # musicnn-msd + lr and the scratch CNN, 2 cores
    python bench/bench_export.py --run runs/<id>       # one of your runs instead
    python bench/bench_export.py --quick               # fewer repeats

Without --run, it builds small runs on generated clips in a temporary folder (the models'
speed does not depend on what they learnt). For each model: export, then time
``Tagger.predict_segments`` (torch) and ``OnnxTagger.predict_segments`` (onnxruntime) on batches
of 1 and 16 windows of real audio (gtzan_mini when found, else generated), median of several
repeats after a warm-up, both pinned to ``--cores`` CPUs with that many threads. Prints ms per
window (wall and CPU: torch and onnxruntime alternate call by call, medians of ``--repeats``),
the ratio torch / onnxruntime (> 1: onnxruntime faster) and the parity (max |p_onnx - p_torch|);
writes bench/results/export.json.

``--int8`` (head runs, gtzan_mini needed): also onnxruntime.quantization.quantize_dynamic of the
exported graph (every MatMul / Gemm with a constant weight, the default; and the same with the
log-mel front end left in float): speed, max |p_int8 - p_fp32| per window, and decisions on all
100 clips (each clip's ``clip_windows``, track probability = mean) against the labels, plus
5-fold CV of a head fitted on the fp32 graph's embedding output and applied to each graph's
embeddings (what deploying the int8 file under a head trained on torch embeddings gives).
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


def interleaved_ms_per_window(fns: dict, x: np.ndarray, repeats: int) -> dict[str, tuple[float, float]]:
    """{name: (median wall ms, median CPU ms) per window}: the functions alternate call by call
    (A B A B ...), so load changes on a shared machine hit both alike. CPU time is the
    process's, all threads (on a loaded machine wall time also counts waiting for a core)."""
    for fn in fns.values():
        fn(x)  # warm-up (first-call allocations, oneDNN / onnxruntime kernel selection)
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn(x)
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return {k: (1e3 * statistics.median(wall[k]) / len(x), 1e3 * statistics.median(cpu[k]) / len(x)) for k in fns}


def int8_study(tagger, fp32_path: Path, work: Path, threads: int, repeats: int) -> dict:
    """quantize_dynamic of the exported graph: speed, probability deviation, decisions on
    gtzan_mini (see the module doc)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from sklearn.model_selection import StratifiedKFold

    from embedkit.deploy.onnx_runtime import OnnxTagger
    from embedkit.heads import make_head

    front = [
        n.name
        for n in onnx.load(str(fp32_path)).graph.node
        if n.op_type == "MatMul" and any(".mel." in i or "logmel" in i for i in n.input)
    ]
    paths = {"fp32": fp32_path, "int8": work / "int8.onnx", "int8 (float log-mel)": work / "int8-front-float.onnx"}
    quantize_dynamic(str(fp32_path), str(paths["int8"]), weight_type=QuantType.QInt8)
    quantize_dynamic(
        str(fp32_path), str(paths["int8 (float log-mel)"]), weight_type=QuantType.QInt8, nodes_to_exclude=front
    )
    for p in (paths["int8"], paths["int8 (float log-mel)"]):  # the quantiser adds a non-JSON entry
        m = onnx.load(str(p))
        keep = [(e.key, e.value) for e in m.metadata_props if e.key != "onnx.infer"]
        del m.metadata_props[:]
        onnx.helper.set_model_props(m, dict(keep))
        onnx.save(m, str(p))
    taggers = {k: OnnxTagger.load(p, threads=threads) for k, p in paths.items()}
    files = sorted(GTZAN.glob("*/*.flac"))
    labels = np.array([f.parent.name for f in files])
    windows = [tagger.clip_windows(f)[0].astype(np.float32) for f in files]
    runs = {k: [t.run(w) for w in windows] for k, t in taggers.items()}
    x16 = np.ascontiguousarray(np.concatenate(windows[:: max(1, len(windows) // 4)])[:16])
    out = {}
    y = labels
    folds = list(StratifiedKFold(5, shuffle=True, random_state=0).split(np.zeros(len(y)), y))
    heads = []
    for tr, _ in folds:  # heads on the fp32 graph's embeddings (torch's to ~1e-6)
        X = np.concatenate([runs["fp32"][i]["embedding"] for i in tr])
        Y = np.concatenate([[y[i]] * len(runs["fp32"][i]["embedding"]) for i in tr])
        heads.append(make_head("lr").fit(X, Y))
    speed = {
        b: interleaved_ms_per_window({k: t.predict_segments for k, t in taggers.items()}, x16[:b], repeats)
        for b in (1, 16)
    }
    for k, t in taggers.items():
        P = np.array([t.track_probabilities(r["uncalibrated"]) for r in runs[k]])
        top = np.array(t.labels)[P.argmax(1)]
        P0 = np.array([t.track_probabilities(r["uncalibrated"]) for r in runs["fp32"]])
        cv = []
        for (_tr, te), head in zip(folds, heads):
            pred = [head.classes_[head.predict_proba(runs[k][i]["embedding"]).mean(0).argmax()] for i in te]
            cv.append(float(np.mean([p == y[i] for p, i in zip(pred, te)])))
        out[k] = {
            "bytes": paths[k].stat().st_size,
            "accuracy_all_100_run_head": float(np.mean(top == labels)),
            "decisions_equal_to_fp32": int((P.argmax(1) == P0.argmax(1)).sum()),
            "max_abs_window_prob_dev_vs_fp32": float(
                max(np.abs(a["uncalibrated"] - b["uncalibrated"]).max() for a, b in zip(runs[k], runs["fp32"]))
            ),
            "cv5_accuracy_mean": float(np.mean(cv)),
            "cv5_accuracy_std": float(np.std(cv)),
            "cv5_folds": cv,
            **{f"{m}_ms_per_window_b{b}": speed[b][k][i] for b in (1, 16) for i, m in enumerate(("wall", "cpu"))},
        }
        print(
            f"  {k:>20}: accuracy on the 100 clips {out[k]['accuracy_all_100_run_head']:.2f} (run's head),"
            f" 5-fold {out[k]['cv5_accuracy_mean']:.2f} ± {out[k]['cv5_accuracy_std']:.2f}, decisions = fp32 on"
            f" {out[k]['decisions_equal_to_fp32']}/100, max |dp| {out[k]['max_abs_window_prob_dev_vs_fp32']:.3f},"
            f" CPU ms/window b1 {out[k]['cpu_ms_per_window_b1']:.1f} b16 {out[k]['cpu_ms_per_window_b16']:.1f}",
            flush=True,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", help="run directory (repeatable); default: build small runs")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=15, help="timed calls of each runtime per batch size")
    ap.add_argument("--int8", action="store_true", help="also measure int8 dynamic quantisation (head runs)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cpus = pin_cores(args.cores)
    repeats = 3 if args.quick else args.repeats

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
                m = interleaved_ms_per_window(
                    {"torch": tagger.predict_segments, "onnx": onnx_tagger.predict_segments}, x16[:batch], repeats
                )
                for i, what in enumerate(("", "cpu_")):
                    t, o = m["torch"][i], m["onnx"][i]
                    row[f"torch_{what}ms_per_window_b{batch}"] = t
                    row[f"onnx_{what}ms_per_window_b{batch}"] = o
                    row[f"ratio_torch_over_onnx_{what}b{batch}"] = t / o
            print(f"{name}: export {info['seconds']:.1f} s, {info['bytes'] / 1e6:.1f} MB, parity {parity:.2e}")
            for batch in (1, 16):
                print(
                    f"  batch {batch:>2}: torch {row[f'torch_ms_per_window_b{batch}']:7.2f} ms/window"
                    f" ({row[f'torch_cpu_ms_per_window_b{batch}']:.2f} CPU), onnxruntime"
                    f" {row[f'onnx_ms_per_window_b{batch}']:7.2f} ({row[f'onnx_cpu_ms_per_window_b{batch}']:.2f} CPU);"
                    f" torch/onnx = {row[f'ratio_torch_over_onnx_b{batch}']:.2f}x wall,"
                    f" {row[f'ratio_torch_over_onnx_cpu_b{batch}']:.2f}x CPU",
                    flush=True,
                )
            if args.int8 and tagger.kind == "head" and GTZAN.exists():
                row["int8"] = int8_study(tagger, path, work, args.cores, repeats)
            results.append(row)
    load = os.getloadavg()[0]
    print(f"load average (1 min) at the end: {load:.1f} on {os.cpu_count()} CPUs")
    out = write_results("export", {"cores": cpus, "repeats": repeats, "load_avg_1m": load, "results": results})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
