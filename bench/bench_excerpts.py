"""What each test-time excerpt (``embedkit tag --excerpt``) costs and gains on whole songs.

    python bench/bench_excerpts.py                  # musicnn-msd + lr, 2 folds, 2 songs per genre and fold
    python bench/bench_excerpts.py --folds 5        # 5-fold: songs of the 2 held-out clips (60 s)
    python bench/bench_excerpts.py --rotations 5    # every held-out clip opens one song

gtzan_mini has 30 s clips, not songs, so songs are built: the tracks are split into K
stratified folds (``embedkit.evaluate.make_folds``); for each fold a head is fitted on the other
folds' stored embeddings (``embedkit fit`` with that fold: ``--cache`` must hold the backbone's
gtzan_mini store, nothing is extracted), and every song is made only of that fold's held-out
clips, so no clip of a song was seen in training:

- clean: a genre's held-out clips concatenated (2 folds: 5 clips, 150 s); ``--rotations`` songs
  per genre, song r starting at clip r (so ``first`` listens to a different clip in each).
- intro: the same song whose first clip is replaced by a held-out clip of another genre (genre
  g + 1 + r in label order): 30 s of the wrong genre, then the song. What ``first`` gets wrong.

Each song is written as FLAC (22.05 kHz, as the clips) and tagged per policy exactly as
``embedkit tag`` reads it (``audio.excerpts.read_excerpt``: seek-decode the excerpt, resample,
windows) -> ``Tagger.predict_segments`` -> ``track_probabilities`` -> top genre. Reported per policy
and song kind: accuracy (top genre == the song's genre), windows and wall / CPU seconds per song
(decode + forward, 2 threads). Writes bench/results/excerpts.json.
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
from common import load_average, pin_cores, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GTZAN = Path(os.environ.get("EMBEDKIT_SHARED", ROOT.parent / "shared")) / "data" / "gtzan_mini"
POLICIES = ("first", "middle", "spread:3", "spread:5", "full")


def build_songs(tracks, test_ids: list[str], out: Path, rotations: int) -> list[dict]:
    """Songs of one fold's held-out clips: [{path, label, kind, clips}] (see the module doc)."""
    import soundfile as sf

    held = tracks[tracks["track_id"].isin(set(test_ids))]
    by_genre = {g: sorted(held.loc[held["label"] == g, "path"]) for g in sorted(held["label"].unique())}
    genres = list(by_genre)
    out.mkdir(parents=True, exist_ok=True)
    cache: dict[str, tuple[np.ndarray, int]] = {}

    def audio(p: str) -> np.ndarray:
        if p not in cache:
            y, sr = sf.read(p, dtype="float32")
            cache[p] = (y if y.ndim == 1 else y.mean(axis=1), sr)
        return cache[p][0]

    songs = []
    for gi, g in enumerate(genres):
        clips = by_genre[g]
        for r in range(min(rotations, len(clips))):
            order = clips[r:] + clips[:r]
            other = by_genre[genres[(gi + 1 + r) % len(genres)]]
            intro = other[r % len(other)]
            for kind, parts in (("clean", order), ("intro", [intro, *order[1:]])):
                y = np.concatenate([audio(p) for p in parts])
                path = out / f"{g}-{r}-{kind}.flac"
                sf.write(path, y, cache[parts[0]][1])
                songs.append({"path": str(path), "label": g, "kind": kind, "clips": [Path(p).name for p in parts]})
    return songs


