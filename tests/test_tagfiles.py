"""`embedkit tag --write-tags` and `embedkit untag` end to end on a tiny head run: decisions
under the model's rule or the command's, the safety rules through the CLI, undo from the
results database, and no re-decoding of the files embedkit tagged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

pytest.importorskip("mutagen")

from embedkit.cli import app  # noqa: E402
from embedkit.deploy import filetags as tw  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def head_run(runs):
    """tiny-test + lr on the synthetic set (12 s clips, 5 s segments): conftest's runs["head"],
    the same extract and fit this module used to repeat."""
    return runs["head"]


@pytest.fixture
def library(synth_dataset, tmp_path):
    """Four clips of the synthetic set re-encoded as FLAC, MP3, OGG and WAV."""
    out = tmp_path / "library"
    out.mkdir()
    clips = sorted(synth_dataset.glob("*/*.wav"))[::5][:4]
    files = []
    for src, ext in zip(clips, ("flac", "mp3", "ogg", "wav"), strict=True):
        y, sr = sf.read(src)
        dst = out / f"{src.stem}.{ext}"
        sf.write(
            dst,
            y,
            sr,
            **({"format": "MP3"} if ext == "mp3" else {"format": "OGG", "subtype": "VORBIS"} if ext == "ogg" else {}),
        )
        files.append(dst)
    return files


def _decode(p: Path) -> np.ndarray:
    return sf.read(p, dtype="float32")[0]


def invoke(*args):
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, " ".join(res.output.split())


@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_write_tags_then_untag(head_run, library, tmp_path):
    db = tmp_path / "lib.sqlite"
    audio = {p: _decode(p) for p in library}
    tw.write_genres(library[0], [], dry_run=True)  # reads only
    person = library[0]
    f = tw._open(person, "flac")  # a genre set by a person's tag editor (no embedkit provenance)
    tw._set(f, "flac", tw.TagState(["Jazz"]))
    f.save()
    raw = {p: p.read_bytes() for p in library}

    code, out = invoke("tag", head_run, *library, "--db", db, "--write-tags", "--dry-run", "--threshold", "0")
    assert code == 0, out
    assert "dry run, nothing written" in out and "3 would-write" in out and "1 kept" in out
    assert all(p.read_bytes() == raw[p] for p in library)

    code, out = invoke("tag", head_run, *library, "--db", db, "--write-tags", "--threshold", "0")
    assert code == 0, out
    assert "3 written" in out and "1 kept" in out and "set by a person" in out
    from embedkit.deploy.resultsdb import ResultsDB

    with ResultsDB(db) as d:
        rows = {r["path"]: r for r in d.rows()}
    for p in library[1:]:
        st = tw.read_tags(p)
        decided = rows[str(p.absolute())]["decision"]
        assert st.genre == [decided] and st.written_by_embedkit
        np.testing.assert_array_equal(_decode(p), audio[p])
    assert tw.read_tags(person).genre == ["Jazz"]

    # the tagged files are the same audio: a re-run decodes nothing and writes nothing new
    code, out = invoke("tag", head_run, *library, "--db", db, "--write-tags", "--threshold", "0")
    assert code == 0, out
    assert "0 tracks tagged" in out and "4 already in the database" in out and "3 unchanged" in out

    code, out = invoke("tag", head_run, *library, "--db", db, "--write-tags", "--threshold", "0", "--overwrite")
    assert code == 0 and "1 written" in out, out

    code, out = invoke("untag", head_run, "--db", db)
    assert code == 0 and "4 written" in out, out
    assert tw.read_tags(person) == tw.TagState(["Jazz"])
    for p in library[1:]:
        assert tw.read_tags(p) == tw.TagState(None)
        np.testing.assert_array_equal(_decode(p), audio[p])
    code, out = invoke("untag", head_run, "--db", db)
    assert code == 1 and "no files recorded as tagged" in out


def test_uncertain_and_multi_decisions(head_run, library, tmp_path):
    db = tmp_path / "lib.sqlite"
    raw = {p: p.read_bytes() for p in library}
    code, out = invoke("tag", head_run, *library, "--db", db, "--write-tags", "--threshold", "1")
    assert code == 0 and "4 uncertain" in out, out
    assert all(p.read_bytes() == raw[p] for p in library)
    from embedkit.deploy.resultsdb import ResultsDB

    with ResultsDB(db) as d:
        assert {r["decision"] for r in d.rows()} == {"uncertain"}  # recorded under the command's rule
    code, out = invoke(
        "tag",
        head_run,
        *library,
        "--db",
        tmp_path / "b.sqlite",
        "--write-tags",
        "--multi",
        "--threshold",
        "0",
        "--multi-threshold",
        "0",
        "--max-genres",
        "2",
    )
    assert code == 0 and "4 written" in out, out
    for p in library:
        g = tw.read_tags(p).genre
        assert len(g) == 2 and len(set(g)) == 2


def test_default_threshold_comes_from_the_run(head_run):
    from embedkit.calibration import load_calibration
    from embedkit.deploy.records import applied_rule, model_rule

    cal = load_calibration(head_run)
    rule = model_rule(head_run)  # read from the run, no model loaded
    assert rule == cal.rule == applied_rule(head_run)
    assert json.loads((head_run / "metrics.json").read_text())["calibration"]["threshold"][
        "threshold"
    ] == pytest.approx(rule.threshold, abs=1e-4)
    rule = applied_rule(head_run, threshold=0.9, multi=True, multi_threshold=0.2, margin=0.05, max_genres=2)
    assert (rule.threshold, rule.multi, rule.multi_threshold, rule.margin, rule.k) == (0.9, True, 0.2, 0.05, 2)
    # an override of one field keeps the others stored
    assert applied_rule(head_run, multi=True) == cal.rule.with_overrides(multi=True)
    assert applied_rule(head_run, multi=True).threshold == cal.rule.threshold


def test_write_tags_needs_a_database(head_run, library):
    code, out = invoke("tag", head_run, *library, "--write-tags")
    assert code == 1 and "--write-tags needs --db" in out
    code, out = invoke("tag", head_run, *library, "--overwrite")
    assert code == 1 and "apply to --write-tags" in out
