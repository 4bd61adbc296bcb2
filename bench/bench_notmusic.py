"""Not music: how well candidate scores separate non-music audio from held-out music, and what
the shipped score (``embedkit.calibration.NotMusicDetector``: Mahalanobis distance in the model's
embedding space, threshold chosen on held-out training tracks) flags at its threshold.

    python bench/bench_notmusic.py --data ../shared/data/gtzan_mini --work /tmp/notmusic

Non-music is built here (``make_nonmusic``): speech synthesised by espeak-ng in several voices
and languages (`apt-get install espeak-ng`), noise of five colours, pure tones, chords of
sines, sweeps, mains hum (+ hiss), clicks and crackle, near-silence with hum. Music: gtzan_mini
(its 5-fold CV: each fold's tracks scored against the other folds' windows only), the real FMA
clip, and Debian-packaged full-length music (`asc-music`: /usr/share/games/asc/music,
`drascula-music`: /usr/share/scummvm/drascula/audio), tagged with the run trained on every
gtzan_mini track (none of it was seen in training).

Candidates (all on musicnn-msd, 5 s windows of the first 30 s; a track's score is the mean of
its windows' unless said otherwise):
- mahalanobis-slog+modulation (shipped): per window max(m, m_ref x min(d_ref / d, 4)), m the
  score below, d the window's modulation depth (``calibration.modulation_depth``), d_ref the 1 %
  quantile of the training windows' depth, m_ref the 99 % quantile of held-out tracks' m
- mahalanobis-slog (shipped before): squared Mahalanobis distance / D on sign(x) log(1 + |x|) of
  the embedding, covariance shrunk by 0.1 towards its mean variance
- modulation: the modulation term alone (d_ref / d, capped)
- mahalanobis: the same on the raw embedding, Ledoit-Wolf shrinkage
- knn-cosine: mean cosine distance to the 5 nearest training windows (standardised embeddings)
- msd-tags: 1 - the largest mean MSD tag probability (the backbone's own music tags)
- flatness: spectral flatness (noise-likeness), a signal statistic

Every candidate's threshold is chosen by the same rule on the gtzan_mini held-out tracks only
(99 % quantile); no figure of the non-music set enters a threshold. The candidate is chosen on
half of the non-music kinds (``CHOOSE``: the even speech voices, white and brown noise, tones of
100 Hz and 1 kHz, 50 Hz hum, clicks, the linear sweep): the most of them flagged with at most 5 %
of the held-out music flagged (ties: the higher AUROC); the figures are then reported on the other
half (kinds it was not chosen on) and on all.

Then the shipped path end to end: `fit_head(musicnn-msd, lr, --cv 5)` stores the detector and
threshold in calibration.json, and `embedkit.deploy.batch.tag` decides every file. Prints AUROC
per candidate and the share flagged at the stored threshold, per kind of non-music and per music
source; writes bench/results/bench_notmusic.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SR = 22050
SPEECH = [  # (espeak-ng voice, text)
    (
        "en",
        "The history of the city begins in the twelfth century, when a small market grew around the river crossing.",
    ),
    (
        "en-us+f3",
        "Welcome back to the show. Today we are talking about gardening, compost, and the best time to plant tomatoes.",
    ),
    (
        "en-gb-x-rp+m3",
        "Chapter one. It was a cold and bright morning, and the clocks were striking thirteen as she left home.",
    ),
    ("de", "Guten Abend, meine Damen und Herren. Hier sind die Nachrichten des Tages aus Politik und Wirtschaft."),
    ("fr+f2", "Bonjour à tous, bienvenue dans notre émission consacrée aux livres et aux auteurs de la rentrée."),
    ("es", "Buenas tardes. Hoy vamos a hablar de la historia de la ciudad y de sus monumentos más antiguos."),
    ("it+m2", "Il treno per Milano partirà dal binario tre con un ritardo previsto di circa quindici minuti."),
    ("pt", "Neste episódio do nosso podcast conversamos sobre ciência, tecnologia e o futuro do trabalho."),
    ("nl+f4", "Het weer voor morgen: in het noorden regen en wind, in het zuiden af en toe zon."),
    ("pl", "Dzień dobry, zapraszamy na audycję o muzyce, literaturze i podróżach po Europie."),
    ("ru", "Добрый вечер. В эфире новости культуры и спорта за прошедшую неделю."),
    ("sv+m4", "Välkommen till dagens föreläsning om hur städer har vuxit fram under de senaste tvåhundra åren."),
]


#: the non-music files the candidate is chosen on (the rest are reported as unseen kinds)
CHOOSE = (
    *(f"speech_{i:02d}" for i in range(0, 12, 2)),
    "noise_white",
    "noise_brown",
    "tone_100",
    "tone_1000",
    "hum_50",
    "silence_hum_50",
    "clicks_random",
    "sweep_lin",
)


def kind_of(name: str) -> str:
    """A non-music file's kind: speech, noise, tone, hum (mains hum, + hiss, near silence), ..."""
    stem = Path(name).stem
    if stem.startswith(("hum_", "silence_hum")):
        return "hum"
    return stem.split("_")[0]


