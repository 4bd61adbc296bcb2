"""Learning from a library: labels from the files' own genre tags (``--labels-from-tags``), the
taxonomy (normalising, ``--genre-map``, ``--min-tracks``), artist groups, untagged files tagged
next; the ``labels`` table, ``embedkit labels export|import`` and ``embedkit audit``."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

FFMPEG = shutil.which("ffmpeg")

# class index in embedkit.synth -> (the raw genre spellings a person's files carry, artists)
LIBRARY = {
    0: (["Drone", "drone ", "DRONE", "Drone", "drone", "Drone; Ambient"], ["Stars of the Lid", "Eliane Radigue"]),
    1: (["Hip-Hop", "Hip Hop", "hiphop", "HIP-HOP", "Hip-Hop", "hip hop"], ["MF DOOM", "Madlib"]),
    2: (["Chime", "Chimes", "chime", "Chimes", "Chime", "Chime"], ["Bell Choir", "the Ringers"]),
}
BELOW_FLOOR = (3, ["Noise", "noise"])  # 2 tracks: under --min-tracks 3
MAP = """
drop = ["ambient"]
[map]
"chimes" = "Chime"
"""


def _clip(label: int, seed: int, sr: int = 16000, seconds: float = 6.0) -> np.ndarray:
    from embedkit.synth import make_clip

    return make_clip(label, seed, sr, seconds)


def _tag(path: Path, genre: str | None, artist: str | None) -> None:
    """Genre (";"-separated values) and artist tags in the file's own format, with mutagen."""
    import mutagen
    from mutagen.id3 import ID3, TCON, TPE1

    genres = [g for g in genre.split(";")] if genre else []
    genres = [g if i == 0 else g.strip() for i, g in enumerate(genres)]
    ext = path.suffix.lower()
    if ext in (".mp3", ".wav"):
        if ext == ".wav":
            from mutagen.wave import WAVE

            f = WAVE(path)
            f.add_tags()
            tags = f.tags
        else:
            tags = ID3()
        if genres:
            tags.add(TCON(encoding=3, text=genres))
        if artist:
            tags.add(TPE1(encoding=3, text=[artist]))
        if ext == ".wav":
            f.save()
        else:
            tags.save(path)
        return
    f = mutagen.File(path)
    if ext == ".m4a":
        if genres:
            f["\xa9gen"] = genres
        if artist:
            f["\xa9ART"] = [artist]
    else:  # Vorbis comments (FLAC, Ogg)
        if genres:
            f["GENRE"] = genres
        if artist:
            f["ARTIST"] = [artist]
    f.save()


