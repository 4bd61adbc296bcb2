"""Backbone speed on ``--cores`` CPUs (default 2), each number against a baseline of the same run.

    python bench/bench_backbones.py            # every registered backbone, 3 rounds, 8 clips
    python bench/bench_backbones.py --quick    # 1 round, 3 clips, (1) from 2 windows: checks it works
    python bench/bench_backbones.py --only panns-cnn14,ast

(1) seconds per 30 s clip for every registered backbone: a generated 30 s clip at the backbone's
    rate, cut into 5 s windows (the extraction default), one batched ``embed`` call; best of
    ``--repeat`` rounds after a warm-up. Weights are random where the real ones are not
    available here (PANNs: official-format checkpoints, AST: the AST-base size); speed does not
    depend on the values. AST is also timed with 10 s windows and as ``ast-5s``, and its
    per-window cost for 5 s vs 10 s of audio shows the cost of padding every input to 10.24 s.
(2) Cnn14 pipeline vs bare forward: ``extract()`` on generated 30 s WAV clips (threaded decode +
    resample to 32 kHz overlapped with batched inference + Parquet writes) against
    ``embed`` alone on the same windows decoded beforehand, batched the same way. Target >= 0.9x.
(3) the physical floor: Cnn14's operation count per 10 s (torch's FlopCounterMode; 2 FLOP per
    multiply-add: 21.1 G multiply-adds = the ~42 G figure of the PANNs paper), the achieved
    GFLOP/s, and a 2048^3 float32 matmul on the same cores as the practical peak.

``--device cuda`` (or mps, cuda:N; with ``--precision`` and ``--allow-tf32``) also times every
backbone of (1) on that device, as a ratio to the same run's CPU figure, with the largest
embedding difference from the CPU (parity). Sections (2) and (3) stay CPU measurements.

Results also go to bench/results/bench_backbones.json. Other processes' CPU load makes the
numbers noisy; the load average is printed with them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, pin_cores, write_results  # noqa: E402

CLIP_S = 30.0


def best_time(fn, repeat: int, warmup: bool = True) -> float:
    if warmup:
        fn()  # allocations, lazy init
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def clip_windows(sr: int, segment_s: float, seed: int = 0) -> np.ndarray:
    from embedkit.audio.segments import segment
    from embedkit.config import SegmentConfig
    from embedkit.synth import make_clip

    y = make_clip(seed % 8, seed, sr=sr, duration_s=CLIP_S)
    return segment(y, sr, SegmentConfig(segment_s, segment_s))[0]


def weights_for(name: str, family: str, tmp: Path) -> str | None:
    """Random weights in the official formats for the families not packaged with embedkit."""
    if family == "panns":
        from embedkit.backbones import panns

        arch = name.removeprefix("panns-")
        p = tmp / f"{arch}.pth"
        if not p.exists():
            panns.write_random_checkpoint(p, arch, seed=0)
        return str(p)
    if family == "ast":
        from embedkit.backbones import ast

        p = tmp / "ast-base"
        if not (p / "config.json").exists():
            ast.write_random_model(p, seed=0, tiny=False, classifier=True)
        return str(p)
    return None


def per_clip(args, tmp: Path) -> tuple[list[dict], dict]:
    from embedkit.backbones import list_backbones, load_backbone
    from embedkit.errors import first_line

    rows, loaded = [], {}
    names = [s.name for s in list_backbones()]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    print(f"\n(1) seconds per {CLIP_S:g} s clip, 5 s windows, {args.cores} cores")
    dev = None
    if args.device != "cpu":
        from embedkit.device import describe, resolve

        dev = resolve(args.device, args.allow_tf32)
        print(
            f"    and on {describe(dev)['device']} ({describe(dev)['name']}), {args.precision}: seconds per clip, CPU/device ratio, max |embedding diff| vs CPU"
        )
    print(
        f"{'backbone':<14}{'windows':>8}{'s/clip':>10}{'x realtime':>12}"
        + (f"{'dev s/clip':>12}{'cpu/dev':>9}{'max diff':>10}" if dev is not None else "")
        + "  note"
    )
    for spec in list_backbones():
        if spec.name not in names:
            continue
        try:
            bb = load_backbone(spec.name, checkpoint=weights_for(spec.name, spec.family, tmp))
        except Exception as exc:  # e.g. an optional weights package is missing
            print(f"{spec.name:<14}{'-':>8}{'-':>10}{'-':>12}  skipped: {first_line(exc, 70)}")
            continue
        loaded[spec.name] = bb
        modes = [(5.0, "")]
        if spec.name == "ast":
            modes.append((10.0, "10 s windows"))
        for seg, note in modes:
            frames = clip_windows(bb.spec.sample_rate, seg)
            if args.quick:  # 2 windows after a 1-window warm-up, scaled to the clip (linear cost)
                bb.embed(frames[:1])
                s = best_time(lambda bb=bb, frames=frames: bb.embed(frames[:2]), 1, warmup=False) * len(frames) / 2
                note = (note + "; " if note else "") + "quick: 2 windows scaled"
            else:
                s = best_time(lambda bb=bb, frames=frames: bb.embed(frames), args.repeat)
            row = {"backbone": spec.name, "segment_s": seg, "windows": len(frames), "s_per_clip": s, "note": note}
            dev_cols = ""
            if dev is not None and bb.torch_module() is not None:
                ref = bb.embed(frames)
                bb.to(dev, args.precision)
                sd = best_time(
                    lambda bb=bb, frames=frames: bb.embed(frames), args.repeat
                )  # embed returns host arrays: synchronised
                diff = float(np.abs(bb.embed(frames) - ref).max())
                bb.to("cpu", "fp32")
                row.update(
                    device=str(dev),
                    precision=args.precision,
                    device_s_per_clip=sd,
                    cpu_over_device=s / sd,
                    max_abs_diff_vs_cpu=diff,
                )
                dev_cols = f"{sd:>12.4f}{s / sd:>9.1f}{diff:>10.2g}"
            elif dev is not None:
                dev_cols = f"{'cpu only':>31}"
            rows.append(row)
            print(f"{spec.name:<14}{len(frames):>8}{s:>10.3f}{CLIP_S / s:>12.1f}{dev_cols}  {note}")
    if "ast" in loaded:
        bb = loaded["ast"]
        one5 = clip_windows(16000, 5.0)[:1]
        one10 = clip_windows(16000, 10.0)[:1]
        t5 = best_time(lambda: bb.embed(one5), args.repeat, warmup=not args.quick)
        t10 = best_time(lambda: bb.embed(one10), args.repeat, warmup=not args.quick)
        fe = bb.torch_module().features
        import torch

        w6 = torch.from_numpy(clip_windows(16000, 5.0))
        tfe = best_time(lambda: fe(w6), args.repeat, warmup=not args.quick)
        print(
            f"  AST padding: one 5 s window {t5:.3f} s vs one 10 s window {t10:.3f} s (ratio {t5 / t10:.2f}: both are 1024 frames)"
        )
        print(f"  AST front end (transformers' NumPy fbank) alone: {tfe:.3f} s per clip of 6 x 5 s")
        rows.append(
            {"backbone": "ast", "padding_5s_window_s": t5, "padding_10s_window_s": t10, "frontend_s_per_clip": tfe}
        )
    return rows, loaded


def pipeline(args, tmp: Path, bb) -> dict:
    from embedkit.config import PreprocessConfig
    from embedkit.datasets import load_dataset
    from embedkit.extract import decode_track, extract
    from embedkit.synth import make_dataset

    n = args.clips
    root = make_dataset(tmp / "clips", n_classes=2, per_class=(n + 1) // 2, duration_s=CLIP_S)
    tracks = load_dataset(root).iloc[:n]
    prep = PreprocessConfig()  # 30 s clips, 5 s windows: the extraction defaults
    frames = np.concatenate([decode_track(p, bb.spec.sample_rate, prep)[0] for p in tracks.path])
    bs = 32

    def bare():
        for i in range(0, len(frames), bs):
            bb.embed(frames[i : i + bs])

    runs = iter(range(10**6))

    def pipe():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            extract(tracks, bb, cache=tmp / f"cache{next(runs)}", prep=prep, batch_size=bs, workers=args.cores)

    t_bare = best_time(bare, args.repeat)
    t_pipe = best_time(pipe, args.repeat)
    print(f"\n(2) panns-cnn14 on {n} clips of {CLIP_S:g} s ({len(frames)} windows), {args.cores} cores")
    print(f"  bare forward on pre-decoded audio: {t_bare / n:.3f} s/clip")
    print(f"  extract() pipeline (decode+resample+forward+write): {t_pipe / n:.3f} s/clip")
    print(f"  pipeline throughput = {t_bare / t_pipe:.2f}x bare forward (target >= 0.9x)")
    return {"clips": n, "bare_s_per_clip": t_bare / n, "pipeline_s_per_clip": t_pipe / n, "ratio": t_bare / t_pipe}


def floor(args, bb) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    net = bb.torch_module()
    x = torch.zeros(1, 32000 * 10)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        net(x)
    flops10 = fc.get_total_flops()
    a = torch.randn(2048, 2048)
    t_mm = best_time(lambda: a @ a, max(args.repeat, 2))
    mm_gflops = 2 * 2048**3 / t_mm / 1e9
    frames = clip_windows(32000, 10.0)
    t = best_time(lambda bb=bb, frames=frames: bb.embed(frames), args.repeat)
    achieved = flops10 * len(frames) / t / 1e9
    print(f"\n(3) Cnn14 physical floor, {args.cores} cores")
    print(f"  counted: {flops10 / 2e9:.1f} G multiply-adds = {flops10 / 1e9:.1f} GFLOP per 10 s (PANNs paper: ~42 G)")
    print(f"  achieved: {achieved:.0f} GFLOP/s on 3 x 10 s windows ({t / 3:.3f} s per 10 s)")
    print(
        f"  2048^3 float32 matmul on the same cores: {mm_gflops:.0f} GFLOP/s -> floor {flops10 / mm_gflops / 1e9:.3f} s per 10 s; Cnn14 runs at {achieved / mm_gflops:.0%} of it"
    )
    return {
        "gflop_per_10s": flops10 / 1e9,
        "gmac_per_10s": flops10 / 2e9,
        "achieved_gflops": achieved,
        "matmul_gflops": mm_gflops,
        "s_per_10s": t / 3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 round, 3 clips: check that the script works")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=None, help="rounds per timing (best kept); default 3, quick 1")
    ap.add_argument("--clips", type=int, default=None, help="clips for the pipeline comparison; default 8, quick 3")
    ap.add_argument("--only", default="", help="comma-separated backbone names for (1)")
    ap.add_argument("--device", default="cpu", help="also time (1) on this device: cuda | cuda:N | mps | auto")
    ap.add_argument("--precision", default="fp32", help="the device's inference precision: fp32 | fp16 | bf16")
    ap.add_argument("--allow-tf32", action="store_true", help="CUDA: allow TF32 matmuls")
    args = ap.parse_args()
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.clips = args.clips or (3 if args.quick else 8)
    cpus = pin_cores(args.cores)
    print(f"cores {cpus}, load average {load_average():.1f} (other processes' load makes timings noisy)")
    with tempfile.TemporaryDirectory(prefix="embedkit-bench-") as d:
        tmp = Path(d)
        rows, loaded = per_clip(args, tmp)
        from embedkit.backbones import load_backbone

        cnn14 = loaded.get("panns-cnn14") or load_backbone(
            "panns-cnn14", checkpoint=weights_for("panns-cnn14", "panns", tmp)
        )
        pipe = pipeline(args, tmp, cnn14)
        fl = floor(args, cnn14)
    print(f"\nload average at end {load_average():.1f}")
    path = write_results(
        "bench_backbones",
        {
            "cores": args.cores,
            "quick": args.quick,
            "device": args.device,
            "precision": args.precision,
            "per_clip": rows,
            "cnn14_pipeline": pipe,
            "cnn14_floor": fl,
        },
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