def chosen_on(name: str) -> bool:
    return Path(name).stem.startswith(CHOOSE)


def _noise(color: str, n: int, rng) -> np.ndarray:
    white = rng.standard_normal(n)
    if color == "white":
        return white
    f = np.fft.rfftfreq(n, 1 / SR)
    f[0] = f[1]
    shape = {"pink": f**-0.5, "brown": f**-1.0, "blue": f**0.5, "violet": f**1.0}[color]
    return np.fft.irfft(np.fft.rfft(white) * shape, n)


def make_nonmusic(root: Path, seconds: float = 30.0) -> list[Path]:
    """The non-music files (WAV, 22.05 kHz mono), generated once into ``root``."""
    import soundfile as sf

    root.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    n = int(seconds * SR)
    t = np.arange(n) / SR
    rng = np.random.default_rng(0)

    def save(name: str, y: np.ndarray, level: float = 0.3) -> None:
        y = np.asarray(y, dtype=np.float64)
        y = level * y / max(np.max(np.abs(y)), 1e-9)
        path = root / f"{name}.wav"
        sf.write(path, y.astype(np.float32), SR)
        out.append(path)

    if shutil.which("espeak-ng"):
        for i, (voice, text) in enumerate(SPEECH):
            path = root / f"speech_{i:02d}_{voice.replace('+', '_')}.wav"
            if not path.exists():
                with tempfile.TemporaryDirectory() as tmp:
                    raw = Path(tmp) / "s.wav"
                    # the text three times with pauses: ~30 s of speech like a podcast or an audiobook
                    subprocess.run(
                        ["espeak-ng", "-v", voice, "-s", "150", "-g", "8", "-w", str(raw), " ... ".join([text] * 3)],
                        check=True,
                        capture_output=True,
                    )
                    import soxr

                    y, sr = sf.read(raw, dtype="float32")
                    sf.write(path, soxr.resample(y, sr, SR), SR)
            out.append(path)
    else:
        print("espeak-ng not found: no speech in the non-music set (apt-get install espeak-ng)", file=sys.stderr)
    for color in ("white", "pink", "brown", "blue", "violet"):
        save(f"noise_{color}", _noise(color, n, rng))
        save(f"noise_{color}_quiet", _noise(color, n, rng), level=0.02)
    for f0 in (100.0, 440.0, 1000.0, 3000.0):
        save(f"tone_{int(f0)}", np.sin(2 * np.pi * f0 * t))
    save("sines_chord", sum(np.sin(2 * np.pi * f * t) for f in (261.63, 329.63, 392.0)))
    save("sweep_lin", np.sin(2 * np.pi * (50 * t + (8000 - 50) / (2 * seconds) * t**2)))
    save("sweep_log", np.sin(2 * np.pi * 50 * seconds / np.log(200) * (np.exp(t / seconds * np.log(200)) - 1)))
    for mains in (50.0, 60.0):
        hum = sum(np.sin(2 * np.pi * mains * k * t) / k for k in (1, 2, 3, 5))
        save(f"hum_{int(mains)}", hum)
        save(f"hum_{int(mains)}_hiss", hum + 0.05 * rng.standard_normal(n))
        save(f"silence_hum_{int(mains)}", hum, level=0.003)
    clicks = np.zeros(n)
    clicks[rng.choice(n, 300, replace=False)] = rng.choice([-1, 1], 300)
    save("clicks_random", clicks)
    crackle = np.zeros(n)
    crackle[rng.choice(n, 3000, replace=False)] = rng.standard_normal(3000)
    save("crackle_vinyl", crackle + 0.01 * _noise("pink", n, rng))
    return out