def _write(path: Path, y: np.ndarray, sr: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".m4a":
        wav = path.with_suffix(".tmp.wav")
        sf.write(wav, y, sr)
        subprocess.run(
            [FFMPEG, "-v", "error", "-y", "-i", str(wav), "-c:a", "aac", "-b:a", "64k", str(path)], check=True
        )
        wav.unlink()
    else:
        sf.write(path, y, sr)


def make_tagged_library(root: Path, sr: int = 16000, seconds: float = 6.0) -> Path:
    """A person's library in no particular layout (``Artist/track.ext``), tagged in FLAC / Ogg /
    WAV (ID3) / MP3 / M4A (when ffmpeg is there): 3 genres x 6 tracks by 2 artists each, spelt
    inconsistently ("Hip-Hop", "hip hop", ...), one misspelling ("Chimes", merged by the map next
    to it), one class of 2 tracks (under a floor of 3), 3 untagged tracks; ``root.parent /
    map.toml`` is the genre map."""
    exts = [".flac", ".ogg", ".wav", ".mp3"] + ([".m4a"] if FFMPEG else [])
    n = 0
    for label, (genres, artists) in {**LIBRARY, BELOW_FLOOR[0]: (BELOW_FLOOR[1], ["Noise Unit"])}.items():
        for i, g in enumerate(genres):
            artist = artists[i % len(artists)]
            p = root / artist.replace(" ", "_") / f"{label}-{i}{exts[n % len(exts)]}"
            _write(p, _clip(label, i, sr, seconds), sr)
            _tag(p, g, artist)
            n += 1
    for i in range(3):  # untagged: what gets tagged next
        p = root / "inbox" / f"new-{i}{exts[i % len(exts)]}"
        _write(p, _clip(i, 100 + i, sr, seconds), sr)
    (root.parent / "map.toml").write_text(MAP)
    return root


@pytest.fixture(scope="session")
def tagged_library(tmp_path_factory) -> Path:
    return make_tagged_library(tmp_path_factory.mktemp("library") / "music")


def _labels(root: Path, min_tracks: int = 3, genre_map: bool = True):
    from embedkit.taxonomy import TagLabels

    return TagLabels(str(root.parent / "map.toml") if genre_map else None, min_tracks)


def _one_line_error(res, *needles: str) -> None:
    assert res.exit_code != 0
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    for n in needles:
        assert n in lines[0], lines[0]


# --- the taxonomy ------------------------------------------------------------------------------


def test_genre_spellings_are_one_genre():
    from embedkit.taxonomy import artist_key, genre_key

    assert {genre_key(s) for s in ("Hip-Hop", "Hip Hop", "hiphop", "HIP-HOP", " hip  hop ")} == {"hiphop"}
    assert genre_key("R&B") == genre_key("R and B") == "randb"
    assert genre_key("Électro") == "electro"
    assert artist_key("The Beatles") == artist_key("the beatles") and artist_key("MF DOOM feat. Madlib") == "mfdoom"


def test_genre_map_merges_renames_drops_and_folds_subgenres():
    from embedkit.taxonomy import GenreMap, Taxonomy

    gm = GenreMap.from_dict(
        {"drop": ["Other"], "map": {"hip hop": "Hip-Hop", "rap": "Hip-Hop", "alt rock": "Rock", "indie-rock": "Rock"}}
    )
    values = [
        ["Hip Hop"],
        ["rap"],
        ["Rap"],
        ["Alt. Rock"],
        ["Indie Rock"],
        ["rock"],
        ["Other"],
        ["Other", "Jazz"],
        None,
    ]
    tax = Taxonomy.build(values, gm, min_tracks=1)
    got = [tax.label_of(v)[0] for v in values]
    # a dropped value is skipped for the next one (multi-valued: the primary that maps to a class)
    assert got == ["Hip-Hop", "Hip-Hop", "Hip-Hop", "Rock", "Rock", "rock", None, "Jazz", None]
    assert tax.label_of(None) == (None, "untagged") and tax.label_of(["Other"])[1] == "dropped by the genre map"
    rec = tax.record(values)
    assert rec["classes"] == {"Hip-Hop": 3, "Jazz": 1, "Rock": 2, "rock": 1}
    assert rec["mapping"]["rap"] == rec["mapping"]["Rap"] == "Hip-Hop" and rec["mapping"]["Other"] is None
    assert rec["multi_valued_tracks"] == 1 and rec["tracks_not_used"] == {"untagged": 1, "dropped by the genre map": 1}
    only = Taxonomy.build(values, GenreMap.from_dict({"unmapped": "drop", "map": {"rap": "Hip-Hop"}}), 1)
    assert [only.label_of(v)[0] for v in values[:3]] == [None, "Hip-Hop", "Hip-Hop"]


def test_min_tracks_floor_drops_small_classes_and_says_why():
    from embedkit.taxonomy import Taxonomy

    values = [["A"]] * 5 + [["B"]] * 2
    tax = Taxonomy.build(values, None, min_tracks=3)
    assert tax.label_of(["A"]) == ("A", "")
    assert tax.label_of(["B"]) == (None, "class 'B' has 2 track(s), below --min-tracks 3")
    assert tax.record(values)["dropped_classes"] == {"B": "2 track(s), below --min-tracks 3"}


@pytest.mark.parametrize(
    "text,needle",
    [
        ("[map\nrock = 'Rock'", "not valid TOML"),
        ('[map]\n"rock" = ""\n', "'rock' maps to nothing"),
        ('[map]\n"rock" = 3\n', "'rock' maps to nothing"),
        ('drop = ["rock"]\n[map]\n"rock" = "Rock"\n', "both mapped and dropped"),
        ('[genres]\n"rock" = "Rock"\n', "unknown key(s) ['genres']"),
        ('unmapped = "maybe"\n', "unmapped must be"),
    ],
)
def test_bad_genre_maps_are_one_error_naming_the_file(tmp_path, text, needle):
    from embedkit.errors import DatasetError
    from embedkit.taxonomy import GenreMap

    f = tmp_path / "map.toml"
    f.write_text(text)
    with pytest.raises(DatasetError) as e:
        GenreMap.load(f)
    assert str(e.value).startswith(str(f)) and needle in str(e.value) and "\n" not in str(e.value)


# --- a library labelled by its tags ------------------------------------------------------------


def test_library_tags_in_every_format_are_read(tagged_library):
    from embedkit.tags import read_library_tags

    seen = {}
    for f in sorted(tagged_library.rglob("*")):
        if f.is_file() and f.parent.name != "inbox":
            t = read_library_tags(f)
            assert t.genres and t.artist, f
            seen[f.suffix] = t
    assert {".flac", ".ogg", ".wav", ".mp3"} <= set(seen) and (FFMPEG is None or ".m4a" in seen)
    assert read_library_tags(tagged_library / "inbox" / "new-0.flac").genres is None


def test_genres_embedkit_wrote_are_told_apart_from_a_persons(tagged_library, tmp_path):
    from embedkit.deploy.filetags import write_genres
    from embedkit.tags import read_library_tags

    for src in sorted(tagged_library.glob("inbox/*")) + sorted(tagged_library.glob("Noise_Unit/*")):
        f = tmp_path / src.name
        shutil.copyfile(src, f)
        assert not read_library_tags(f).written_by_embedkit
        ch = write_genres(f, ["Drone"], scores=[0.9], model="m" * 64, overwrite=True)
        assert ch.status == "written", (f, ch.reason)
        t = read_library_tags(f)
        assert t.genres == ["Drone"] and t.written_by_embedkit, f


def test_from_tags_learns_the_taxonomy_groups_by_artist_and_leaves_the_untagged(tagged_library):
    from embedkit.datasets import load_dataset

    df = load_dataset(tagged_library, labels_from_tags=_labels(tagged_library))
    assert df["label"].value_counts().to_dict() == {"Chime": 6, "Drone": 6, "Hip-Hop": 6}  # "Chimes" merged
    assert df["group"].nunique() == 6 and df["group"].str.startswith("artist:").all()
    assert df.groupby("group")["label"].nunique().max() == 1
    assert sorted(Path(p).name for p in df.attrs["untagged"]) == ["new-0.flac", "new-1.ogg", "new-2.wav"]
    assert {Path(p).parent.name for p, _ in df.attrs["not_used"]} == {"Noise_Unit"}
    tax = df.attrs["taxonomy"]
    assert tax["dropped_classes"] == {"Noise": "2 track(s), below --min-tracks 3"}
    assert tax["mapping"]["Chimes"] == "Chime" and tax["mapping"]["hiphop"] == "Hip-Hop"
    assert tax["dropped_values"] == {"Ambient": "dropped by the genre map"} and tax["multi_valued_tracks"] == 1
    # without the map the misspelling is a class of its own (and the floor removes nothing else)
    raw = load_dataset(tagged_library, labels_from_tags=_labels(tagged_library, min_tracks=1, genre_map=False))
    assert set(raw["label"]) == {"Chime", "Chimes", "Drone", "Hip-Hop", "Noise"}


def test_folds_of_a_tag_library_never_split_an_artist(tagged_library):
    from embedkit.datasets import load_dataset
    from embedkit.evaluate import make_folds, protocol_dict

    df = load_dataset(tagged_library, labels_from_tags=_labels(tagged_library))
    group = df.set_index("track_id")["group"]
    folds = make_folds(df, "cv", 2, seed=0)
    for f in folds:
        assert not set(group[f.train]) & set(group[f.test])
    assert protocol_dict("cv", 2, 0, 0.2, df)["group_by"] == "artist"


def test_bad_library_input_is_one_line_each(tagged_library, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from embedkit.cli import app

    monkeypatch.chdir(tmp_path)  # nothing may reach a cache/ here; if it did, not in the project

    bad = tmp_path / "bad.toml"
    bad.write_text("[map\n")
    res = CliRunner().invoke(
        app, ["extract", str(tagged_library), "-b", "melstats", "--labels-from-tags", "--genre-map", str(bad)]
    )
    _one_line_error(res, "bad.toml", "not valid TOML")
    nothing = tmp_path / "nothing.toml"
    nothing.write_text('[map]\n"chimes" = " "\n')
    res = CliRunner().invoke(
        app, ["extract", str(tagged_library), "-b", "melstats", "--labels-from-tags", "--genre-map", str(nothing)]
    )
    _one_line_error(res, "nothing.toml", "'chimes' maps to nothing")
    untagged = tmp_path / "untagged"
    for i in range(2):
        _write(untagged / f"x{i}.flac", _clip(0, i), 16000)
    res = CliRunner().invoke(app, ["extract", str(untagged), "-b", "melstats", "--labels-from-tags"])
    _one_line_error(res, "none of its 2 audio file(s) has a genre tag")
    res = CliRunner().invoke(app, ["extract", str(untagged), "-b", "melstats", "--genre-map", str(bad)])
    _one_line_error(res, "--genre-map and --min-tracks go with --labels-from-tags")
    res = CliRunner().invoke(
        app, ["extract", str(tagged_library), "-b", "melstats", "--labels-from-tags", "--min-tracks", "7"]
    )
    _one_line_error(res, "0 class(es) left", "--min-tracks 7")


# --- labels in the results database -------------------------------------------------------------


def test_labels_import_export_follow_the_content(tagged_library, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from embedkit.cli import app
    from embedkit.deploy.resultsdb import ResultsDB
    from embedkit.identity import fingerprint

    monkeypatch.chdir(tmp_path)
    song = tagged_library / "inbox" / "new-0.flac"
    moved = tmp_path / "elsewhere.flac"
    shutil.copyfile(song, moved)
    csv_in = tmp_path / "in.csv"
    csv_in.write_text(f"path,label\n{song},Drone\n{tagged_library / 'inbox' / 'new-1.ogg'},Hip-Hop\n")
    db = str(tmp_path / "lib.sqlite")
    for _ in range(2):  # idempotent: the same import twice is the same rows
        res = CliRunner().invoke(app, ["labels", "import", str(csv_in), "--db", db, "--reviewer", "ana"])
        assert res.exit_code == 0, res.output
    # a second reviewer labels the same song under another path: both labels are kept
    (tmp_path / "b.csv").write_text(f"path,label,reviewer\n{moved},Chime,ben\n")
    assert CliRunner().invoke(app, ["labels", "import", str(tmp_path / "b.csv"), "--db", db]).exit_code == 0
    with ResultsDB(db) as rdb:
        rows = rdb.label_rows()
        fp = fingerprint(song, scheme=rdb.scheme)
        assert len(rows) == 3 and {r["reviewer"] for r in rows if r["fingerprint"] == fp} == {"ana", "ben"}
        assert rdb.current_labels()[fp]["label"] == "Chime"  # the latest label of the content
    out = tmp_path / "out.csv"
    assert CliRunner().invoke(app, ["labels", "export", "--db", db, "-o", str(out)]).exit_code == 0
    import pandas as pd

    df = pd.read_csv(out)
    assert list(df.columns[:5]) == ["fingerprint", "path", "label", "source", "reviewer"] and len(df) == 3
    # the export imports back into another database unchanged (by fingerprint)
    db2 = str(tmp_path / "other.sqlite")
    assert CliRunner().invoke(app, ["labels", "import", str(out), "--db", db2]).exit_code == 0
    with ResultsDB(db2) as rdb:
        assert sorted((r["fingerprint"], r["label"], r["reviewer"]) for r in rdb.label_rows()) == sorted(
            zip(df["fingerprint"], df["label"], df["reviewer"])
        )
    # a vanished file: one line for its row, the rest imported, exit non-zero
    (tmp_path / "c.csv").write_text(f"path,label\n{tmp_path / 'gone.flac'},Drone\n{song},Drone\n")
    res = CliRunner().invoke(app, ["labels", "import", str(tmp_path / "c.csv"), "--db", db, "--reviewer", "cy"])
    assert res.exit_code == 1 and "c.csv:2: " in res.output and "1 of 2 label(s) imported" in res.output
    (tmp_path / "d.csv").write_text("file,genre\nx,y\n")
    res = CliRunner().invoke(app, ["labels", "import", str(tmp_path / "d.csv"), "--db", db])
    _one_line_error(res, "d.csv", "needs a label column")


def _tagged_db(db: str, files: list[Path], decisions: list[str], labels=("Chime", "Drone", "Hip-Hop")) -> str:
    """A results database as `embedkit tag` leaves it: one model, a row per file."""
    from embedkit.deploy.resultsdb import ResultsDB
    from embedkit.identity import fingerprint

    with ResultsDB(db) as rdb:
        rdb.register_model("m" * 64, "head", list(labels), "/nowhere/run", "run-1")
        rows = []
        for f, d in zip(files, decisions):
            p = {c: (0.9 if c == d else 0.05) for c in labels}
            rows.append(
                {
                    "fingerprint": fingerprint(f, scheme=rdb.scheme),
                    "model_id": "m" * 64,
                    "path": str(f),
                    "decision": d,
                    "top_label": d,
                    "top_p": 0.9,
                    "probabilities": p,
                }
            )
        rdb.write(rows)
    return db


def test_audit_ranks_tags_that_disagree_with_a_confident_decision(tagged_library, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from embedkit.cli import app
    from embedkit.deploy.library import audit, audit_scores
    from embedkit.tags import read_library_tags

    monkeypatch.chdir(tmp_path)
    files = sorted(f for f in tagged_library.rglob("*") if f.is_file() and f.parent.name in ("MF_DOOM", "Bell_Choir"))
    truth = {"MF_DOOM": "Hip-Hop", "Bell_Choir": "Chime"}
    decisions = [truth[f.parent.name] for f in files]
    decisions[0] = "Drone" if decisions[0] != "Drone" else "Chime"  # the model disagrees with one tag
    vanished = tmp_path / "gone.flac"
    shutil.copyfile(files[1], vanished)
    db = _tagged_db(str(tmp_path / "lib.sqlite"), files + [vanished], decisions + ["Drone"])
    vanished.unlink()  # a file that has since vanished is left out, not an error
    rows = audit(db, out=tmp_path / "audit.csv")
    assert [r["path"] for r in rows] == [str(files[0])]
    r = rows[0]
    assert r["decision"] == decisions[0] and r["tag_class"] == truth[files[0].parent.name]
    assert r["score"] == pytest.approx(0.95) and r["tag"] == "; ".join(read_library_tags(files[0]).genres)
    res = CliRunner().invoke(app, ["audit", "--db", db])
    assert res.exit_code == 0 and "1 track(s) whose tag disagrees" in res.output
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    assert audit_scores(p, np.array([0, 1]), np.array([2, 1])).tolist() == pytest.approx([0.9, 0.0])


@pytest.mark.slow
def test_run_labels_from_tags_trains_the_taxonomy_and_tags_the_untagged(tagged_library, tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from embedkit.cli import app
    from embedkit.deploy.resultsdb import ResultsDB

    monkeypatch.chdir(tmp_path)
    args = ["run", str(tagged_library), "--labels-from-tags", "--genre-map", str(tagged_library.parent / "map.toml")]
    args += ["--min-tracks", "3", "--quick", "--backbones", "melstats", "--heads", "lr", "--no-cnn", "--threads", "1"]
    res = CliRunner().invoke(app, [*args, "--workers", "2", "--db", "lib.sqlite"])
    assert res.exit_code == 0, res.output
    assert "dropped Noise: 2 track(s), below --min-tracks 3" in res.output and "dropped Ambient" in res.output
    assert "tagged 3 untagged file(s) with melstats+lr into lib.sqlite" in res.output
    (m,) = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/metrics.json")]
    assert m["dataset"]["class_counts"] == {"Chime": 6, "Drone": 6, "Hip-Hop": 6}
    assert m["dataset"]["taxonomy"]["mapping"]["Chimes"] == "Chime"
    assert m["protocol"]["grouped"] and m["protocol"]["group_by"] == "artist"
    html = (tmp_path / "reports" / "report.html").read_text()
    assert "grouped by artist" in html and "Chime &larr; Chimes" in html  # what the taxonomy merged
    assert "dropped</span> Noise: 2 track(s), below --min-tracks 3" in html
    with ResultsDB(tmp_path / "lib.sqlite") as rdb:
        got = {Path(r["path"]).name: r["decision"] for r in rdb.rows()}
    # the untagged clips were made from the classes drone, pulse (tagged Hip-Hop), chime
    assert got == {"new-0.flac": "Drone", "new-1.ogg": "Hip-Hop", "new-2.wav": "Chime"}
    from embedkit.deploy.review import _track_vectors, build_queue

    model_id, _, queue = build_queue("lib.sqlite", random_share=0)  # the review queue of what was tagged
    vectors = _track_vectors("lib.sqlite", model_id, [q.fingerprint for q in queue])  # the queue's space
    assert len(queue) == 3 and len(vectors) == 3 and len({v.shape for v in vectors.values()}) == 1

    # reviewed labels for the newly tagged files (one kept apart as an audit sample) -> retrain
    inbox = tagged_library / "inbox"
    (tmp_path / "labels.csv").write_text(
        f"path,label,source\n{inbox / 'new-0.flac'},Drone,review\n{inbox / 'new-2.wav'},Chime,review\n"
        f"{inbox / 'new-1.ogg'},Hip-Hop,audit-sample\n"
    )
    assert CliRunner().invoke(app, ["labels", "import", "labels.csv", "--db", "lib.sqlite"]).exit_code == 0
    (old_run,) = (tmp_path / "runs").glob("*")
    res = CliRunner().invoke(app, ["retrain", str(old_run), "--db", "lib.sqlite", "--threads", "1", "--workers", "2"])
    assert res.exit_code == 0, res.output
    assert "18 dataset track(s) + 2 label(s)" in res.output and "3 extracted" in res.output  # decoded once
    assert "audit labels (1), old model: 1.000" in res.output and "new model: 1.000" in res.output
    new_runs = sorted(set((tmp_path / "runs").glob("*")) - {old_run})
    m2 = json.loads((new_runs[0] / "metrics.json").read_text())
    assert m2["dataset"]["n_tracks"] == 20 and m2["dataset"]["class_counts"] == {"Chime": 7, "Drone": 7, "Hip-Hop": 6}
    assert m2["dataset"]["source"] == m["dataset"]["source"] and m2["dataset"]["labels_from"] == "lib.sqlite"

    # a second retrain decodes nothing: every embedding is read from the store by fingerprint
    import embedkit.extract

    monkeypatch.setattr(embedkit.extract, "extract", lambda *a, **k: pytest.fail("retrain decoded audio"))
    res = CliRunner().invoke(app, ["retrain", str(old_run), "--db", "lib.sqlite", "--threads", "1", "--promote"])
    assert res.exit_code == 0, res.output
    assert "0 extracted" in res.output and "promoted" in res.output and "0 of 3 decision(s) changed" in res.output

    # the retrained run retrains in turn: the same dataset and labels (not counted twice), no decode
    res = CliRunner().invoke(app, ["retrain", str(new_runs[0]), "--db", "lib.sqlite", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "18 dataset track(s) + 2 label(s)" in res.output and "0 extracted" in res.output, res.output
    newest = sorted(set((tmp_path / "runs").glob("*")) - {old_run, *new_runs})
    m3 = json.loads((newest[-1] / "metrics.json").read_text())
    assert m3["dataset"]["n_tracks"] == 20 and m3["dataset"]["class_counts"] == m2["dataset"]["class_counts"]
    # a run whose dataset its store does not hold is refused, never given the store's last dataset
    import shutil

    odd = tmp_path / "odd-run"
    shutil.copytree(newest[-1], odd)
    m3["dataset"]["source"] = str(tmp_path / "elsewhere")
    (odd / "metrics.json").write_text(json.dumps(m3))
    res = CliRunner().invoke(app, ["retrain", str(odd), "--db", "lib.sqlite", "--threads", "1"])
    _one_line_error(res, "elsewhere is not recorded in the store")


# --- the review queue and page ----------------------------------------------------------------


def test_choose_to_label_covers_untaught_regions_with_typical_tracks():
    from embedkit.deploy.review import choose_to_label

    grid = np.array([[x, y] for x in (-1, 0, 1) for y in (-1, 0, 1)], dtype=float)
    plus = np.array([[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1]], dtype=float)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    X = np.vstack([grid, [[3.5, 0.0]], plus + centres[1], [[12, 0], [8, 0]], plus + centres[2]])
    blob = np.repeat([0, 1, 2], (10, 7, 5))  # region 0's 10th track is an outlier
    # cold start (no model): one typical track per region (its centre), the largest region first
    got = choose_to_label(None, 3, features=X)
    assert [tuple(X[i]) for i in got] == [tuple(c) for c in centres]
    # a labelled track in a region: it is taught; the picks go to the other regions
    got = choose_to_label(None, 2, features=X, labelled=centres[:1])
    assert sorted(blob[i] for i in got) == [1, 2]
    # with a model: the untaught regions still come largest first (measured: chasing its doubts
    # taught less); asked for every candidate, the least certain come first
    prob = np.where(blob[:, None] == 2, [0.5, 0.45, 0.05], [0.9, 0.05, 0.05])
    assert [blob[i] for i in choose_to_label(prob, 2, features=X, labelled=centres[:1])] == [1, 2]
    prob = np.tile([0.9, 0.05, 0.05], (len(X), 1))
    prob[[4, 12]] = [[0.4, 0.35, 0.25], [0.34, 0.33, 0.33]]
    assert choose_to_label(prob, 99, features=X)[:2] == [12, 4]
    # without track vectors it works in probability space; edge sizes
    assert len(set(choose_to_label(prob, 2))) == 2
    assert choose_to_label(prob, 0, features=X) == [] and sorted(choose_to_label(prob, 99, features=X)) == list(
        range(len(X))
    )


def _review_client(db: str, **kw):
    from fastapi.testclient import TestClient

    from embedkit.deploy.review import create_review_app

    client = TestClient(create_review_app(db, **kw), base_url="http://127.0.0.1:8770")
    token = re.search(r'const TOKEN = "([^"]+)"', client.get("/").text).group(1)
    return client, {"X-Review-Token": token}


def test_review_queue_and_answers_land_in_the_labels_table(tagged_library, tmp_path):
    from embedkit.deploy.resultsdb import ResultsDB

    files = sorted(f for f in tagged_library.rglob("*") if f.is_file() and f.parent.name in ("MF_DOOM", "Madlib"))
    decisions = ["Hip-Hop"] * len(files)
    decisions[0] = "Drone"  # disagrees with its tag
    db = _tagged_db(str(tmp_path / "lib.sqlite"), files, decisions)
    client, auth = _review_client(db, n=6, random_share=0.2)
    first = client.get("/api/next", params={"reviewer": "ana"}).json()
    assert first["total"] == 6 and first["labelled"] == 0 and first["classes"] == ["Chime", "Drone", "Hip-Hop"]
    kinds = {q.kind for q in client.app.state.review.queue}
    assert kinds == {"teach", "disagree", "random"}
    fp = first["item"]["fingerprint"]
    # nothing changes without the page's token, nor from a page that names another host
    assert client.post("/api/label", json={"fingerprint": fp, "action": "accept"}).status_code == 403
    assert client.get("/api/next", headers={"Host": "evil.example:8770"}).status_code == 421
    # the Host reading is serve's (ports and IPv6 brackets): the loopback names all pass
    for host in ("localhost:8770", "127.0.0.1", "[::1]:8770", "LOCALHOST"):
        assert client.get("/api/next", headers={"Host": host}).status_code == 200, host
    r = client.post("/api/label", json={"fingerprint": fp, "action": "accept", "reviewer": "ana"}, headers=auth)
    assert r.status_code == 200 and r.json()["label"] == first["item"]["decision"]
    # a second reviewer answering the same track at once keeps both labels
    r = client.post(
        "/api/label", json={"fingerprint": fp, "action": "correct", "label": "Chime", "reviewer": "ben"}, headers=auth
    )
    assert r.status_code == 200
    nxt = client.get("/api/next", params={"reviewer": "ana"}).json()
    assert nxt["item"]["fingerprint"] != fp and nxt["labelled"] == 1
    skip = nxt["item"]["fingerprint"]
    r = client.post("/api/label", json={"fingerprint": skip, "action": "skip", "reviewer": "ana"}, headers=auth)
    assert r.status_code == 200
    assert client.get("/api/next", params={"reviewer": "ana"}).json()["item"]["fingerprint"] != skip
    assert client.get("/api/next", params={"reviewer": "ben"}).json()["item"]["fingerprint"] == skip  # ana's skip
    bad = client.post("/api/label", json={"fingerprint": "b3-nope", "action": "accept"}, headers=auth)
    assert bad.status_code == 400 and "not a track of this review queue" in bad.json()["error"]
    with ResultsDB(db) as rdb:
        rows = {(r["reviewer"], r["label"], r["source"]) for r in rdb.label_rows()}
    src = "audit-sample" if first["item"]["kind"] == "random" else "review"
    assert rows == {("ana", first["item"]["decision"], src), ("ben", "Chime", src)}


def test_review_audio_is_that_file_only_with_ranges(tagged_library, tmp_path):
    files = sorted(f for f in tagged_library.rglob("*.flac") if f.parent.name != "inbox")[:2]
    moved = [tmp_path / f.name for f in files]
    for a, b in zip(files, moved):
        shutil.copyfile(a, b)
    db = _tagged_db(str(tmp_path / "lib.sqlite"), moved, ["Drone", "Drone"])
    client, _ = _review_client(db, n=2, random_share=0)
    q = client.app.state.review.queue
    data = Path(q[0].path).read_bytes()
    r = client.get(f"/audio/{q[0].fingerprint}", headers={"Range": "bytes=10-99"})
    assert r.status_code == 206 and r.content == data[10:100]
    assert r.headers["content-range"] == f"bytes 10-99/{len(data)}"
    assert client.get(f"/audio/{q[0].fingerprint}").content == data
    assert client.get(f"/audio/{q[0].fingerprint}", headers={"Range": f"bytes={len(data) + 5}-"}).status_code == 416
    assert client.get("/audio/b3-unknown").status_code == 404
    assert client.get("/audio/..%2F..%2Fetc%2Fpasswd").status_code == 404
    Path(q[1].path).unlink()  # a file that vanished since it was tagged: 410, its entry still there
    r = client.get(f"/audio/{q[1].fingerprint}")
    assert r.status_code == 410 and "vanished" in r.json()["error"]


@pytest.mark.slow
def test_review_page_in_a_real_browser(tagged_library, tmp_path):
    """Headless Chromium over the DevTools protocol: play the track (its bytes come through the
    audio endpoint), accept with "a", correct with "2", skip with "s", reload: the labels are in
    the database, the page picks up where it was, and nothing is logged to the console."""
    import json
    import time

    from test_serve import CHROMIUM, DevTools

    from embedkit.deploy.resultsdb import ResultsDB
    from embedkit.deploy.review import create_review_app

    from servers import running

    if CHROMIUM is None:
        pytest.skip("Chromium not installed (Debian: apt-get install -y chromium)")
    files = sorted(f for f in tagged_library.rglob("*") if f.is_file() and f.parent.name in ("MF_DOOM", "Madlib"))
    files = [f for f in files if f.suffix in (".flac", ".ogg", ".wav", ".mp3")][:4]
    db = _tagged_db(str(tmp_path / "lib.sqlite"), files, ["Hip-Hop", "Drone", "Hip-Hop", "Chime"])
    app = create_review_app(db, n=4, random_share=0.25)
    queue = list(app.state.review.queue)
    with running(app) as base:
        dt = DevTools(tmp_path / "profile")
        try:
            target = dt.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            sid = dt.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                dt.send(f"{domain}.enable", session=sid)

            def evaluate(expr: str, **kw):
                params = {"expression": expr, "returnByValue": True, **kw}
                return dt.send("Runtime.evaluate", params, session=sid)["result"].get("value")

            def wait_for(expr: str, what: str, timeout: float = 30):
                deadline = time.monotonic() + timeout
                while not evaluate(expr):
                    assert time.monotonic() < deadline, what
                    time.sleep(0.1)

            def shown() -> str:
                wait_for("document.getElementById('status').dataset.state === 'ready'", "page not ready")
                return evaluate("document.getElementById('name').textContent")

            def key(k: str):
                for t in ("keyDown", "keyUp"):
                    dt.send("Input.dispatchKeyEvent", {"type": t, "key": k, "text": k}, session=sid)

            dt.send("Page.navigate", {"url": f"{base}/"}, session=sid)
            assert shown() == Path(queue[0].path).name
            evaluate("document.getElementById('player').play().then(() => 1)", awaitPromise=True, userGesture=True)
            wait_for("document.getElementById('player').currentTime > 0.2", "the track did not play")
            assert evaluate("document.getElementById('player').error") is None
            key("a")  # accept
            wait_for(f"document.getElementById('name').textContent === {json.dumps(Path(queue[1].path).name)}", "a")
            key("2")  # correct: the second class
            wait_for(f"document.getElementById('name').textContent === {json.dumps(Path(queue[2].path).name)}", "2")
            key("s")  # skip
            wait_for(f"document.getElementById('name').textContent === {json.dumps(Path(queue[3].path).name)}", "s")
            dt.send("Page.reload", session=sid)
            time.sleep(0.3)
            assert shown() == Path(queue[3].path).name  # nothing lost, the skip remembered
            assert "2 labelled, 1 left" in evaluate("document.getElementById('progress').textContent")
            dt.send("Runtime.evaluate", {"expression": "1"}, session=sid)  # flush pending events
        finally:
            dt.close()
    with ResultsDB(db) as rdb:
        got = {r["fingerprint"]: (r["label"], r["source"]) for r in rdb.label_rows()}
    src = {q.fingerprint: "audit-sample" if q.kind == "random" else "review" for q in queue}
    assert got == {
        queue[0].fingerprint: (queue[0].decision, src[queue[0].fingerprint]),
        queue[1].fingerprint: ("Drone", src[queue[1].fingerprint]),
    }
    kinds = ("Runtime.exceptionThrown", "Runtime.consoleAPICalled", "Log.entryAdded")
    bad = [e for e in dt.events if e.get("method") in kinds]
    assert not bad, bad[:3]


def test_two_reviewers_at_once_lose_no_label_and_missing_databases_are_one_line(tagged_library, tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from typer.testing import CliRunner

    from embedkit.cli import app
    from embedkit.deploy.resultsdb import ResultsDB
    from embedkit.deploy.review import ReviewState

    monkeypatch.chdir(tmp_path)
    files = sorted(f for f in tagged_library.rglob("*") if f.is_file() and f.parent.name != "inbox")[:8]
    db = _tagged_db(str(tmp_path / "lib.sqlite"), files, ["Drone"] * len(files))
    states = [ReviewState(db, n=8, random_share=0) for _ in range(2)]  # two servers, one database
    jobs = [(s, q.fingerprint, who) for s, who in zip(states, ("ana", "ben")) for q in s.queue]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda j: j[0].answer(j[1], "correct", "Chime", j[2]), jobs))
    with ResultsDB(db) as rdb:
        assert len(rdb.label_rows()) == 16
    for args in (["audit"], ["review"], ["labels", "export", "-o", "x.csv"]):
        res = CliRunner().invoke(app, [*args, "--db", "nope.sqlite"])
        _one_line_error(res, "nope.sqlite: no such results database")
    assert not (tmp_path / "nope.sqlite").exists()


@pytest.mark.slow
def test_promote_rewrites_only_changed_decisions_and_untag_restores_the_originals(
    tagged_library, tmp_path, monkeypatch
):
    import hashlib
    import json

    from typer.testing import CliRunner

    from embedkit.cli import app
    from embedkit.tags import read_library_tags

    monkeypatch.chdir(tmp_path)
    music = tmp_path / "music"
    shutil.copytree(tagged_library, music)  # files get written: a copy of the session's library
    inbox = sorted((music / "inbox").iterdir())
    digest = lambda: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in inbox}  # noqa: E731
    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    args = ["--genre-map", tagged_library.parent / "map.toml", "--min-tracks", 3, "--quick", "--backbones", "melstats"]
    res = run(
        "run", music, "--labels-from-tags", *args, "--heads", "lr", "--no-cnn", "--threads", 1, "--db", "lib.sqlite"
    )
    assert res.exit_code == 0, res.output
    (old,) = (tmp_path / "runs").iterdir()
    originals = digest()
    # a person says the drone tracks are "Chime" (the dataset's and the new one): the drone file's
    # decision changes. Labelled before the tags are written: the label follows the rewritten file.
    drones = [*sorted((music / "Stars_of_the_Lid").iterdir()), *sorted((music / "Eliane_Radigue").iterdir()), inbox[0]]
    (tmp_path / "labels.csv").write_text("path,label\n" + "".join(f"{p},Chime\n" for p in drones))
    assert run("labels", "import", "labels.csv", "--db", "lib.sqlite").exit_code == 0
    assert run("tag", old, music / "inbox", "--db", "lib.sqlite", "--write-tags").exit_code == 0
    written = digest()
    assert [read_library_tags(p).genres for p in inbox] == [["Drone"], ["Hip-Hop"], ["Chime"]]
    from embedkit.datasets import load_dataset
    from embedkit.taxonomy import TagLabels

    # the genres embedkit wrote are its predictions: never training data when the library is read again
    df = load_dataset(music, labels_from_tags=TagLabels(str(tagged_library.parent / "map.toml"), 3))
    assert len(df) == 18 and sorted(Path(p).name for p in df.attrs["untagged"]) == [p.name for p in inbox]
    assert df.attrs["taxonomy"]["tracks_not_used"]["genre written by embedkit (a prediction, not a label)"] == 3
    res = run("retrain", old, "--db", "lib.sqlite", "--promote", "--write-tags", "--threads", 1)
    assert res.exit_code == 0, res.output
    assert "1 of 3 decision(s) changed" in res.output and "tags in files: 1 written" in res.output
    assert "+ 7 label(s) (6 relabelled)" in res.output and "1 extracted" in res.output
    new = sorted(set((tmp_path / "runs").iterdir()) - {old}, key=lambda p: p.stat().st_mtime)[-1]
    m = json.loads((new / "metrics.json").read_text())["dataset"]
    assert m["n_tracks"] == 19 and m["missing_from_store"] == 0  # the label found its rewritten file
    now = digest()
    assert now["new-0.flac"] != written["new-0.flac"] and read_library_tags(inbox[0]).genres == ["Chime"]
    assert {k: now[k] for k in ("new-1.ogg", "new-2.wav")} == {k: written[k] for k in ("new-1.ogg", "new-2.wav")}
    # one untag undoes the promotion: the files as they were before it, byte for byte
    assert run("untag", new, "--db", "lib.sqlite").exit_code == 0
    assert digest() == written and read_library_tags(inbox[0]).genres == ["Drone"]
    # promoted again (the new model writes over the old one's genre), then one untag of the old
    # model walks back over both models' writes to the originals, byte for byte
    assert run("tag", new, inbox[0], "--db", "lib.sqlite", "--write-tags").exit_code == 0
    assert read_library_tags(inbox[0]).genres == ["Chime"]
    res = run("untag", old, "--db", "lib.sqlite")
    assert res.exit_code == 0 and "3 written" in res.output, res.output
    assert digest() == originals
    res = run("untag", new, "--db", "lib.sqlite")  # nothing of the new model's is left to undo
    assert res.exit_code != 0 and "no files recorded as tagged by model" in res.output, res.output


@pytest.mark.slow
def test_extract_fit_and_train_cnn_take_labels_from_tags(tagged_library, tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from embedkit.cli import app

    monkeypatch.chdir(tmp_path)
    tags = ["--labels-from-tags", "--genre-map", str(tagged_library.parent / "map.toml"), "--min-tracks", "3"]
    res = CliRunner().invoke(app, ["extract", str(tagged_library), "-b", "melstats", "--clip", "10", *tags])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["fit", str(tagged_library), "-b", "melstats", "--cv", "2", *tags])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(
        app, ["train-cnn", str(tagged_library), "--epochs", "1", "--cv", "2", "--clip", "6", "--threads", "2", *tags]
    )
    assert res.exit_code == 0, res.output
    metrics = [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").glob("*/metrics.json"))]
    assert sorted(m["kind"] for m in metrics) == ["cnn", "head"]
    for m in metrics:
        assert m["dataset"]["class_counts"] == {"Chime": 6, "Drone": 6, "Hip-Hop": 6}
        assert m["protocol"]["group_by"] == "artist" and m["dataset"]["taxonomy"]["min_tracks"] == 3


def test_report_shows_the_active_learning_curves_when_the_bench_left_them(tmp_path):
    import json

    from embedkit.report import build_report

    from helpers import make_run

    folder = tmp_path / "runs"
    make_run(folder, "r1", "head", "musicnn-msd", "lr", 0.9, 0)
    figures = {
        "dataset": "gtzan_mini",
        "backbone": "musicnn-msd",
        "budgets": [10, 20, 30],
        "queue": [0.7, 0.9, 0.93],
        "random": [0.55, 0.75, 0.9],
        "full_pool_accuracy": 0.94,
        "protocol": "30 repeats",
        "targets": {
            "95% of full": {
                "accuracy": 0.893,
                "queue": 20.0,
                "random": 30.0,
                "saving": 1 / 3,
                "saving_ci90": [0.31, 0.5],
            },
            "98% of full": {
                "accuracy": 0.91,
                "queue": 27.0,
                "random": 30.0,
                "saving": 0.1,
                "saving_ci90": [-0.05, 0.4],
            },
        },
    }
    (folder / "active_learning.json").write_text(json.dumps(figures))
    path, ctx = build_report([folder], tmp_path / "r.html")
    html = path.read_text()
    section = html[html.index('id="active-learning"') : html.index('id="provenance"')]
    assert "<svg" in section and section.count("<polyline") == 3  # queue, random, the full-pool line
    assert "33 %" in section and "20.0" in section and "30.0" in section and "31 % to 50 %" in section
    assert section.count("✓") == 2  # the 95 % row and the legend; not the 98 % row (30 % inside its interval)
    assert ctx["active_learning"]["targets"][0]["saving"] == pytest.approx(1 / 3)
    (folder / "active_learning.json").write_text("{not json")  # unreadable: no section, no failure
    assert 'id="active-learning"' not in build_report([folder], tmp_path / "r2.html")[0].read_text()


RECIPES = {  # a non-default setting each, to see the recipe travel into the retrained run
    "cnn": (["train-cnn", "--lr", 3e-3], ("train", "lr"), 3e-3),
    "finetune": (
        ["finetune", "--backbone", "tiny-test", "--frozen-epochs", 1, "--batch-size", 4, "--head-lr", 0.02],
        ("finetune", "head_lr"),
        0.02,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(RECIPES))
def test_retrain_a_network_run_with_its_recipe_on_its_dataset_and_the_labels(
    kind, tagged_library, tmp_path, monkeypatch
):
    import json

    from typer.testing import CliRunner

    from embedkit.cli import app

    monkeypatch.chdir(tmp_path)
    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    tags = ["--labels-from-tags", "--genre-map", tagged_library.parent / "map.toml", "--min-tracks", 3]
    (command, *args), where, value = RECIPES[kind]
    res = run(command, tagged_library, *args, "--epochs", 2, "--cv", 2, "--clip", 6, "--threads", 2, *tags)
    assert res.exit_code == 0, res.output
    (old,) = (tmp_path / "runs").iterdir()
    drone = sorted((tagged_library / "Stars_of_the_Lid").iterdir())[0]
    inbox = sorted((tagged_library / "inbox").iterdir())
    (tmp_path / "labels.csv").write_text(
        f"path,label,source\n{drone},Chime,review\n{inbox[0]},Drone,review\n{inbox[1]},Hip-Hop,audit-sample\n"
    )
    assert run("labels", "import", "labels.csv", "--db", "lib.sqlite").exit_code == 0
    res = run("retrain", old, "--db", "lib.sqlite", "--threads", 2)
    assert res.exit_code == 0, res.output
    assert f"18 dataset track(s) + 2 label(s) (1 relabelled); trained on the audio ({kind} recipe" in res.output
    assert "audit labels (1), old model" in res.output and "audit labels (1), new model" in res.output
    new = next(p for p in (tmp_path / "runs").iterdir() if p != old)
    m_old, m_new = (json.loads((d / "metrics.json").read_text()) for d in (old, new))
    assert m_new["kind"] == kind and m_new["dataset"]["n_tracks"] == 19  # the audit track held out
    assert m_new["dataset"]["class_counts"] == {"Chime": 7, "Drone": 6, "Hip-Hop": 6}
    for key in ("config", "preprocess", "spec"):  # the same recipe: training, network, features, clip
        assert m_new[key] == m_old[key], key
    assert m_new["config"][where[0]][where[1]] == value and m_new["config"]["train"]["epochs"] == 2
    assert m_new["preprocess"]["audio"]["clip_s"] == 6
    assert m_new["protocol"]["type"] == "cv" and m_new["protocol"]["k"] == 2
    # a run kind retrain cannot rebuild: one line, what to do instead
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "metrics.json").write_text(json.dumps({"kind": "ensemble"}))
    _one_line_error(run("retrain", tmp_path / "odd", "--db", "lib.sqlite"), "retrain works on head, cnn and finetune")