def tag_song(tagger, path: str, excerpt) -> tuple[str, int, float, float]:
    """(top genre, windows, wall s, CPU s) of one song through ``embedkit tag``'s reading path."""
    from embedkit.audio.excerpts import read_excerpt

    c0, t0 = time.process_time(), time.perf_counter()
    windows, _, _ = read_excerpt(
        path, tagger.sample_rate, excerpt, tagger.audio.clip_s, tagger.segment.segment_s, tagger.segment.hop_s
    )
    track = tagger.track_probabilities(tagger.predict_segments(windows))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return tagger.labels[int(np.argmax(track))], len(windows), wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="musicnn-msd")
    ap.add_argument("--head", default="lr")
    ap.add_argument(
        "--cache",
        default=os.environ.get("EMBEDKIT_CACHE", "cache"),
        help="store of the backbone's gtzan_mini embeddings",
    )
    ap.add_argument("--folds", type=int, default=2, help="stratified folds (2: 5 held-out clips a genre, 150 s songs)")
    ap.add_argument("--rotations", type=int, default=2, help="songs per genre and fold (each opens with another clip)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not GTZAN.exists():
        raise SystemExit(f"{GTZAN}: gtzan_mini not found (set EMBEDKIT_SHARED)")
    cpus = pin_cores(args.cores)

    from embedkit.audio.excerpts import Excerpt
    from embedkit.datasets import load_dataset
    from embedkit.deploy.tagger import load_tagger
    from embedkit.evaluate import make_folds
    from embedkit.fit import fit_head

    policies = [Excerpt.parse(p) for p in args.policies.split(",")]
    tracks = load_dataset(GTZAN)
    folds = make_folds(tracks, "cv", args.folds, seed=args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-excerpts-") as tmp:
        work = Path(tmp)
        for fi, fold in enumerate(folds):
            run = fit_head(
                args.backbone,
                args.head,
                cache=args.cache,
                tracks=tracks,
                folds=[fold],
                protocol="holdout",
                runs=work / "runs",
            ).run_dir
            tagger = load_tagger(run)
            songs = build_songs(tracks, fold.test, work / f"songs{fi}", args.rotations)
            seen = set(tracks.loc[tracks["track_id"].isin(set(fold.train)), "path"].map(lambda p: Path(p).name))
            assert not any(c in seen for s in songs for c in s["clips"]), "a song holds a training clip"
            tag_song(tagger, songs[0]["path"], policies[0])  # warm-up (first forward, decoder)
            for song in songs:
                dur = None
                for ex in policies:  # interleaved: every policy on a song before the next song
                    top, k, wall, cpu = tag_song(tagger, song["path"], ex)
                    if dur is None:
                        import soundfile as sf

                        dur = sf.info(song["path"]).duration
                    rows.append(
                        {
                            "fold": fi,
                            "song": Path(song["path"]).name,
                            "kind": song["kind"],
                            "label": song["label"],
                            "duration_s": dur,
                            "excerpt": str(ex),
                            "top": top,
                            "correct": top == song["label"],
                            "windows": k,
                            "wall_s": wall,
                            "cpu_s": cpu,
                        }
                    )
            print(
                f"fold {fi + 1}/{len(folds)}: head on {len(fold.train)} tracks, {len(songs)} songs tagged", flush=True
            )
    summary = {}
    print(f"\n{'excerpt':>9} | {'kind':>5} | accuracy | songs | windows/song | wall s/song | CPU s/song")
    for kind in ("clean", "intro", "all"):
        for ex in policies:
            sel = [r for r in rows if r["excerpt"] == str(ex) and (kind == "all" or r["kind"] == kind)]
            acc = float(np.mean([r["correct"] for r in sel]))
            s = {
                "accuracy": acc,
                "correct": int(sum(r["correct"] for r in sel)),
                "songs": len(sel),
                "windows_per_song": float(np.mean([r["windows"] for r in sel])),
                "wall_s_median": statistics.median(r["wall_s"] for r in sel),
                "cpu_s_median": statistics.median(r["cpu_s"] for r in sel),
            }
            summary[f"{kind}/{ex}"] = s
            print(
                f"{str(ex):>9} | {kind:>5} | {acc:8.3f} | {len(sel):5d} | {s['windows_per_song']:12.1f} |"
                f" {s['wall_s_median']:11.3f} | {s['cpu_s_median']:10.3f}"
            )
    load = load_average()
    print(f"load average (1 min) at the end: {load:.1f} on {os.cpu_count()} CPUs")
    out = write_results(
        "excerpts",
        {
            "backbone": args.backbone,
            "head": args.head,
            "folds": args.folds,
            "rotations": args.rotations,
            "song_s": float(np.mean([r["duration_s"] for r in rows])),
            "cores": cpus,
            "load_avg_1m": load,
            "summary": summary,
            "rows": rows,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
