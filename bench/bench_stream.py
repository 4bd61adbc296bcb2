"""Benchmark `embedkit stream`: real-time factor and latency for musicnn-msd + lr, the scratch
CNN and melstats + lr, on ``--cores`` CPUs (default 2).

    python bench/bench_stream.py                  # 120 s file for the RTF, 30 s at 1x for latency
    python bench/bench_stream.py --quick          # 40 s / 12 s: checks that it works
    python bench/bench_stream.py --models melstats-lr --work /tmp/bs

Runs: tiny ones trained here on the generated dataset (embedkit.synth, 4 classes x 4 clips of
12 s; musicnn-msd and melstats embeddings + lr via fit_head; the CNN with its default
architecture, 1 epoch): accuracy is irrelevant, the cost per window is that of the real
architectures. They are kept in ``--work`` and reused.

Real-time factor: audio seconds / wall seconds of ``run_stream`` (median of ``--repeat`` runs)
over a generated 44.1 kHz stereo WAV read as fast as possible (decode, down-mix, streaming resampling, windows every
``--hop``, the model, smoothing, JSON encoding). Baseline measured in the same run: the same
windows cut from the whole decoded file (``tag --excerpt full``'s path) and tagged in one call;
the ratio stream / baseline wall shows what streaming costs. Also printed: audio seconds per
CPU second of the process (all threads), which other jobs on the machine do not inflate the
way they inflate wall time: a dedicated machine with ``--cores`` cores reaches at least that
real-time factor when the work does not spread over the cores, up to --cores times it.

Latency: the same signal as raw f32le PCM written into a pipe at 1x in 20 ms chunks (a live
stream), read by ``PcmSource``. Each chunk's latency runs from the moment it entered the pipe
to the record of the first window that contains it; the maximum over the chunks after the
first window (the start-up fill of one window length is left out) is the end-to-end worst case (at most one hop of waiting for the window to end, plus resampling,
windowing and the model). Also printed: the longest time from a window's last sample reaching
the reader to its record (the summary's max_delay_ms).

Goals (issue 13, 2 cores): RTF >= 50 for musicnn-msd + lr and the CNN; latency <= hop + 100 ms.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import pin_cores, write_results  # noqa: E402

MODELS = ("musicnn-lr", "cnn", "melstats-lr")
GOAL_RTF = {"musicnn-lr": 50.0, "cnn": 50.0}


def make_runs(work: Path, models) -> dict[str, Path]:
    from embedkit.datasets import load_dataset
    from embedkit.synth import make_dataset

    data = make_dataset(work / "data", n_classes=4, per_class=4, duration_s=12.0)
    tracks = load_dataset(data)
    runs = {}
    for name in models:
        done = work / "runs" / name / "metrics.json"
        if done.exists():
            runs[name] = done.parent
            continue
        t = time.perf_counter()
        if name.endswith("-lr"):
            from embedkit.extract import extract
            from embedkit.fit import fit_head

            backbone = {"musicnn-lr": "musicnn-msd", "melstats-lr": "melstats"}[name]
            extract(tracks, backbone, cache=work / "cache", workers=2)
            res = fit_head(
                backbone, "lr", cache=work / "cache", tracks=tracks, run_dir=work / "runs" / name, protocol="holdout"
            )
        else:
            from embedkit.cnn.train import TrainConfig, train_cnn
            from embedkit.config import AudioConfig

            res = train_cnn(
                tracks,
                train=TrainConfig(epochs=1, batch_size=8),
                audio_cfg=AudioConfig(clip_s=12.0),
                run_dir=work / "runs" / name,
                cache=work / "cache",
                threads=2,
                workers=2,
            )
        print(f"  trained {name} in {time.perf_counter() - t:.0f} s: {res.run_dir}", flush=True)
        runs[name] = Path(res.run_dir)
    return runs


def make_song(work: Path, seconds: float) -> tuple[Path, np.ndarray]:
    import soundfile as sf

    from embedkit.synth import make_clip

    path = work / f"song_{seconds:g}s.wav"
    parts = [make_clip(c % 4, 500 + c, 44100, 10.0) for c in range(int(np.ceil(seconds / 10)))]
    y = np.concatenate(parts)[: int(seconds * 44100)]
    if not path.exists():
        sf.write(path, np.stack([y, 0.9 * y], axis=1), 44100)
    return path, y


def rtf(tagger, path: Path, hop: float) -> dict:
    from embedkit.audio.decoding import load
    from embedkit.audio.segments import segment
    from embedkit.config import AudioConfig, SegmentConfig
    from embedkit.deploy.stream import FileSource, JsonLinesWriter, StreamConfig, run_stream

    sink = open(os.devnull, "w")
    # warm-up (first torch call, caches), not timed
    tagger.predict_segments(np.zeros((2, tagger.window_samples), np.float32))
    t, c = time.perf_counter(), time.process_time()
    s = run_stream(tagger, FileSource(path), StreamConfig(hop_s=hop), JsonLinesWriter(sink))
    stream_s, cpu_s = time.perf_counter() - t, time.process_time() - c
    t = time.perf_counter()
    y = load(path, tagger.sample_rate, AudioConfig(clip_s=None))
    frames, _, _ = segment(y, tagger.sample_rate, SegmentConfig(tagger.segment.segment_s, hop))
    tagger.calibrate(tagger.predict_segments(frames))
    base_s = time.perf_counter() - t
    return {
        "audio_s": s["audio_s"],
        "windows": s["windows"],
        "stream_wall_s": stream_s,
        "rtf": s["audio_s"] / stream_s,
        "cpu_s": cpu_s,
        "rtf_cpu": s["audio_s"] / cpu_s,
        "model_s": s["compute_s"],
        "baseline_wall_s": base_s,
        "baseline_rtf": s["audio_s"] / base_s,
        "stream_over_baseline": stream_s / base_s,
    }


def latency(tagger, y: np.ndarray, hop: float, chunk_s: float = 0.02) -> dict:
    from embedkit.deploy.stream import PcmSource, StreamConfig, run_stream

    sr = 44100
    r, w = os.pipe()
    data = y.astype("<f4").tobytes()
    step = int(chunk_s * sr)
    written = []  # (end sample of the chunk, wall time it entered the pipe)

    def writer():
        t0 = time.monotonic()
        with os.fdopen(w, "wb", buffering=0) as fh:
            for i in range(0, len(y), step):
                pause = t0 + (i + step) / sr - time.monotonic()  # a chunk leaves when it has "played"
                if pause > 0:
                    time.sleep(pause)
                fh.write(data[4 * i : 4 * (i + step)])
                written.append((min(i + step, len(y)), time.monotonic()))

    out = []  # (end sample of the window at the input rate, wall time of its record)

    def emit(rec):
        if rec["type"] == "window":
            out.append((rec["end_s"] * sr, time.monotonic()))

    th = threading.Thread(target=writer, daemon=True)
    with os.fdopen(r, "rb", buffering=0) as fh:
        th.start()
        s = run_stream(tagger, PcmSource(fh, "f32le", sr, 1, live=True), StreamConfig(hop_s=hop), emit)
    th.join()
    # Every sample's latency: from the moment its chunk entered the pipe to the first record of
    # a window that contains it (the first window ending at or after the chunk's end).
    ends = np.array([e for e, _ in out])
    t_out = np.array([t for _, t in out])
    # The chunks of the first window (the start-up fill: one window length) are left out.
    lat = []
    for b, tw in written:
        j = int(np.searchsorted(ends, b - 0.5))
        if b > ends[0] and j < len(ends) and ends[j] - tagger.segment.segment_s * sr <= b - step:
            lat.append(t_out[j] - tw)
    lat = np.array(lat) * 1e3
    return {
        "windows": len(out),
        "dropped": s["dropped"],
        "delay_ms_p50": float(np.median(lat)),
        "latency_ms_max": float(lat.max()),
        "max_window_delay_ms": s["max_delay_ms"],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--hop", type=float, default=2.5)
    ap.add_argument("--seconds", type=float, default=120.0, help="audio for the real-time factor")
    ap.add_argument("--latency-seconds", type=float, default=30.0, help="audio streamed at 1x for the latency")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--work", type=Path, default=Path("/tmp/embedkit_bench_stream"))
    ap.add_argument("--repeat", type=int, default=3, help="RTF runs per model (the median is reported)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.latency_seconds = 40.0, 12.0
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cpus = pin_cores(args.cores)
    args.work.mkdir(parents=True, exist_ok=True)
    print(
        f"cores {cpus}, hop {args.hop} s, {args.seconds:g} s for RTF, {args.latency_seconds:g} s at 1x for latency; load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    runs = make_runs(args.work, args.models)
    path, _ = make_song(args.work, args.seconds)
    _, y_lat = make_song(args.work, args.latency_seconds)
    from embedkit.deploy.tagger import load_tagger

    out = {}
    for name in args.models:
        tagger = load_tagger(runs[name])
        reps = [rtf(tagger, path, args.hop) for _ in range(args.repeat)]
        r = sorted(reps, key=lambda x: x["rtf"])[len(reps) // 2]  # the median run
        r["rtf_runs"] = [round(x["rtf"], 1) for x in reps]
        lat = latency(tagger, y_lat, args.hop)
        out[name] = {**r, **lat, "segment_s": tagger.segment.segment_s, "sample_rate": tagger.sample_rate}
        goal = GOAL_RTF.get(name)
        print(
            f"{name:12s} RTF {r['rtf']:7.1f} (median of {r['rtf_runs']}; goal {goal or '-'}), audio s per CPU s {r['rtf_cpu']:.1f}, whole-file baseline RTF {r['baseline_rtf']:7.1f}, stream/baseline wall {r['stream_over_baseline']:.2f}x, "
            f"model {r['model_s']:.2f} s of {r['stream_wall_s']:.2f} s | 1x live: sample -> output latency p50 {lat['delay_ms_p50']:.0f} ms, "
            f"max {lat['latency_ms_max']:.0f} ms (goal <= hop + 100 = {args.hop * 1e3 + 100:.0f}), window's last sample -> output max {lat['max_window_delay_ms']:.0f} ms, dropped {lat['dropped']}",
            flush=True,
        )
    print(f"load at end {os.getloadavg()[0]:.2f}")
    p = write_results("stream", {"args": {k: str(v) for k, v in vars(args).items()}, "results": out})
    print(f"wrote {p}")


if __name__ == "__main__":
    main()
