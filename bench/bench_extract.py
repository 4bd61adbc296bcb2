"""Extraction throughput and memory, each against a baseline measured in the same run.

    python bench/bench_extract.py                      # gtzan_mini (100 clips) + 40 MP3s, 2 cores
    python bench/bench_extract.py --quick              # 16 clips + 8 MP3s, memory 100 vs 1000
    python bench/bench_extract.py --backbone melstats --skip-memory

Measured on ``--cores`` CPUs (process pinned, torch/BLAS threads set to match):
(1) pipeline vs the true bound: ``extract()`` (fingerprints, lanes of decode + resample +
    forward, Parquet writes) against the decode CPU time and forward CPU time of the same work
    (each measured on one thread, a track's segments forwarded in chunks of the batch size as
    the lanes do) shared by the cores. Target >= 0.9x. Also against the backbone alone on audio
    decoded beforehand, in batches of the batch size over all segments, every core.
(2) pipeline vs plain loop: ``librosa.load(path, sr=model rate)`` of each file, trim/pad to 30 s,
    the same windowing, one forward per clip. Target >= 1.0x (modest for compute-bound models).
(3) both again on generated 44.1 kHz stereo MP3s (FMA's format: decoding costs more).
(5) content fingerprinting (embedkit.identity): ``extract()`` with the real fingerprint (BLAKE3) of every file
    against ``extract()`` with hashing replaced by a stat-derived stand-in, same clips, same run,
    rounds alternated; plus the hashing alone and the wall time of a no-op re-run of the CLI
    (``embedkit extract DATA`` on the extracted store, a fresh process). Targets: <= 3 % cost,
    no-op re-run < 2 s on gtzan_mini with musicnn-msd. ``--only-identity`` runs just this part.
(4) peak memory of extract() over N vs 10N generated clips (distinct contents, 5 s, cheap
    ``--memory-backbone``), each in a fresh subprocess: the rise of the resident-set high-water
    mark over the resident size before the run, and the rise per extra clip (the track table and
    fingerprints a run plans with are in memory from the start: that part grows with N; the
    decoding and forwards do not).

Default backbone: musicnn-msd when it loads, else melstats. Results also go to
bench/results/bench_extract.json. Under CPU contention from other processes the ratios are noisy
(``--repeat`` keeps the best of several rounds); the load average is printed with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CpuTimer,
    Timer,
    distinct_clips,
    load_average,
    memory_runs,
    pin_cores,
    reset_peak_rss,
    rss_mb,
    write_results,
)

ROOT = Path(__file__).resolve().parents[1]
GTZAN = ROOT.parent / "shared" / "data" / "gtzan_mini"


def default_backbone() -> str:
    try:
        from embedkit.backbones import load_backbone

        load_backbone("musicnn-msd")
        return "musicnn-msd"
    except Exception:
        return "melstats"


def make_mp3s(root: Path, n: int, seconds: float = 30.0, sr: int = 44100) -> Path:
    """n generated stereo MP3s at 44.1 kHz in root/<class>/ (synth clips, two channel mixes)."""
    import soundfile as sf

    from embedkit.synth import CLASSES, make_clip

    for i in range(n):
        c = i % 4
        p = root / CLASSES[c] / f"{i:05d}.mp3"
        if p.exists():
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        y = make_clip(c, 1000 + i, sr, seconds)
        stereo = np.stack([y, 0.8 * y + 0.2 * np.roll(y, 441)], axis=1)
        sf.write(p, stereo, sr, format="MP3")
    return root


def throughput(name: str, tracks, bb, args, workdir: Path) -> dict:
    """Bare forward, pipeline and plain loop over the same clips with the same backbone object."""
    import librosa

    from embedkit import identity
    from embedkit.audio.segments import segment
    from embedkit.config import PreprocessConfig
    from embedkit.extract import decode_track, extract

    prep = PreprocessConfig()
    sr, bs = bb.spec.sample_rate, args.batch_size
    paths = list(tracks.path)
    n = len(paths)
    bb.embed(decode_track(paths[0], sr, prep)[0][:2])  # warm-up (lazy init, first-call costs)
    librosa.load(paths[0], sr=sr)  # warm-up of librosa's lazy imports, not counted

    from embedkit.jobs import torch_single_threaded

    # The true bound: decode (+ resample + windows) and forward CPU time of exactly the
    # pipeline's work, each on one thread (a track's segments in chunks of bs, as the lanes
    # forward them), shared by the cores. Fingerprinting and Parquet writes count against it.
    with torch_single_threaded():
        with Timer() as t_dec, CpuTimer() as c_dec:
            pre = [decode_track(p, sr, prep)[0] for p in paths]
        with CpuTimer() as c_fwd:
            for fr in pre:
                for i in range(0, len(fr), bs):
                    bb.embed(fr[i : i + bs])
    bound_s = (c_dec.s + c_fwd.s) / args.cores
    frames = np.concatenate(pre)
    del pre

    best = {"bare": np.inf, "pipeline": np.inf, "plain": np.inf}
    cpu = {}
    for r in range(args.repeat):
        with Timer() as t, CpuTimer() as c:
            bare = np.concatenate([bb.embed(frames[i : i + bs]) for i in range(0, len(frames), bs)])
        best["bare"], cpu["bare"] = min(best["bare"], t.s), c.s

        cache = workdir / f"{name}-cache-{r}"
        identity._cache.clear()  # every round fingerprints the files, as a fresh process does
        with Timer() as t, CpuTimer() as c:
            res = extract(tracks, bb, cache=cache, prep=prep, workers=args.workers, batch_size=bs)
        best["pipeline"], cpu["pipeline"] = min(best["pipeline"], t.s), c.s
        assert res.n_extracted == n and res.n_failed == 0, res.failures[:3]

        target = int(round(prep.audio.clip_s * sr))
        with Timer() as t, CpuTimer() as c:
            for p in paths:
                y, _ = librosa.load(p, sr=sr)  # the plain way: decode + resample per file
                y = y[:target] if len(y) >= target else np.pad(y, (0, target - len(y)))
                clip_frames, _, _ = segment(y, sr, prep.segments)
                bb.embed(clip_frames)  # one forward per clip
        best["plain"], cpu["plain"] = min(best["plain"], t.s), c.s

    # Same work: the pipeline's rows equal the bare forward up to batch-composition noise.
    _, X = res.store.read()
    err = float(np.abs(X - bare).max())
    out = {
        "clips": n,
        "segments": int(len(frames)),
        "decode_resample_s_per_clip_1thread": t_dec.s / n,
        "bare_s": best["bare"],
        "pipeline_s": best["pipeline"],
        "plain_loop_s": best["plain"],
        "bare_clips_per_s": n / best["bare"],
        "pipeline_clips_per_s": n / best["pipeline"],
        "plain_clips_per_s": n / best["plain"],
        "pipeline_vs_bare": best["bare"] / best["pipeline"],
        "pipeline_vs_plain": best["plain"] / best["pipeline"],
        "pipeline_minus_bare_max_abs_diff": err,
        "bound_decode_cpu_s": c_dec.s,
        "bound_forward_cpu_s": c_fwd.s,
        "bound_s": bound_s,
        "pipeline_vs_bound": bound_s / best["pipeline"],
        "pipeline_cpu_vs_bound_cpu": (c_dec.s + c_fwd.s) / cpu["pipeline"],
        "cpu_s": cpu,  # process CPU time (all threads) of the last round
    }
    print(
        f"  decode+resample alone : {1000 * out['decode_resample_s_per_clip_1thread']:.1f} ms/clip (1 thread)\n"
        f"  bare forward          : {out['bare_clips_per_s']:.2f} clips/s  ({best['bare']:.1f} s)\n"
        f"  pipeline (extract)    : {out['pipeline_clips_per_s']:.2f} clips/s  ({best['pipeline']:.1f} s)"
        f"  -> {out['pipeline_vs_bare']:.2f}x bare forward\n"
        f"  true bound            : {n / bound_s:.2f} clips/s  ({bound_s:.1f} s = decode {c_dec.s:.1f} + forward {c_fwd.s:.1f} CPU s, 1 thread each, / {args.cores} cores)"
        f"  -> pipeline at {out['pipeline_vs_bound']:.2f}x the bound (wall; target >= 0.9), {out['pipeline_cpu_vs_bound_cpu']:.2f}x its CPU\n"
        f"  plain librosa loop    : {out['plain_clips_per_s']:.2f} clips/s  ({best['plain']:.1f} s)"
        f"  -> pipeline is {out['pipeline_vs_plain']:.2f}x the plain loop (target >= 1.0)\n"
        f"  CPU seconds (all threads): bare {cpu['bare']:.1f}, pipeline {cpu['pipeline']:.1f}, plain {cpu['plain']:.1f}\n"
        f"  rows match the bare forward within {err:.1e}",
        flush=True,
    )
    return out


# -- content fingerprinting ----------------------------------------------------------------
def identity_cost(tracks, bb, args, workdir: Path, data: Path | None) -> dict:
    """extract() with vs without hashing the files, and the no-op CLI re-run (see (5))."""
    import time

    from embedkit import identity
    from embedkit.config import PreprocessConfig
    from embedkit.extract import extract
    from embedkit.identity import FileStat, identify_many

    prep = PreprocessConfig()
    paths = list(tracks.path)
    real_hash = identity.hash_file

    def stand_in(path, scheme=identity.SCHEME):  # distinct per file, reads no bytes, of the scheme asked for
        st = FileStat.of(path)
        return identity._PREFIX[scheme] + f"{st.inode:016x}{st.mtime_ns:016x}"[: identity.DIGITS]

    for p in paths:  # page cache warm for both variants; imports and first calls not timed
        Path(p).read_bytes()
    extract(
        tracks.iloc[:8],
        bb,
        cache=workdir / "identity-warmup",
        prep=prep,
        workers=args.workers,
        batch_size=args.batch_size,
    )
    best = {"with": np.inf, "without": np.inf}
    best_cpu = {"with": np.inf, "without": np.inf}  # CPU seconds: less sensitive to other processes' load
    walls: dict[str, list[float]] = {"with": [], "without": []}
    last_cache = None
    for r in range(max(1, args.repeat)):
        for mode in ("with", "without") if r % 2 == 0 else ("without", "with"):
            identity._cache.clear()
            identity.hash_file = real_hash if mode == "with" else stand_in
            cache = workdir / f"identity-{mode}-{r}"
            try:
                with Timer() as t, CpuTimer() as c:
                    res = extract(tracks, bb, cache=cache, prep=prep, workers=args.workers, batch_size=args.batch_size)
            finally:
                identity.hash_file = real_hash
            assert res.n_extracted == len(paths), res.failures[:3]
            best[mode] = min(best[mode], t.s)
            best_cpu[mode] = min(best_cpu[mode], c.s)
            walls[mode].append(t.s)
            if mode == "with":
                last_cache = cache
    identity._cache.clear()
    with Timer() as t_hash:
        identify_many(paths, None, args.workers)
    n_bytes = sum(os.path.getsize(p) for p in paths)
    out = {
        "clips": len(paths),
        "bytes": n_bytes,
        "extract_with_hashing_s": best["with"],
        "extract_without_hashing_s": best["without"],
        "with_over_without": best["with"] / best["without"],
        # each round's two runs are adjacent in time: their ratio cancels slow drifts in load
        "paired_ratio_median": float(np.median(np.array(walls["with"]) / np.array(walls["without"]))),
        "walls": walls,
        "cpu_with_s": best_cpu["with"],
        "cpu_without_s": best_cpu["without"],
        "cpu_with_over_without": best_cpu["with"] / best_cpu["without"],
        "hash_only_s": t_hash.s,
        "hash_only_over_without": t_hash.s / best["without"],
    }
    print(
        f"  extract with hashing    : {best['with']:.2f} s\n"
        f"  extract without hashing : {best['without']:.2f} s  -> with/without {out['with_over_without']:.3f} (target <= 1.03)\n"
        f"  paired rounds           : with/without median {out['paired_ratio_median']:.3f} over {len(walls['with'])} rounds\n"
        f"  CPU seconds, best round : with {best_cpu['with']:.1f}, without {best_cpu['without']:.1f} -> {out['cpu_with_over_without']:.3f}\n"
        f"  hashing alone           : {t_hash.s:.3f} s for {n_bytes / 1e6:.0f} MB ({args.workers} threads) = {100 * out['hash_only_over_without']:.2f} % of the extraction",
        flush=True,
    )
    if data is not None:
        cmd = [
            sys.executable,
            "-c",
            "from embedkit.cli import main; main()",
            "extract",
            str(data),
            "--backbone",
            bb.spec.name,
            "--cache",
            str(last_cache),
        ]
        walls = []
        for _ in range(3):
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            walls.append(time.perf_counter() - t0)
            if proc.returncode or f"0 tracks extracted (0 segments), {len(paths)} already done" not in proc.stderr:
                raise SystemExit(f"no-op re-run did not find the store complete:\n{proc.stderr[-2000:]}")
        out["noop_rerun_wall_s"] = walls
        print(
            f"  no-op CLI re-run        : {', '.join(f'{w:.2f}' for w in walls)} s wall (fresh process each; target < 2 s)",
            flush=True,
        )
    return out


# -- memory -----------------------------------------------------------------------------------
def memory_child(data: str, backbone: str, cores: int, workers: int) -> None:
    """Run in a fresh process: peak RSS of one extract() over ``data``; prints JSON."""
    import gc

    pin_cores(cores)
    from embedkit.backbones import load_backbone
    from embedkit.config import AudioConfig, PreprocessConfig, SegmentConfig
    from embedkit.datasets import load_dataset
    from embedkit.extract import extract

    bb = load_backbone(backbone)
    tracks = load_dataset(data)
    prep = PreprocessConfig(AudioConfig(clip_s=5.0), SegmentConfig(5.0, 5.0))
    with tempfile.TemporaryDirectory() as cache:
        extract(tracks.iloc[:8], bb, cache=cache, prep=prep)  # warm-up: imports, first calls
    gc.collect()
    base = rss_mb("VmRSS")
    reset_peak_rss()
    with tempfile.TemporaryDirectory() as cache, Timer() as t:
        res = extract(tracks, bb, cache=cache, prep=prep, workers=workers)
    peak = rss_mb("VmHWM")
    print(
        json.dumps(
            {
                "clips": len(tracks),
                "extracted": res.n_extracted,
                "base_mb": base,
                "peak_mb": peak,
                "rise_mb": peak - base,
                "seconds": t.s,
            }
        )
    )


def memory(sizes: list[int], args, workdir: Path) -> dict:
    from embedkit.synth import make_clip

    sources = [make_clip(c, c, 16000, 5.0) for c in range(4)]
    return memory_runs(
        sizes,
        lambda n: [
            sys.executable,
            __file__,
            "--memory-child",
            str(distinct_clips(workdir / f"mem-{n}", n, sources)),
            "--memory-backbone",
            args.memory_backbone,
            "--cores",
            str(args.cores),
            "--workers",
            str(args.workers),
        ],
        "extracted",
        "clip",
        "the dataset's table, fingerprints and record, held from the start; the audio work itself does not grow",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default=None, help="default: musicnn-msd if it loads, else melstats")
    ap.add_argument("--data", type=Path, default=GTZAN, help="folder dataset (default ../shared/data/gtzan_mini)")
    ap.add_argument("--clips", type=int, default=None, help="clips of --data to use (default all; --quick 16)")
    ap.add_argument(
        "--mp3", type=int, default=None, help="generated 44.1 kHz stereo MP3s (default 40; --quick 8; 0 skips)"
    )
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--workers", type=int, default=None, help="lanes (default --cores)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1, help="rounds per measurement; the best is kept")
    ap.add_argument("--memory-sizes", default=None, help="clip counts, default 200,2000 (--quick 100,1000)")
    ap.add_argument("--memory-backbone", default="tiny-test")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--only-identity", action="store_true", help="only (5): fingerprinting cost and the no-op re-run")
    ap.add_argument("--skip-identity", action="store_true", help="skip (5)")
    ap.add_argument("--quick", action="store_true", help="small sizes: checks that it works")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.workers = args.workers or args.cores
    if args.memory_child:
        return memory_child(args.memory_child, args.memory_backbone, args.cores, args.workers)
    warnings.simplefilter("ignore")

    cpus = pin_cores(args.cores)
    from embedkit.backbones import load_backbone
    from embedkit.datasets import load_dataset

    name = args.backbone or default_backbone()
    bb = load_backbone(name)
    n_clips = args.clips or (16 if args.quick else None)
    n_mp3 = args.mp3 if args.mp3 is not None else (8 if args.quick else 40)
    sizes = [int(s) for s in (args.memory_sizes or ("100,1000" if args.quick else "200,2000")).split(",")]
    print(
        f"bench_extract: backbone {name}, {args.cores} cores {cpus}, {args.workers} lanes, batch {args.batch_size}, load average {load_average():.1f}",
        flush=True,
    )
    results: dict = {
        "backbone": name,
        "cores": args.cores,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "quick": args.quick,
        "load_avg_1m_at_start": load_average(),
    }
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        work = Path(tmp)
        if args.data.exists():
            tracks = load_dataset(args.data)
            label = args.data.name
        else:
            from embedkit.synth import make_dataset

            tracks = load_dataset(make_dataset(work / "synth", n_classes=4, per_class=10))
            label = "generated 22.05 kHz WAV (../shared absent)"
        if n_clips:
            per_label = -(-n_clips // tracks.label.nunique())
            tracks = tracks.groupby("label").head(per_label).head(n_clips).reset_index(drop=True)
        print(f"{label}: {len(tracks)} clips", flush=True)
        if not args.skip_identity:
            print("content fingerprinting:", flush=True)
            results["identity"] = identity_cost(
                tracks, bb, args, work, args.data if args.data.exists() and not n_clips else None
            )
        if args.only_identity:
            n_mp3, args.skip_memory = 0, True
        else:
            results["data"] = throughput("data", tracks, bb, args, work)
        if n_mp3:
            with Timer() as t:
                mp3 = load_dataset(make_mp3s(work / "mp3", n_mp3))
            print(f"generated 44.1 kHz stereo MP3s: {n_mp3} x 30 s (encoded in {t.s:.0f} s, not timed)", flush=True)
            results["mp3"] = throughput("mp3", mp3, bb, args, work)
        if not args.skip_memory:
            print(f"peak memory ({args.memory_backbone}, 5 s clips):", flush=True)
            results["memory"] = memory(sizes, args, work)
    results["load_avg_1m_at_end"] = load_average()
    name = "bench_extract" + ("_quick" if args.quick else "") + ("_identity" if args.only_identity else "")
    print(f"load average at end {load_average():.1f}; results: {write_results(name, results)}")


if __name__ == "__main__":
    main()
