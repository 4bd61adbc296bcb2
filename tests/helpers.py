"""Generators of test material shared by several test files (fixtures live in conftest.py):
a miniature FMA, metrics.json runs written by the real writer, the HTML checker."""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf

from embedkit.datasets import fma_audio_path
from embedkit.evaluate import Evaluation, dataset_summary, write_metrics

# ---------------------------------------------------------------------------------------------
# A miniature FMA

# FMA's tracks.csv: 52 columns under 4 top-level groups, written as three header rows
# (",album,album,...", ",comments,date_created,...", "track_id,,,...").
FMA_COLUMNS = {
    "album": [
        "comments",
        "date_created",
        "date_released",
        "engineer",
        "favorites",
        "id",
        "information",
        "listens",
        "producer",
        "tags",
        "title",
        "tracks",
        "type",
    ],
    "artist": [
        "active_year_begin",
        "active_year_end",
        "associated_labels",
        "bio",
        "comments",
        "date_created",
        "favorites",
        "id",
        "latitude",
        "location",
        "longitude",
        "members",
        "name",
        "related_projects",
        "tags",
        "website",
        "wikipedia_page",
    ],
    "set": ["split", "subset"],
    "track": [
        "bit_rate",
        "comments",
        "composer",
        "date_created",
        "date_recorded",
        "duration",
        "favorites",
        "genre_top",
        "genres",
        "genres_all",
        "information",
        "interest",
        "language_code",
        "license",
        "listens",
        "lyricist",
        "number",
        "publisher",
        "tags",
        "title",
    ],
}

# (track id, subset, split, genre_top, artist id, mp3 present)
FMA_TRACKS = [
    (2, "small", "training", "Hip-Hop", 1, True),
    (5, "small", "training", "Hip-Hop", 1, True),
    (10, "small", "validation", "Pop", 6, True),
    (140, "small", "test", "Folk", 54, True),
    (1482, "small", "training", "Rock", 410, True),
    (3, "medium", "training", "Hip-Hop", 1, True),  # not in fma_small
    (20, "large", "training", None, 4, False),  # no top genre
    (141, "small", "test", "Folk", 54, False),  # listed, but its mp3 is absent
]


def write_fma_tracks_csv(path: Path, tracks=FMA_TRACKS) -> Path:
    cols = pd.MultiIndex.from_tuples([(a, b) for a, bs in FMA_COLUMNS.items() for b in bs])
    df = pd.DataFrame(index=pd.Index([t[0] for t in tracks], name="track_id"), columns=cols, dtype=object)
    for tid, subset, split, genre, artist, _ in tracks:
        df.loc[tid, ("set", "subset")] = subset
        df.loc[tid, ("set", "split")] = split
        df.loc[tid, ("track", "genre_top")] = genre
        df.loc[tid, ("artist", "id")] = artist
        df.loc[tid, ("track", "title")] = f"Track {tid}"
        df.loc[tid, ("track", "genres")] = "[21]"
        df.loc[tid, ("track", "duration")] = 30
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path)
    return path


def make_fma(root: Path, tracks=FMA_TRACKS, seconds=6.0, sr=44100, real_mp3: Path | None = None) -> tuple[Path, Path]:
    """A miniature FMA: fma_metadata/tracks.csv + fma_small/ddd/dddddd.mp3 (44.1 kHz stereo MP3,
    or a link to ``real_mp3``). Returns (tracks.csv, audio dir)."""
    csv = write_fma_tracks_csv(root / "fma_metadata" / "tracks.csv", tracks)
    audio_dir = root / "fma_small"
    rng = np.random.default_rng(0)
    for tid, *_, present in tracks:
        if not present:
            continue
        p = fma_audio_path(audio_dir, tid)
        p.parent.mkdir(parents=True, exist_ok=True)
        if real_mp3 is not None:
            os.symlink(real_mp3, p)
        else:
            t = np.arange(int(seconds * sr)) / sr
            f0 = 110 * (1 + tid % 7)
            y = 0.3 * np.sin(2 * np.pi * f0 * t) + 0.02 * rng.standard_normal(len(t))
            sf.write(p, np.stack([y, 0.8 * y], axis=1).astype(np.float32), sr, format="MP3")
    return csv, audio_dir


