"""Scratch-CNN training speed at FMA-small scale, against the machine's own matmul peak.

    python bench/bench_cnn.py            # 6,400 generated clips, one 5 s crop each, 2 threads
    python bench/bench_cnn.py --quick    # 160 clips (a smoke run; numbers are noisier)

What it measures, all in one process so the ratios compare like with like:
1. fp32 matmul peak: best of several torch.mm of 4096 x 4096 float32 matrices.
2. One training epoch of the default network (Adam, batch 16, freed memory kept for reuse as
   the trainers do) over every clip's cached
   float16 log-mel (memory-mapped .npy, as the trainer caches them): wall time, time in the
   training step (forward + backward + Adam), the data thread's working time, and the time
   the step waited for data. Achieved FLOP/s = 6 x multiply-adds x crops / step time (2 FLOP
   per multiply-add, backward ~2x forward), as a fraction of the matmul peak. Targets: >= 40 %
   of peak, epoch < 5 min, data wait ~0.
3. Block order, memory layout and allocator policy: a few steps of the textbook
   conv-BN-ReLU-pool order, of NCHW, and of glibc's default malloc policy against the default
   (conv-pool-BN-ReLU, channels-last, freed memory kept).
4. Waveform augmentation cost per 5 s crop at 44.1 kHz (ours: Signalsmith via python-stretch;
   alternatives: audiomentations' wrappers, librosa's phase vocoder, pedalboard's Rubber
   Band), SpecAugment and mixup per batch, and a short epoch with on-the-fly waveform
   augmentation vs a pre-augmented pool, extrapolated to the full epoch.
Feature caching (decode + resample + log-mel, once per clip) is timed on a few real files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SR = 44100


def matmul_peak(n: int = 4096, reps: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def generate_cache(
    root: Path, n_clips: int, clip_s: float, n_classes: int = 8
) -> tuple[list[np.ndarray], np.ndarray, float]:
    """Generated clips -> float16 log-mel .npy files (the trainer's cache format), memmapped."""
    from concurrent.futures import ThreadPoolExecutor

    from embedkit.cnn.features import FeatureConfig, logmel
    from embedkit.synth import make_clip

    feat = FeatureConfig()
    root.mkdir(parents=True, exist_ok=True)
    labels = np.arange(n_clips) % n_classes

    def one(i: int) -> None:
        p = root / f"{i:05d}.npy"
        if not p.exists():
            tmp = root / f"{i:05d}.tmp.npy"
            np.save(tmp, logmel(make_clip(int(labels[i]), 7919 * i, SR, clip_s), feat).astype(np.float16))
            os.replace(tmp, p)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # numpy / torch release the GIL
        list(pool.map(one, range(n_clips)))
    secs = time.perf_counter() - t0
    return [np.load(root / f"{i:05d}.npy", mmap_mode="r") for i in range(n_clips)], labels, secs


def run_epoch(clips, idx, aug, model_cfg, batch: int = 16, crop_s: float = 5.0, warmup: int = 2, seed: int = 0) -> dict:
    """One epoch through the trainer's own sampler, prefetch thread and training step."""
    import torch

    from embedkit.cnn.data import CropConfig, Prefetch, train_batches
    from embedkit.cnn.loop import train_epoch
    from embedkit.cnn.model import build_cnn

    torch.manual_seed(seed)
    net = build_cnn(model_cfg)
    net.train()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    crop = CropConfig(batch_size=batch, crop="random", crop_min_s=crop_s, crop_max_s=crop_s)
    if warmup:  # oneDNN builds its kernels on the first steps; not per-epoch cost
        train_epoch(net, opt, train_batches(clips, idx[: warmup * batch], crop, aug, np.random.default_rng(99)))
    batches = Prefetch(train_batches(clips, idx, crop, aug, np.random.default_rng(seed)))
    t = time.perf_counter()
    stats = train_epoch(net, opt, batches)
    wall = time.perf_counter() - t
    return {
        "wall_s": wall,
        "compute_s": stats["compute_s"],
        "median_step_s": float(np.median(stats["step_s"])),
        "data_busy_s": batches.busy_s,
        "data_wait_s": batches.wait_s,
        "crops": len(idx),
    }


def time_steps(model_cfg, steps: int, n_frames: int = 431, batch: int = 16) -> float:
    """Seconds per training step on a fixed random batch (no data pipeline)."""
    import torch

    from embedkit.cnn.loop import soft_cross_entropy
    from embedkit.cnn.model import build_cnn

    net = build_cnn(model_cfg).train()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x, t = torch.randn(batch, 128, n_frames), torch.eye(model_cfg.n_classes)[torch.arange(batch) % model_cfg.n_classes]
    best = float("inf")
    for i in range(steps + 2):
        t0 = time.perf_counter()
        loss = soft_cross_entropy(net(x), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:
            best = min(best, time.perf_counter() - t0)
    return best


def ms(fn, reps: int = 3) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1000


def augmentation_costs(reps: int) -> dict:
    """Per 5 s crop at 44.1 kHz with one torch thread (the data thread prepares one crop at a
    time beside the training step)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _augmentation_costs(reps)
    finally:
        torch.set_num_threads(threads)


def _augmentation_costs(reps: int) -> dict:
    import torch

    from embedkit.cnn import augment as A
    from embedkit.cnn.features import FeatureConfig, logmel
    from embedkit.synth import make_clip

    y = make_clip(3, 1, SR, 5.0)
    rng = np.random.default_rng(0)
    out = {
        "noise": ms(lambda: A.add_noise(y, 15.0, rng), reps),
        "gain": ms(lambda: A.apply_gain(y, 3.0), reps),
        "shift": ms(lambda: A.time_shift(y, 1000), reps),
        "stretch (signalsmith)": ms(lambda: A.stretch_and_pitch(y, SR, rate=1.1), reps),
        "pitch (signalsmith)": ms(lambda: A.stretch_and_pitch(y, SR, semitones=1.5), reps),
        "stretch+pitch (signalsmith, one pass)": ms(lambda: A.stretch_and_pitch(y, SR, 1.1, 1.5), reps),
        "log-mel of the crop": ms(lambda: logmel(y, FeatureConfig()), reps),
    }
    try:
        import audiomentations as am

        ts = am.TimeStretch(0.8, 1.2, p=1.0)
        ps = am.PitchShift(-2, 2, p=1.0)
        out["audiomentations TimeStretch (signalsmith)"] = ms(lambda: ts(y, SR), reps)
        out["audiomentations PitchShift (signalsmith)"] = ms(lambda: ps(y, SR), reps)
        out["audiomentations TimeStretch (librosa phase vocoder)"] = ms(
            lambda: am.TimeStretch(0.8, 1.2, p=1.0, method="librosa_phase_vocoder")(y, SR), reps
        )
        out["audiomentations PitchShift (librosa)"] = ms(
            lambda: am.PitchShift(-2, 2, p=1.0, method="librosa_phase_vocoder")(y, SR), reps
        )
    except ImportError:
        pass
    try:
        import pedalboard

        out["pedalboard time_stretch (Rubber Band)"] = ms(lambda: pedalboard.time_stretch(y, SR, 1.1), reps)
        out["pedalboard time_stretch+pitch (Rubber Band)"] = ms(lambda: pedalboard.time_stretch(y, SR, 1.1, 1.5), reps)
    except ImportError:
        pass
    x = torch.randn(16, 128, 431)
    cfg = A.AugmentConfig.parse("specaugment,mixup")
    out["SpecAugment (batch of 16)"] = ms(lambda: A.spec_augment(x.clone(), cfg, rng), reps)
    out["mixup (batch of 16)"] = ms(lambda: A.mixup(x, torch.eye(8)[torch.arange(16) % 8], 0.2, rng), reps)
    return out


def caching_cost(tmp: Path, n_files: int = 8) -> float:
    """Seconds per 30 s clip through the trainer's cache: decode 22.05 kHz WAV, resample to
    44.1 kHz, log-mel, float16 .npy (threads = cores)."""
    import soundfile as sf

    from embedkit.cnn.features import FeatureConfig, logmel_cache
    from embedkit.config import AudioConfig
    from embedkit.synth import make_clip

    paths = []
    for i in range(n_files):
        p = tmp / f"wav/{i}.wav"
        p.parent.mkdir(parents=True, exist_ok=True)
        sf.write(p, make_clip(i % 8, i, 22050, 30.0), 22050)
        paths.append(str(p))
    t = time.perf_counter()
    logmel_cache(tmp / "cache", FeatureConfig(), AudioConfig(), 5.0).build(paths)
    return (time.perf_counter() - t) / n_files


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="160 clips and fewer repetitions (smoke run)")
    ap.add_argument("--clips", type=int, default=None, help="clips in the epoch (default 6400; 160 with --quick)")
    ap.add_argument("--clip-s", type=float, default=5.0, help="length of each generated clip (the crop is 5 s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--aug-clips", type=int, default=None, help="clips in the online-vs-pool augmentation epochs (default clips/10)"
    )
    ap.add_argument("--work", type=Path, default=None, help="folder for the generated cache (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)

    import torch

    from embedkit.cnn.augment import AugmentConfig, augment_wave, draw_params
    from embedkit.cnn.data import Clips
    from embedkit.cnn.features import FeatureConfig, Normalizer, logmel, logmel_module
    from embedkit.cnn.model import CNNConfig, build_cnn, count_macs
    from embedkit.cnn.runs import keep_freed_memory
    from embedkit.synth import make_clip

    torch.set_num_threads(args.threads)
    kept = keep_freed_memory()  # as the trainers do (see the step variants below)
    n_clips = args.clips or (160 if args.quick else 6400)
    reps = 2 if args.quick else 5
    work = args.work or Path(tempfile.mkdtemp(prefix="embedkit-bench-cnn-"))
    res: dict = {"clips": n_clips, "threads": args.threads, "quick": args.quick, "torch": torch.__version__}

    peak = matmul_peak(reps=reps)
    res["matmul_peak_gflops"] = peak / 1e9
    print(f"fp32 matmul peak (torch.mm 4096^2, {args.threads} threads): {peak / 1e9:.1f} GFLOP/s")

    specs, labels, gen_s = generate_cache(work / f"logmel-{args.clip_s:g}s", n_clips, args.clip_s)
    print(
        f"generated {n_clips} clips of {args.clip_s:g} s and their log-mel cache in {gen_s:.1f} s (not part of the epoch)"
    )
    norm = Normalizer("standard").fit(specs[: min(200, n_clips)])
    clips = Clips(clean=specs, labels=labels, n_classes=8, hop=512, sr=SR, normalize=norm)
    cfg = CNNConfig(n_classes=8)
    macs = count_macs(build_cnn(cfg), (1, 128, 431))
    idx = np.arange(n_clips)
    ep = run_epoch(clips, idx, AugmentConfig(), cfg)
    flops = 6 * macs * n_clips
    res["epoch"] = {
        **ep,
        "macs_per_crop": macs,
        "tflop": flops / 1e12,
        "step_gflops": flops / ep["compute_s"] / 1e9,
        "fraction_of_peak": flops / ep["compute_s"] / peak,
        "fraction_of_peak_median_step": 6 * macs * 16 / ep["median_step_s"] / peak,
        "fraction_of_peak_wall": flops / ep["wall_s"] / peak,
    }
    e = res["epoch"]
    full_epoch = e["wall_s"] * 6400 / n_clips
    res["epoch_s_at_6400"] = full_epoch
    print(
        f"\nepoch over {n_clips} crops of 5 s (batch 16, default network, {macs / 1e9:.3f} G multiply-adds / crop, {e['tflop']:.1f} TFLOP):"
    )
    print(
        f"  wall {e['wall_s']:.1f} s = training step {e['compute_s']:.1f} s + waiting for data {e['data_wait_s']:.2f} s (+ loop overhead)"
    )
    print(
        f"  data thread busy {e['data_busy_s']:.1f} s ({100 * e['data_busy_s'] / e['wall_s']:.1f} % of the epoch, overlapped with the step)"
    )
    print(
        f"  training step: {e['step_gflops']:.1f} GFLOP/s = {100 * e['fraction_of_peak']:.1f} % of matmul peak (target >= 40 %); median step {100 * e['fraction_of_peak_median_step']:.1f} %; whole epoch {100 * e['fraction_of_peak_wall']:.1f} %"
    )
    print(
        f"  epoch at 6,400 clips: {full_epoch:.0f} s ({'meets' if full_epoch < 300 else 'MISSES'} the 5 min target){' (extrapolated)' if n_clips != 6400 else ''}"
    )

    steps = 3 if args.quick else 8
    base = time_steps(cfg, steps)
    variants = {
        "default (conv-pool-bn-relu, channels-last)": base,
        "textbook order (conv-bn-relu-pool)": time_steps(
            CNNConfig(n_classes=8, block_order="conv-bn-relu-pool"), steps
        ),
        "NCHW layout": time_steps(CNNConfig(n_classes=8, channels_last=False), steps),
    }
    if kept:  # glibc's default: big blocks mmapped per allocation, unmapped on free
        keep_freed_memory(False)
        variants["glibc default memory policy"] = time_steps(cfg, steps)
        keep_freed_memory()
    res["step_variants_s"] = variants
    print("\ntraining step, batch 16 x 5 s (best of {}):".format(steps))
    for k, v in variants.items():
        print(
            f"  {k:45s} {v * 1000:7.0f} ms  ({v / base:.2f}x default, {6 * macs * 16 / v / peak * 100:.0f} % of peak)"
        )

    costs = augmentation_costs(reps)
    res["augmentation_ms"] = costs
    print("\naugmentation cost (ms per 5 s crop at 44.1 kHz, one thread; SpecAugment/mixup per batch):")
    for k, v in costs.items():
        print(f"  {k:55s} {v:8.2f}")

    # Online vs pool on a subset with every waveform augmentation (p = 0.5). The data thread's
    # busy time per crop is the robust comparison (wall times swing with other load).
    n_aug = args.aug_clips or max(32, n_clips // 10)
    waves = [make_clip(int(labels[i]), 7919 * i, SR, args.clip_s) for i in range(n_aug)]
    aug_on = AugmentConfig.parse("noise,gain,stretch,pitch,shift", wave_mode="online")
    front = logmel_module(FeatureConfig())
    sub = Clips(
        clean=specs[:n_aug],
        labels=labels[:n_aug],
        n_classes=8,
        hop=512,
        sr=SR,
        normalize=norm,
        waves=waves,
        featurize=lambda y: front(y),
    )
    online = run_epoch(sub, np.arange(n_aug), aug_on, cfg, warmup=0)
    aug_pool = AugmentConfig.parse("noise,gain,stretch,pitch,shift", wave_mode="pool")
    t = time.perf_counter()
    variants_per_clip = []
    for i, w in enumerate(waves):
        vs = [
            logmel(
                augment_wave(w, SR, draw_params(aug_pool, np.random.default_rng([0, i, v]))), FeatureConfig()
            ).astype(np.float16)
            for v in range(aug_pool.pool_size)
        ]
        variants_per_clip.append(vs)
    pool_build = time.perf_counter() - t
    sub.variants, sub.waves, sub.featurize = variants_per_clip, None, None
    pooled = run_epoch(sub, np.arange(n_aug), aug_pool, cfg, warmup=0)
    clean_sub = run_epoch(
        Clips(clean=specs[:n_aug], labels=labels[:n_aug], n_classes=8, hop=512, sr=SR, normalize=norm),
        np.arange(n_aug),
        AugmentConfig(),
        cfg,
        warmup=0,
    )
    scale = 6400 / n_aug
    res["wave_augmentation"] = {
        "clips": n_aug,
        "online": online,
        "pool": pooled,
        "clean": clean_sub,
        "pool_build_s": pool_build,
        "pool_size": aug_pool.pool_size,
    }
    print(
        f"\nwaveform augmentation (noise, gain, stretch, pitch, shift at p = 0.5), epoch over {n_aug} clips, per 6,400 crops:"
    )
    print(f"  {'':32s} {'data prep (thread busy)':>24s} {'step waited':>12s} {'epoch wall':>11s}")
    for name, r in (
        ("no augmentation", clean_sub),
        ("online (augment each crop)", online),
        (f"pool of {aug_pool.pool_size} variants", pooled),
    ):
        print(
            f"  {name:32s} {r['data_busy_s'] * scale:22.0f} s {r['data_wait_s'] * scale:10.1f} s {r['wall_s'] * scale:9.0f} s"
        )
    per_variant = pool_build / n_aug / aug_pool.pool_size
    print(
        f"  pool build, once: {per_variant * 1000:.0f} ms per variant of a {args.clip_s:g} s clip = {pool_build * scale:.0f} s for 6,400 clips x {aug_pool.pool_size}"
    )
    prep_online, prep_pool = online["data_busy_s"] * scale, pooled["data_busy_s"] * scale
    step = e["compute_s"] * 6400 / n_clips
    res["wave_augmentation"].update(prep_online_s=prep_online, prep_pool_s=prep_pool, step_s=step)
    faster = "pool" if pooled["wall_s"] < online["wall_s"] else "online"
    res["wave_augmentation"]["faster_per_epoch"] = faster
    print(
        f"  faster per epoch: {faster} (epoch wall {online['wall_s'] * scale:.0f} s online vs {pooled['wall_s'] * scale:.0f} s pool). "
        f"Online spends {prep_online:.0f} s per epoch preparing data beside a {step:.0f} s training step, on the same cores; "
        f"the pool spends {prep_pool:.0f} s per epoch after its one-time build, which the saved preparation work repays "
        f"after {pool_build * scale / max(prep_online - prep_pool, 1e-9):.1f} epochs"
    )

    per_clip = caching_cost(work / "caching", 4 if args.quick else 8)
    res["caching_s_per_30s_clip"] = per_clip
    print(
        f"\nfeature caching (decode 22.05 kHz WAV + resample + log-mel + float16 .npy): {per_clip * 1000:.0f} ms per 30 s clip ({per_clip * 6400 / 60:.1f} min once for 6,400 clips)"
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=float))
    return res


if __name__ == "__main__":
    main()