def music_files(fma: Path | None) -> dict[str, list[Path]]:
    out = {
        "asc-music": sorted(Path("/usr/share/games/asc/music").glob("*.mp3")),
        "drascula-music": sorted(Path("/usr/share/scummvm/drascula/audio").glob("*.ogg")),
    }
    if fma is not None and fma.exists():
        out["fma"] = [fma]
    return {k: v for k, v in out.items() if v}


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """P(score of a non-music file > score of a music file), ties half."""
    neg, pos = np.asarray(neg, float), np.asarray(pos, float)
    return float(((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()))


def window_features(bb, path: Path, clip_s: float = 30.0) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """(embeddings [K, 200], MSD taggram [K, 50], spectral flatness, modulation depth [K]) of
    the first 30 s."""
    from embedkit.audio import decoding
    from embedkit.audio.segments import segment
    from embedkit.calibration import modulation_depth
    from embedkit.config import AudioConfig, SegmentConfig

    y = decoding.load(path, bb.spec.sample_rate, AudioConfig(clip_s=clip_s, pad_mode="zero"), min_duration_s=5.0)
    frames, _, _ = segment(y, bb.spec.sample_rate, SegmentConfig(5.0, 5.0))
    outs = bb.outputs(frames)
    flat_y = frames.reshape(-1)
    spec = (
        np.abs(np.fft.rfft(flat_y[: len(flat_y) // 1024 * 1024].reshape(-1, 1024) * np.hanning(1024), axis=1)) ** 2
        + 1e-12
    )
    flat = float(np.mean(np.exp(np.mean(np.log(spec), axis=1)) / np.mean(spec, axis=1)))
    return (
        np.asarray(outs["embedding"]),
        np.asarray(outs["taggram"]),
        flat,
        modulation_depth(frames, bb.spec.sample_rate),
    )


def _flagged(scores: dict[str, float], t: float, group) -> dict[str, dict[str, float]]:
    """{group: {n, flagged}} of the files' scores at threshold t, grouped by ``group(path)``."""
    out: dict[str, list[bool]] = {}
    for path, v in scores.items():
        out.setdefault(group(path), []).append(v >= t)
    return {g: {"n": len(v), "flagged": float(np.mean(v))} for g, v in sorted(out.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/gtzan_mini")
    ap.add_argument(
        "--fma", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/fma_sample/000002.mp3"
    )
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "embedkit-notmusic")
    ap.add_argument(
        "--cache", type=Path, default=None, help="an embedding cache holding gtzan_mini (default: extract into --work)"
    )
    ap.add_argument("--cv", type=int, default=5)
    args = ap.parse_args()

    from sklearn.covariance import LedoitWolf

    from embedkit import calibration as C
    from embedkit.backbones import load_backbone
    from embedkit.datasets import load_dataset
    from embedkit.deploy.batch import tag
    from embedkit.evaluate import make_folds
    from embedkit.extract import extract
    from embedkit.fit import fit_head

    work = args.work
    nonmusic = make_nonmusic(work / "nonmusic")
    others = music_files(args.fma)
    tracks = load_dataset(args.data)
    bb = load_backbone("musicnn-msd")

    # -- candidates on the backbone's windows ---------------------------------------------------
    import pickle

    cached = work / "features-v2.pkl"  # the backbone pass is the slow part: kept between runs
    feats: dict[str, tuple] = pickle.loads(cached.read_bytes()) if cached.exists() else {}
    for p in [*tracks["path"], *nonmusic, *[q for v in others.values() for q in v]]:
        if str(p) in feats:
            continue
        try:
            feats[str(p)] = window_features(bb, Path(p))
        except Exception as exc:  # a file shorter than a window
            print(f"skipped {p}: {exc}", file=sys.stderr)
    cached.write_bytes(pickle.dumps(feats))
    gtzan = [str(p) for p in tracks["path"] if str(p) in feats]
    folds = make_folds(tracks, "cv", args.cv, 0.2, 0)
    part = {str(tracks.set_index("track_id").loc[t, "path"]): f.name for f in folds for t in f.test}
    depths = np.concatenate([feats[p][3] for p in gtzan])
    d_ref = float(np.quantile(depths[~np.isnan(depths)], C.NOT_MUSIC_DEPTH_QUANTILE))

    def scorers(train_paths: list[str], m_ref: float | None):
        E = np.concatenate([feats[p][0] for p in train_paths])
        det = C.NotMusicDetector.fit(E)
        lw = LedoitWolf().fit(E)
        mu, sd = E.mean(0), E.std(0)
        sd = np.maximum(sd, 0.1 * np.median(sd) + 1e-6)
        unit = lambda X: ((X - mu) / sd) / np.linalg.norm((X - mu) / sd, axis=1, keepdims=True)  # noqa: E731
        refs = unit(E)
        both = C.NotMusicDetector(det.center, det.precision, det.proj, det.shrinkage)
        both.modulation = {"depth_ref": d_ref, "embedding_ref": m_ref or 1.0, "cap": C.NOT_MUSIC_DEPTH_CAP}
        ratio = lambda d: np.where(np.isnan(d), 0.0, d_ref / np.maximum(d, d_ref / C.NOT_MUSIC_DEPTH_CAP))  # noqa: E731
        return {
            "mahalanobis-slog+modulation": lambda p: float(
                both.combine(det.embedding_score(feats[p][0]), feats[p][3]).mean()
            ),
            "mahalanobis-slog": lambda p: float(det.score(feats[p][0]).mean()),
            "modulation": lambda p: float(ratio(feats[p][3]).mean()),
            "knn-cosine": lambda p: float(np.sort(1 - unit(feats[p][0]) @ refs.T, axis=1)[:, :5].mean()),
            "mahalanobis": lambda p: float(lw.mahalanobis(feats[p][0]).mean()),
            "msd-tags": lambda p: float(1.0 - feats[p][1].mean(axis=0).max()),
            "flatness": lambda p: feats[p][2],
        }

    names = list(scorers(gtzan[:2], 1.0))
    # the embedding reference of the combined score: the 99 % quantile of held-out embedding scores
    held_m = {}
    for g in dict.fromkeys(part.values()):
        sc = scorers([p for p in gtzan if part[p] != g], None)
        held_m.update({p: sc["mahalanobis-slog"](p) for p in gtzan if part[p] == g})
    m_ref = float(np.quantile(list(held_m.values()), C.NOT_MUSIC_QUANTILE))
    held = {n: {} for n in names}
    for g in dict.fromkeys(part.values()):
        sc = scorers([p for p in gtzan if part[p] != g], m_ref)
        for p in (p for p in gtzan if part[p] == g):
            for n in names:
                held[n][p] = sc[n](p)
    sc_all = scorers(gtzan, m_ref)
    other_music = [str(p) for v in others.values() for p in v if str(p) in feats]
    nm = [str(p) for p in nonmusic if str(p) in feats]
    cand = {}
    for n in names:
        music = np.array([held[n][p] for p in gtzan] + [sc_all[n](p) for p in other_music])
        neg = {p: sc_all[n](p) for p in nm}
        t = C.select_not_music_threshold(np.array([held[n][p] for p in gtzan]))
        on = lambda keep, neg=neg: np.array([v for p, v in neg.items() if keep(p)])  # noqa: E731
        cand[n] = {
            "auroc": auroc(music, on(lambda p: True)),
            "auroc_speech": auroc(music, on(lambda p: kind_of(p) == "speech")),
            "threshold_rule": t,
            "nonmusic_flagged": float((on(lambda p: True) >= t).mean()),
            "nonmusic_flagged_choose_half": float((on(chosen_on) >= t).mean()),
            "nonmusic_flagged_unseen_half": float((on(lambda p: not chosen_on(p)) >= t).mean()),
            "music_flagged": float((music >= t).mean()),
        }
        print(
            f"{n:28s} AUROC {cand[n]['auroc']:.3f} (speech {cand[n]['auroc_speech']:.3f}); at the held-out rule "
            f"({C.NOT_MUSIC_QUANTILE:.0%} q x {C.NOT_MUSIC_MARGIN}): non-music flagged {cand[n]['nonmusic_flagged']:.1%} "
            f"(choose half {cand[n]['nonmusic_flagged_choose_half']:.1%}, unseen half {cand[n]['nonmusic_flagged_unseen_half']:.1%}), "
            f"music flagged {cand[n]['music_flagged']:.1%}"
        )
    ok = [n for n in names if cand[n]["music_flagged"] <= 0.05]
    chosen = max(ok, key=lambda n: (cand[n]["nonmusic_flagged_choose_half"], cand[n]["auroc"]))
    print(
        f"chosen on the choose half: {chosen}; on the unseen half it flags {cand[chosen]['nonmusic_flagged_unseen_half']:.1%}"
    )

    # -- the shipped path: fit (stores detector + threshold), then `tag` every file -------------
    cache, runs = (args.cache or work / "cache"), work / "runs"
    if args.cache is None:
        extract(tracks, "musicnn-msd", cache=cache, workers=2)
    shutil.rmtree(runs, ignore_errors=True)
    run = fit_head("musicnn-msd", "lr", cache=cache, data=args.data, runs=runs, cv=args.cv)
    block = run.metrics["calibration"]["not_music"]
    t = block["threshold"]
    lists = {"non-music": [str(p) for p in nonmusic], **{k: [str(p) for p in v] for k, v in others.items()}}
    shipped = {
        "method": block["method"],
        "threshold": t,
        "modulation": block["modulation"],
        "held_out_gtzan": block["held_out"],
    }
    for name, paths in lists.items():
        res = tag(run.run_dir, paths, workers=2, keep_rows=10**6)
        s = np.array([r.not_music for r in res.rows])
        dec = [r.decision for r in res.rows]
        shipped[name] = {
            "n": len(s),
            "flagged": float(np.mean([d == C.NOT_MUSIC for d in dec])),
            "scores": {Path(r.path).name: round(float(r.not_music), 4) for r in res.rows},
        }
        if name == "non-music":
            shipped[name]["per_kind"] = _flagged(shipped[name]["scores"], t, kind_of)
            shipped[name]["choose_half"] = _flagged(
                shipped[name]["scores"], t, lambda p: "choose" if chosen_on(p) else "unseen"
            )
        print(f"tag: {name}: {shipped[name]['flagged']:.1%} of {len(s)} decided not-music (threshold {t})")
    for k, v in shipped["non-music"]["per_kind"].items():
        print(f"tag: non-music {k:8s} {v['flagged']:.0%} of {v['n']}")
    print(
        f"tag: gtzan_mini held-out (CV) tracks flagged at the stored threshold: {block['held_out']['flagged']:.1%} of {block['held_out']['n_tracks']}"
    )
    music_all = [shipped[k] for k in others]
    n_music = block["held_out"]["n_tracks"] + sum(m["n"] for m in music_all)
    flagged_music = block["held_out"]["flagged"] * block["held_out"]["n_tracks"] + sum(
        m["flagged"] * m["n"] for m in music_all
    )
    shipped["all_music_flagged"] = {"n": n_music, "flagged": flagged_music / n_music}
    print(
        f"tag: all held-out music flagged {flagged_music / n_music:.1%} of {n_music}; non-music flagged {shipped['non-music']['flagged']:.1%}"
    )
    out = Path(__file__).resolve().parent / "results" / "bench_notmusic.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"candidates": cand, "chosen_on_half": chosen, "shipped": shipped}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