# ---------------------------------------------------------------------------------------------
# Runs (metrics.json) and the report's HTML

GENRES = ["blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock"]


def _tracks(n_per_class: int = 4, labels=GENRES):
    import pandas as pd

    rows = [
        {
            "track_id": f"{g}/{g}.{i:05d}",
            "path": f"/data/gtzan/{g}/{g}.{i:05d}.flac",
            "label": g,
            "split": None,
            "group": None,
        }
        for g in labels
        for i in range(n_per_class)
    ]
    df = pd.DataFrame(rows)
    df.attrs["source"] = "/data/gtzan"
    return df


def make_run(
    root: Path,
    run_id: str,
    kind: str,
    backbone: str,
    head: str,
    skill: float,
    seed: int,
    k: int = 4,
    labels=GENRES,
    extra: dict | None = None,
    synthetic: bool = False,
) -> dict:
    """One run written by the real metrics writer: segment probabilities drawn so that about
    ``skill`` of the segments favour the true class."""
    rng = np.random.default_rng(seed)
    tracks = _tracks(labels=labels)
    tracks.attrs["synthetic"] = synthetic
    ev = Evaluation(list(labels))
    ids = tracks.track_id.to_numpy()
    order = rng.permutation(len(ids))
    lab = dict(zip(tracks.track_id, tracks.label))
    paths = dict(zip(tracks.track_id, tracks.path))
    for f in range(k):
        test = ids[order[f::k]]
        seg_ids = np.repeat(test, 6)
        proba = rng.dirichlet(np.ones(len(labels)), size=len(seg_ids))
        for t in test:  # a track leans to its true class with probability ``skill``
            true = labels.index(lab[t])
            target = true if rng.random() < skill else int(rng.choice([c for c in range(len(labels)) if c != true]))
            for i in np.flatnonzero(seg_ids == t):
                if rng.random() < 0.75:
                    proba[i, target] += 0.8
        proba /= proba.sum(1, keepdims=True)
        ev.add_fold(f"fold{f}", seg_ids, proba, lab, paths)
    m = ev.metrics()
    from embedkit.calibration import calibrate_run  # the trainers' hook: calibration.json + metrics block

    (root / run_id).mkdir(parents=True, exist_ok=True)
    m["calibration"] = calibrate_run(ev, root / run_id)
    m.update(
        run_id=run_id,
        kind=kind,
        name=f"{backbone}+{head}" if kind == "head" else f"{kind}-{backbone}",
        backbone=backbone,
        head=head,
        protocol={"type": "cv", "k": k, "seed": 0, "test_size": None, "grouped": False},
        dataset=dataset_summary(tracks, n_segments=len(tracks) * 6),
        spec={
            "name": backbone,
            "family": backbone.split("-")[0],
            "sample_rate": 16000,
            "embedding_dim": 200,
            "weights": "package data",
            "weights_sha256": "ab" * 32,
        },
        preprocess={
            "audio": {"clip_s": 30.0, "offset_s": 0.0, "pad_mode": "loop"},
            "segments": {"segment_s": 5.0, "hop_s": 5.0},
        },
        config={"head": head, "C": 1.0},
        train_seconds=3.5 + seed,
        inference_ms_per_track=0.8 * (seed + 1),
        model_bytes=40_000 * (seed + 1),
        n_params=2010 * (seed + 1),
    )
    m.update(extra or {})
    write_metrics(root / run_id, m)
    return json.loads((root / run_id / "metrics.json").read_text())


