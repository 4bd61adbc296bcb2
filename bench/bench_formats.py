"""Decoding every format a music library holds: cost per 30 s excerpt of full-length songs, and
``embedkit tag --excerpt first`` on AAC (.m4a) against MP3, each against a baseline measured in
the same run.

    python bench/bench_formats.py            # real songs from Debian's asc-music / drascula-music
    python bench/bench_formats.py --quick    # 4 songs, 1 repeat

Songs: the full-length tracks of the Debian packages ``asc-music`` (3 MP3s, 4.8-7.4 min) and
``drascula-music`` (Ogg Vorbis, 1-3.3 min; those >= 60 s), decoded once to 44.1 kHz stereo and
encoded with ffmpeg into every format under ``--songs`` (default ~/.cache/embedkit/bench-formats;
nothing is written into the project but bench/results/bench_formats.json). Without those
packages (``apt-get install asc-music drascula-music``), generated songs are used and the output
says so. Measured on ``--cores`` pinned CPUs:

(1) decode cost per 30 s excerpt (CPU seconds, one thread, best of --repeat per song, mean over
    songs): ``decoding.decode`` (the chosen decoder: libsndfile for WAV/AIFF/FLAC/MP3, FFmpeg
    through PyAV for the rest) from the middle of the song (a seek) and from its start; the
    same middle excerpt through libsndfile and through PyAV where each can decode the format
    (the measurement behind ``decoding.SNDFILE_KINDS``); and a full decode of the song.
(2) ``tag(..., excerpt="first")`` (what ``embedkit tag --excerpt first`` runs, model loaded)
    into a fresh SQLite database: wall seconds per track for the .m4a (AAC 256 kb/s) files
    against the .mp3 (LAME 192 kb/s) files of the same songs, rounds alternated, best of
    --repeat; target <= 0.15 s per track on 2 cores for both. Model: musicnn-msd + lr fitted on
    gtzan_mini (generated clips without ../shared), built once into --songs, or ``--run DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timer, load_average, pin_cores, write_results  # noqa: E402

#: name -> (suffix, ffmpeg options)
FORMATS = {
    "wav": (".wav", ["-c:a", "pcm_s16le"]),
    "aiff": (".aiff", ["-c:a", "pcm_s16be"]),
    "flac": (".flac", ["-c:a", "flac"]),
    "mp3": (".mp3", ["-c:a", "libmp3lame", "-b:a", "192k"]),
    "vorbis": (".ogg", ["-c:a", "libvorbis", "-q:a", "5"]),
    "aac": (".m4a", ["-c:a", "aac", "-b:a", "256k"]),
    "alac": (".m4a", ["-c:a", "alac"]),
    "opus": (".opus", ["-c:a", "libopus", "-b:a", "128k"]),
    "wma": (".wma", ["-c:a", "wmav2", "-b:a", "192k"]),
    "wavpack": (".wv", ["-c:a", "wavpack"]),
    "tta": (".tta", ["-c:a", "tta"]),
}
REAL_SONGS = ("/usr/share/games/asc/music/*.mp3", "/usr/share/scummvm/drascula/audio/*.ogg")


def thread_cpu(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best


def ffmpeg(*args) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *map(str, args)], check=True)


def real_sources(min_s: float, n: int | None) -> list[Path]:
    import soundfile as sf

    found = [Path(p) for pattern in REAL_SONGS for p in sorted(glob.glob(pattern))]
    long = [p for p in found if sf.info(str(p)).duration >= min_s]
    long.sort(key=lambda p: -sf.info(str(p)).duration)
    return long[:n] if n else long


def make_library(root: Path, sources: list[Path]) -> dict[str, list[Path]]:
    """{format: [paths]} encoded from 44.1 kHz stereo WAV versions of ``sources`` (kept)."""
    out: dict[str, list[Path]] = {name: [] for name in FORMATS}
    for src in sources:
        base = root / "src" / f"{src.parent.name}-{src.stem}.wav"
        if not base.exists():
            base.parent.mkdir(parents=True, exist_ok=True)
            ffmpeg("-i", src, "-ar", 44100, "-ac", 2, "-c:a", "pcm_s16le", base)
        for name, (suffix, opts) in FORMATS.items():
            p = root / name / (base.stem + suffix)
            if not p.exists():
                p.parent.mkdir(parents=True, exist_ok=True)
                ffmpeg("-i", base, *opts, p)
            out[name].append(p)
    return out


def decode_costs(lib: dict[str, list[Path]], repeat: int) -> dict:
    import soundfile as sf

    from embedkit.audio import decoding

    def via_sndfile(p: Path, start: int, n: int):
        with sf.SoundFile(str(p)) as fh:
            fh.seek(start)
            return decoding._downmix(fh.read(n, dtype="float32", always_2d=True))

    def via_av(p: Path, start: int, n: int):
        with decoding.AvFile(p) as fh:
            fh.seek(start)
            return decoding._downmix(fh.read(n))

    out = {}
    print("(1) decode CPU per 30 s excerpt (ms, one thread, mean over songs), chosen decoder vs the others:")
    print(
        f"  {'format':8s} {'decoder':10s} {'middle':>7s} {'first':>7s} {'sndfile':>8s} {'PyAV':>7s} {'full':>7s}"
        "   chosen/sndfile  chosen/PyAV  excerpt/full"
    )
    for name, paths in lib.items():
        rows = {"middle": [], "first": [], "sndfile": [], "av": [], "full": []}
        chosen = None
        for p in paths:
            with decoding.open_audio(p) as fh:
                chosen = "libsndfile" if not isinstance(fh, decoding.AvFile) else "PyAV"
                sr, frames = int(fh.samplerate), int(fh.frames)
            n = 30 * sr
            mid = max(0, (frames - n) // 2)
            rows["middle"].append(thread_cpu(partial(decoding.decode, p, max_seconds=30, start_s=mid / sr), repeat))
            rows["first"].append(thread_cpu(partial(decoding.decode, p, max_seconds=30), repeat))
            rows["full"].append(thread_cpu(partial(decoding.decode, p), max(1, repeat // 2)))
            rows["av"].append(thread_cpu(partial(via_av, p, mid, n), repeat))
            try:
                via_sndfile(p, mid, 16)
            except Exception:
                rows["sndfile"].append(float("nan"))
            else:
                rows["sndfile"].append(thread_cpu(partial(via_sndfile, p, mid, n), repeat))
        m = {k: float(np.mean(v)) * 1000 for k, v in rows.items()}
        r_sf = m["middle"] / m["sndfile"] if m["sndfile"] == m["sndfile"] else float("nan")
        out[name] = {"decoder": chosen, **{f"{k}_ms": v for k, v in m.items()}}
        out[name].update(
            chosen_vs_sndfile=r_sf, chosen_vs_av=m["middle"] / m["av"], excerpt_vs_full=m["middle"] / m["full"]
        )
        sf_txt = f"{m['sndfile']:8.1f}" if m["sndfile"] == m["sndfile"] else f"{'-':>8s}"
        r_txt = f"{r_sf:.2f}x" if r_sf == r_sf else "-"
        print(
            f"  {name:8s} {chosen:10s} {m['middle']:7.1f} {m['first']:7.1f} {sf_txt} {m['av']:7.1f} {m['full']:7.1f}"
            f"   {r_txt:>14s}  {m['middle'] / m['av']:10.2f}x  {m['middle'] / m['full']:11.3f}x",
            flush=True,
        )
    return out


def build_run(work: Path, cores: int) -> Path:
    done = sorted((work / "runs").glob("*/metrics.json"))
    if done:
        return done[-1].parent
    from bench_tag import build_run as build

    return build(work, cores)


def tag_speed(run: Path, lib: dict[str, list[Path]], cores: int, work: Path, repeat: int) -> dict:
    from embedkit import identity
    from embedkit.deploy.batch import tag
    from embedkit.deploy.tagger import load_tagger

    tagger = load_tagger(run)
    tag(run, lib["mp3"][:1], excerpt="first", db=work / "warm.sqlite", workers=cores, tagger=tagger)
    best = {"aac": float("inf"), "mp3": float("inf")}
    cpu = {"aac": float("inf"), "mp3": float("inf")}  # process CPU per track: less sensitive to other jobs
    rounds = []
    for r in range(repeat):
        pair = {}
        for name in ("aac", "mp3") if r % 2 == 0 else ("mp3", "aac"):
            identity._cache.clear()
            db = work / f"tag-{name}-{r}.sqlite"
            if db.exists():
                db.unlink()
            c0 = time.process_time()
            with Timer() as t:
                res = tag(run, lib[name], excerpt="first", db=db, workers=cores, tagger=tagger)
            assert res.n_tagged == len(lib[name]) and not res.failures, res.failures[:3]
            pair[name] = t.s / len(lib[name])
            best[name] = min(best[name], pair[name])
            cpu[name] = min(cpu[name], (time.process_time() - c0) / len(lib[name]))
        rounds.append(pair)
    ratio = best["aac"] / best["mp3"]
    paired = [p["aac"] / p["mp3"] for p in rounds]
    per_round = ", ".join(f"{x:.2f}" for x in paired)
    # what differs between the two: the decode of each track's excerpt (one thread, CPU)
    from embedkit.audio.excerpts import Excerpt, read_excerpt

    seg, clip_s = tagger.segment, tagger.audio.clip_s
    decode = {
        name: thread_cpu(
            partial(
                lambda files: [
                    read_excerpt(str(f), tagger.sample_rate, Excerpt("first"), clip_s, seg.segment_s, seg.hop_s)
                    for f in files
                ],
                lib[name],
            ),
            repeat,
        )
        / len(lib[name])
        for name in ("aac", "mp3")
    }
    print(
        f"(2) embedkit tag --excerpt first, {len(lib['aac'])} full-length tracks, {cores} cores: "
        f".m4a (AAC) {best['aac']:.3f} s/track, .mp3 {best['mp3']:.3f} s/track -> {ratio:.2f}x the MP3 baseline; "
        f"rounds: {per_round}x (median {np.median(paired):.2f}); CPU {cpu['aac']:.3f} vs {cpu['mp3']:.3f} s/track "
        f"({cpu['aac'] / cpu['mp3']:.2f}x; / {cores} cores: {cpu['aac'] / cores:.3f} vs {cpu['mp3'] / cores:.3f}); target <= 0.15 s/track: "
        f"{'met' if max(best.values()) <= 0.15 else 'NOT met'}; excerpt decode CPU per track (one thread) "
        f"{decode['aac'] * 1000:.1f} vs {decode['mp3'] * 1000:.1f} ms ({decode['aac'] / decode['mp3']:.2f}x)",
        flush=True,
    )
    return {
        "s_per_track": best,
        "aac_vs_mp3": ratio,
        "rounds": rounds,
        "paired_median": float(np.median(paired)),
        "cpu_s_per_track": cpu,
        "decode_cpu_s_per_track": decode,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--songs", type=Path, default=Path.home() / ".cache" / "embedkit" / "bench-formats")
    ap.add_argument("--n", type=int, default=None, help="songs (default: every real song >= 60 s)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--run", type=Path, default=None, help="a finished run to tag with (default: built once)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-tag", action="store_true", help="only the decode costs (1)")
    ap.add_argument("--skip-decode", action="store_true", help="only the tagging speed (2)")
    args = ap.parse_args()
    if shutil.which("ffmpeg") is None:
        sys.exit("bench_formats: needs ffmpeg (apt-get install ffmpeg)")
    if args.quick:
        args.n, args.repeat = args.n or 4, 1
    cpus = pin_cores(args.cores)
    sources = real_sources(60.0, args.n)
    real = bool(sources)
    if not real:
        from bench_tag import make_songs

        print("asc-music / drascula-music not installed: generated songs (apt-get install asc-music drascula-music)")
        sources = make_songs(args.songs / "generated", args.n or 8)
    lib = make_library(args.songs, sources)
    import soundfile as sf

    mins = [sf.info(str(p)).duration / 60 for p in lib["wav"]]
    print(
        f"{len(sources)} {'real' if real else 'generated'} songs of {min(mins):.1f}-{max(mins):.1f} min (mean {np.mean(mins):.1f}), "
        f"44.1 kHz stereo; CPUs {cpus}; load average {load_average():.1f}",
        flush=True,
    )
    results = {"songs": [str(s) for s in sources], "real": real, "minutes": mins}
    if not args.skip_decode:
        results["decode"] = decode_costs(lib, args.repeat)
    else:  # keep the decode figures of the last full run beside the new tagging ones
        import json

        from common import RESULTS

        with contextlib.suppress(OSError, ValueError, KeyError):
            results["decode"] = json.loads((RESULTS / "bench_formats.json").read_text())["decode"]
    if not args.skip_tag:
        run = args.run or build_run(args.songs / "work", args.cores)
        work = args.songs / "tag"
        work.mkdir(parents=True, exist_ok=True)
        results["tag_first"] = tag_speed(run, lib, args.cores, work, args.repeat)
    results["load_average_end"] = load_average()
    print(f"load average at the end {load_average():.1f}; results: {write_results('bench_formats', results)}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
