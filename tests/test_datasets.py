"""The three dataset forms (folder, CSV manifest, FMA tracks.csv) give the same track table."""

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from embedkit.datasets import COLUMNS, fma_audio_path, from_fma, load_dataset
from embedkit.errors import DatasetError, EmbedkitWarning

from helpers import make_fma, write_fma_tracks_csv


def write_wav(path: Path, seconds=1.0, sr=8000, freq=440.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr)
    return path


# -- folder -----------------------------------------------------------------------------------
def test_folder_layout(tmp_path):
    write_wav(tmp_path / "rock" / "b.wav")
    write_wav(tmp_path / "rock" / "a.flac")
    write_wav(tmp_path / "jazz" / "live" / "c.wav")  # nested below the label folder
    write_wav(tmp_path / "jazz" / "._c.wav")  # macOS debris
    (tmp_path / "jazz" / "notes.txt").write_text("not audio")
    write_wav(tmp_path / ".hidden" / "d.wav")
    write_wav(tmp_path / "top.wav")  # no label folder
    (tmp_path / "README").write_text("about")
    write_wav(tmp_path / "rock" / "e.wav").rename(tmp_path / "rock" / "e")  # audio by content, no extension
    (tmp_path / "rock" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    with pytest.warns(EmbedkitWarning) as caught:
        df = load_dataset(tmp_path)
    said = [str(w.message) for w in caught]
    # nothing is left out without a word: the three non-audio files by kind, the loose audio file
    assert any("3 files in the label folders are not audio (" in m for m in said), said
    assert any("1 macOS metadata (._ file)" in m and "1 text / path list" in m and "1 hidden file" in m for m in said)
    assert any("1 audio file(s) outside a label folder not used (e.g. top.wav)" in m for m in said), said
    assert sorted(k for _, k in df.attrs["not_audio"]) == [
        "hidden file",
        "macOS metadata (._ file)",
        "text / path list",
    ]
    assert list(df.columns) == COLUMNS
    assert df.track_id.tolist() == ["jazz/live/c", "rock/a", "rock/b", "rock/e"]
    assert df.label.tolist() == ["jazz", "rock", "rock", "rock"]
    assert all(Path(p).is_absolute() and Path(p).exists() for p in df.path)
    assert df.split.isna().all() and df.group.isna().all()


def test_folder_errors(tmp_path):
    (tmp_path / "empty" / "rock").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no audio files"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match="no such file or directory"):
        load_dataset(tmp_path / "absent")
    write_wav(tmp_path / "dup" / "rock" / "x.wav")
    write_wav(tmp_path / "dup" / "rock" / "x.flac")
    with pytest.raises(DatasetError, match="duplicate track id rock/x"):
        load_dataset(tmp_path / "dup")


# -- manifest ---------------------------------------------------------------------------------
def test_manifest_resolves_paths_against_the_csv(tmp_path, monkeypatch):
    data = tmp_path / "data"
    a = write_wav(data / "audio" / "a.wav")
    b = write_wav(tmp_path / "elsewhere" / "b.wav")
    csv = data / "manifest.csv"
    csv.write_text(f"path, label, split, group\naudio/a.wav, rock, training, artist1\n{b}, jazz ,Test,\n")
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative to the CSV, not the working directory
    df = load_dataset(csv).set_index("label")
    assert df.loc["rock", "path"] == str(a.resolve()) and df.loc["jazz", "path"] == str(b.resolve())
    assert df.loc["rock", "track_id"] == "audio/a"
    assert df.split.to_dict() == {"rock": "train", "jazz": "test"}
    assert df.group.to_dict() == {"rock": "artist1", "jazz": None}


def test_manifest_tsv_without_optional_columns(tmp_path):
    write_wav(tmp_path / "x.wav")
    tsv = tmp_path / "m.tsv"
    tsv.write_text("label\tpath\nrock\tx.wav\n")
    df = load_dataset(tsv)
    assert df.loc[0, "label"] == "rock" and df.split.isna().all()


@pytest.mark.parametrize(
    "content, match",
    [
        ("file,genre\na.wav,rock\n", r"lacks column\(s\) path, label"),
        ("path\na.wav\n", r"lacks column\(s\) label"),
        ("", "cannot read manifest"),
        ("path,label\na.wav,\n", "row 2 has an empty path or label"),
        ("path,label,split\na.wav,rock,holdout\n", r"unknown split value\(s\) \['holdout'\]"),
        (
            "path,label\na.wav,rock\nsub/../a.wav,jazz\n",
            r"duplicate path .*a\.wav listed with different labels/splits/groups \(jazz, rock\)",
        ),
        ("path,label\n", "no audio files found"),
    ],
)
def test_manifest_errors_name_the_file(tmp_path, content, match):
    csv = tmp_path / "bad.csv"
    csv.write_text(content)
    with pytest.raises(DatasetError, match=match) as err:
        load_dataset(csv)
    assert str(err.value).startswith(str(csv.resolve())) and "\n" not in str(err.value)


def test_manifest_repeated_identical_rows_are_dropped_with_a_warning(tmp_path):
    write_wav(tmp_path / "a.wav")
    write_wav(tmp_path / "b.wav")
    csv = tmp_path / "m.csv"
    csv.write_text("path,label\na.wav,rock\nb.wav,jazz\na.wav,rock\n./a.wav,rock\n")
    with pytest.warns(EmbedkitWarning, match=r"2 repeated row\(s\) ignored"):
        df = load_dataset(csv)
    assert df.label.tolist() == ["rock", "jazz"]


# -- FMA --------------------------------------------------------------------------------------
def test_fma_fixture_has_the_real_three_row_header(tmp_path):
    csv = write_fma_tracks_csv(tmp_path / "tracks.csv")
    lines = csv.read_text().splitlines()
    assert lines[0].startswith(",album,album,")
    assert lines[1].startswith(",comments,date_created,")
    assert lines[2].startswith("track_id,,")
    assert lines[3].startswith("2,")
    assert len(lines[0].split(",")) == 53


def test_fma_tracks_csv(tmp_path):
    csv, audio_dir = make_fma(tmp_path, seconds=1.0)
    assert (audio_dir / "000" / "000002.mp3").exists() and (audio_dir / "001" / "001482.mp3").exists()
    with pytest.raises(DatasetError, match="needs --audio-dir"):
        load_dataset(csv)
    with pytest.warns(EmbedkitWarning, match="1 of 6 small-subset tracks have no mp3"):
        df = load_dataset(csv, audio_dir=audio_dir)
    assert df.track_id.tolist() == ["000002", "000005", "000010", "000140", "001482"]
    assert df.label.tolist() == ["Hip-Hop", "Hip-Hop", "Pop", "Folk", "Rock"]
    assert df.split.tolist() == ["train", "train", "val", "test", "train"]
    assert df.group.tolist() == ["1", "1", "6", "54", "410"]
    assert df.path.tolist() == [str(fma_audio_path(audio_dir.resolve(), t)) for t in (2, 5, 10, 140, 1482)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        medium = load_dataset(csv, audio_dir=audio_dir, subset="medium")
    assert "000003" in medium.track_id.tolist() and "000020" not in medium.track_id.tolist()


def test_fma_errors(tmp_path):
    csv, audio_dir = make_fma(tmp_path, seconds=0.5)
    with pytest.raises(DatasetError, match="FMA audio directory not found"):
        from_fma(csv, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        DatasetError, match=r"no small-subset track has its mp3 under .*empty \(expected e\.g\. .*000/000002\.mp3\)"
    ):
        from_fma(csv, tmp_path / "empty")
    with pytest.raises(DatasetError, match="unknown FMA subset 'tiny'"):
        from_fma(csv, audio_dir, subset="tiny")
    bad = tmp_path / "other.csv"
    pd.DataFrame({("set", "split"): ["training"]}, index=pd.Index([2], name="track_id")).to_csv(bad)
    with pytest.raises(DatasetError, match="not an FMA tracks.csv .*set.subset"):
        from_fma(bad, audio_dir)