def make_runs(root: Path) -> list[dict]:
    root.mkdir(parents=True, exist_ok=True)
    # The layout embedkit.cnn writes: {fold: [one record per epoch]}; folds stop at different epochs.
    curves = {
        f"fold{f}": [
            {
                "epoch": e + 1,
                "phase": "train",
                "train_loss": 2.2 - 0.3 * e + 0.02 * f,
                "train_acc": 0.2 + 0.12 * e,
                "val_loss": 2.25 - 0.25 * e + 0.05 * f,
                "val_acc": 0.15 + 0.1 * e,
                "seconds": 3.1,
            }
            for e in range(6 - f)
        ]
        for f in range(4)
    }
    runs = [
        make_run(
            root,
            "r-musicnn-lr",
            "head",
            "musicnn-msd",
            "lr",
            0.9,
            1,
            extra={"extract_ms_per_track": 310.0, "extract_seconds": 31.0},
        ),
        make_run(
            root,
            "r-musicnn-lgbm",
            "head",
            "musicnn-msd",
            "lgbm",
            0.8,
            2,
            extra={"extract_ms_per_track": 310.0, "extract_seconds": 31.0},
        ),
        make_run(
            root,
            "r-musicnn-mlp",
            "head",
            "musicnn-msd",
            "mlp",
            0.85,
            3,
            extra={"extract_ms_per_track": 310.0, "extract_seconds": 31.0},
        ),
        make_run(
            root,
            "r-melstats-lr",
            "head",
            "melstats",
            "lr",
            0.6,
            4,
            extra={"extract_ms_per_track": 12.0, "extract_seconds": 1.2},
        ),
        make_run(
            root,
            "r-cnn",
            "cnn",
            "scratch-cnn",
            "cnn",
            0.5,
            5,
            extra={"learning_curves": curves, "inference_ms_per_track": 45.0},
        ),
        make_run(
            root,
            "r-finetune",
            "finetune",
            "musicnn-msd",
            "linear",
            0.88,
            6,
            extra={"learning_curves": {"train_loss": [1.0, 0.7, 0.5], "val_accuracy": [0.6, 0.7, 0.8]}},
        ),
    ]
    # A run with only the required fields: every optional section must render as "—".
    (root / "r-minimal").mkdir(exist_ok=True)
    minimal = {"run_id": "r-minimal", "kind": "head", "name": "minimal <run> & co", "track_accuracy": 0.421}
    (root / "r-minimal" / "metrics.json").write_text(json.dumps(minimal))
    return runs + [minimal]


# ---------------------------------------------------------------------------------------------


class _Checker(HTMLParser):
    """Collects tags and attributes; checks that every non-void element is closed in order."""

    VOID = {
        "meta",
        "br",
        "hr",
        "img",
        "input",
        "link",
        "col",
        "source",
        "wbr",
        "area",
        "base",
        "embed",
        "track",
        "param",
    }

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.attrs: list[tuple[str, str, str | None]] = []
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend((tag, k, v) for k, v in attrs)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend((tag, k, v) for k, v in attrs)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def check_html(html: str) -> _Checker:
    """Well-formed (HTML tag balance and XML parse) and self-contained; returns the parse."""
    c = _Checker()
    c.feed(html)
    c.close()
    assert not c.errors, c.errors[:5]
    assert not c.stack, f"unclosed: {c.stack}"
    ET.fromstring(re.sub(r"^<!DOCTYPE html>", "", html.lstrip()))  # raises on any XML error
    assert not re.search(r"https?:", html, re.I), re.search(r".{40}https?:.{40}", html, re.I)
    assert (
        "<script" not in html.lower() and "<link" not in html.lower() and "@import" not in html and "url(" not in html
    )
    for tag, attr, val in c.attrs:
        assert attr != "src", f"<{tag} src=...>"
        if attr in ("href", "xlink:href"):
            assert (val or "").startswith("#"), f"<{tag} {attr}={val!r}> leaves the page"
    return c
