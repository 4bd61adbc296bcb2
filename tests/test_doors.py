"""One answer per song, whatever the door (issue: one decision rule, one result record).

For fixed clips and decision rules (the model's stored rule, a threshold override, and the
multi-genre rule with each of its parameters), every door gives the same decision and the same
genre list, and probabilities within the ONNX tolerance: the library API, `embedkit tag` (torch),
`embedkit tag --runtime onnx`, `embedkit serve` on the run directory and on the `.onnx` file,
`--write-tags --dry-run` (torch and ONNX) and `embedkit stream` over the same file (per window,
against the windows `tag --excerpt full` reads). The model carries a stored calibration
(temperature 1.6, threshold and multi-genre settings): the defaults the doors used to disagree on.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
requests = pytest.importorskip("requests")

from typer.testing import CliRunner  # noqa: E402

from embedkit.audio.excerpts import Excerpt, read_excerpt  # noqa: E402
from embedkit.calibration import CALIBRATION_FILE, DecisionRule  # noqa: E402
from embedkit.cli import app  # noqa: E402
from embedkit.deploy.records import applied_rule, track_result  # noqa: E402
from embedkit.deploy.tagger import load_tagger  # noqa: E402

from servers import running  # noqa: E402

#: onnxruntime vs torch, calibrated track probabilities (tests/test_export.py measures ~1e-7 here)
ONNX_TOL = 1e-5
#: rule values are put at least this far from every probability they are compared with, so a
#: decision cannot flip on the ONNX rounding
GAP = 1e-3
N_CLIPS = 8


def _cli(*args) -> str:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def model(runs, tmp_path_factory):
    """(run directory with a stored calibration, its exported .onnx)."""
    from embedkit.deploy.onnx_export import export_onnx

    tmp = tmp_path_factory.mktemp("doors")
    run = tmp / "run"
    shutil.copytree(runs["head"], run)
    cal = json.loads((run / CALIBRATION_FILE).read_text()) if (run / CALIBRATION_FILE).exists() else {}
    t = load_tagger(run)
    cal.update(method="temperature", temperature=1.6, labels=list(t.labels))
    cal["rule"] = {"threshold": 0.0, "multi": False, "multi_threshold": 0.3, "margin": 0.1, "k": 3}
    (run / CALIBRATION_FILE).write_text(json.dumps(cal))
    # the stored threshold: between the clips' top probabilities, so the default rule itself
    # leaves some clips uncertain (the case the ONNX runtime used to get wrong)
    tops = sorted(_reference(load_tagger(run), _clips(runs), DecisionRule())[0].max(axis=1))
    cal["rule"]["threshold"] = _between(tops, len(tops) // 2)
    (run / CALIBRATION_FILE).write_text(json.dumps(cal))
    onnx = tmp / "model.onnx"
    export_onnx(load_tagger(run), onnx)
    return run, onnx


def _clips(runs) -> list[str]:
    files = sorted(Path(runs["data"]).glob("*/*.wav"))
    return [str(f.absolute()) for f in files[:: max(1, len(files) // N_CLIPS)][:N_CLIPS]]


@pytest.fixture(scope="module")
def clips(runs):
    return _clips(runs)


def _reference(tagger, files, rule):
    """The library API: read the excerpt, forward, track result under ``rule``."""
    P, out = [], {}
    for f in files:
        w, starts, dur = read_excerpt(
            f, tagger.sample_rate, Excerpt(), tagger.audio.clip_s, tagger.segment.segment_s, tagger.segment.hop_s
        )
        r = track_result(tagger, tagger.predict_segments(w), rule, path=f, duration_s=dur, window_starts_s=starts)
        P.append(r.p)
        out[f] = (r.decision, r.genres)
    return np.array(P), out


def _between(values, i: int) -> float:
    """A value between sorted values[i-1] and values[i] (at a gap of at least GAP), searching
    outwards from i."""
    v = sorted(values)
    for j in sorted(range(1, len(v)), key=lambda j: abs(j - i)):
        if v[j] - v[j - 1] > 2 * GAP:
            return round((v[j] + v[j - 1]) / 2, 6)
    pytest.skip("the clips' probabilities are too close together to place a rule between them")


def _rules(P: np.ndarray, stored: DecisionRule) -> dict[str, dict]:
    """Overrides exercising each parameter, placed between the clips' probabilities."""
    srt = -np.sort(-P, axis=1)
    tops, seconds = srt[:, 0], srt[:, 1]
    return {
        "stored": {},
        "threshold": {"threshold": _between(tops, len(tops) // 3)},
        "multi_threshold": {"threshold": 0.0, "multi": True, "multi_threshold": _between(seconds, len(seconds) // 2)},
        "margin": {
            "threshold": 0.0,
            "multi": True,
            "multi_threshold": 1.0,
            "margin": _between(tops - seconds, len(tops) // 2),
        },
        "max_genres": {"threshold": 0.0, "multi": True, "multi_threshold": 0.0, "max_genres": 2},
        "multi_stored_threshold": {"multi": True, "multi_threshold": _between(seconds, len(seconds) // 2)},
    }


def _flags(over: dict) -> list[str]:
    out = []
    for k, v in over.items():
        if k == "multi":
            out.append("--multi" if v else "--single")
        else:
            out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def _query(over: dict) -> str:
    return "&".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in over.items())


def _tag_cli(model_path, files, over, tmp_path, name) -> dict:
    out = tmp_path / f"{name}.jsonl"
    _cli("tag", model_path, *files, "--out", out, "--workers", "1", *_flags(over))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    return {r["path"]: r for r in rows}


def _http(url, files, over) -> dict:
    got = {}
    for f in files:
        r = requests.post(
            f"{url}/v1/tag?{_query(over)}",
            data=Path(f).read_bytes(),
            headers={"Content-Type": "audio/wav"},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        got[f] = r.json()
    return got


def _decided(rows: dict) -> dict:
    return {p: (r["decision"], [g["label"] for g in r["genres"]]) for p, r in rows.items()}


@pytest.mark.slow  # several seconds: the fast tier keeps a minute
def test_every_door_gives_the_same_answer(model, clips, tmp_path):
    from embedkit.deploy.onnx_runtime import OnnxTagger
    from embedkit.deploy.serve import ServeConfig, create_app
    from embedkit.deploy.writeback import FileTagOptions

    run, onnx = model
    torch_tagger, onnx_tagger = load_tagger(run), OnnxTagger.load(onnx)
    stored = applied_rule(run)
    assert stored == torch_tagger.rule == onnx_tagger.rule and stored.threshold > 0  # the rule travels
    P, _ = _reference(torch_tagger, clips, stored)
    rules = _rules(P, stored)
    seen_cases = set()
    with (
        running(create_app(torch_tagger, ServeConfig())) as url_t,
        running(create_app(onnx_tagger, ServeConfig())) as url_o,
    ):
        for name, over in rules.items():
            rule = stored.with_overrides(**over)
            _, want = _reference(torch_tagger, clips, rule)
            seen_cases |= {("uncertain" if d == "uncertain" else len(g)) for d, g in want.values()}
            doors = {
                "library onnx": _reference(onnx_tagger, clips, rule)[1],
                "tag torch": _decided(_tag_cli(run, clips, over, tmp_path, f"{name}-t")),
                "tag onnx": _decided(_tag_cli(onnx, clips, over, tmp_path, f"{name}-o")),
                "serve run": _decided(_http(url_t, clips, over)),
                "serve onnx": _decided(_http(url_o, clips, over)),
            }
            from embedkit.deploy.batch import tag

            for door, path in (("write-tags torch", run), ("write-tags onnx", onnx)):
                res = tag(path, clips, file_tags=FileTagOptions(dry_run=True), workers=1, keep_rows=100, **over)
                changes = {ch.path: ch for ch in res.file_tags.notes}
                decided = {r.path: r.decision for r in res.rows}
                # what a file would receive: the decided genres; nothing at all for "uncertain"
                doors[door] = {
                    f: (decided[f], changes[f].genres if changes[f].status == "would-write" else []) for f in clips
                }
                assert {changes[f].status for f in clips} <= {"would-write", "uncertain"}, door
                assert all((changes[f].status == "uncertain") == (decided[f] == "uncertain") for f in clips), door
                assert res.rule == rule, door
            for door, got in doors.items():
                assert got == want, f"{door} under {name} ({rule}): {got} != {want}"
    # the rules covered confident, uncertain and several-genre decisions
    assert {"uncertain", 1} <= seen_cases and any(isinstance(c, int) and c > 1 for c in seen_cases), seen_cases


@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_records_agree_in_every_form(model, clips, tmp_path):
    """The same probabilities, decision, genres and rule in JSONL, CSV, the database row and
    the HTTP answer (the multi-genre decision included)."""
    from embedkit.deploy.resultsdb import ResultsDB
    from embedkit.deploy.serve import ServeConfig, create_app

    run, onnx = model
    over = {"multi": True, "multi_threshold": 0.0, "max_genres": 2, "threshold": 0.0}
    rows = _tag_cli(run, clips, over, tmp_path, "jsonl")
    csv_out, db = tmp_path / "x.csv", tmp_path / "x.sqlite"
    _cli("tag", run, *clips, "--out", csv_out, "--db", db, "--workers", "1", *_flags(over))
    import csv

    with open(csv_out) as fh:
        csv_rows = {r["path"]: r for r in csv.DictReader(fh)}
    with ResultsDB(db) as d:
        db_rows = {r["path"]: r for r in d.rows()}
    t = load_tagger(run)
    with running(create_app(t, ServeConfig(db=str(tmp_path / "serve.sqlite")))) as url:
        http = _http(url, clips, over)
    for f in clips:
        j, c, d, h = rows[f], csv_rows[f], db_rows[f], http[f]
        genres = [(g["label"], g["p"]) for g in j["genres"]]
        assert len(genres) == 2 and j["rule"]["multi"] and j["rule"]["k"] == 2
        assert c["genres"] == ";".join(f"{g}:{p:.4f}" for g, p in genres) and c["decision"] == j["decision"]
        assert [g for g, _ in d["genres"]] == [g for g, _ in genres] and d["rule"] == j["rule"]
        assert d["decision"] == h["decision"] == j["decision"]
        assert [g["label"] for g in h["genres"]] == [g for g, _ in genres] and h["rule"] == j["rule"]
        np.testing.assert_allclose(
            [h["probabilities"][l] for l in t.labels], [j["probabilities"][l] for l in t.labels], atol=1e-9
        )
    # serve --db records the request's rule, not the default one
    with ResultsDB(tmp_path / "serve.sqlite") as d:
        served = d.rows()
    assert served and all(r["rule"] == rows[clips[0]]["rule"] and len(r["genres"]) == 2 for r in served)


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_stream_windows_decide_as_tag_full(model, clips, runtime):
    """Each stream window's decision (the one rule, on its calibrated probabilities) equals the
    decision of the same window read the way `tag --excerpt full` reads it."""
    from embedkit.calibration import decide
    from embedkit.deploy.stream import StreamConfig, stream

    run, onnx = model
    path = run if runtime == "torch" else onnx
    t = load_tagger(path)
    over = {"multi": True, "multi_threshold": 0.2, "threshold": t.rule.threshold}
    rule = t.rule.with_overrides(**over)
    f = clips[0]
    recs: list[dict] = []
    summary = stream(path, f, StreamConfig(hop_s=t.segment.hop_s), emit=recs.append, **over)
    wins = [r for r in recs if r["type"] == "window"]
    frames, starts, _ = read_excerpt(
        f, t.sample_rate, Excerpt.parse("full"), t.audio.clip_s, t.segment.segment_s, t.segment.hop_s
    )
    ref = load_tagger(run).calibrate(load_tagger(run).predict_segments(frames))  # torch reference
    own = t.calibrate(t.predict_segments(frames))  # this runtime's, for the decisions (no rounding flips)
    assert len(wins) == len(frames) > 1 and summary["rule"] == rule.to_dict()
    for w, p, q in zip(wins, ref, own):
        np.testing.assert_allclose([w["raw"][l] for l in t.labels], p, atol=ONNX_TOL)
        d = decide(q, t.labels, rule)
        assert w["window"]["decision"] == d.label and [g["label"] for g in w["window"]["genres"]] == d.genres


# ---------------------------------------------------------------------------------------------
# The reproductions of the issue, each through the CLI or over HTTP


def test_an_explicit_threshold_on_an_onnx_model_keeps_uncertainty(model, clips, tmp_path):
    """`tag model.onnx --threshold 0.99` decided a genre for a track whose top probability was
    0.527; torch called it uncertain."""
    run, onnx = model
    for path, name in ((run, "t"), (onnx, "o")):
        rows = _tag_cli(path, clips, {"threshold": 0.99}, tmp_path, f"thr-{name}")
        for r in rows.values():
            assert (r["decision"] == "uncertain") == (r["top_p"] < 0.99) and r["rule"]["threshold"] == 0.99
            assert r["genres"] == [] or r["top_p"] >= 0.99
        assert any(r["decision"] == "uncertain" for r in rows.values())


def test_write_tags_dry_run_is_the_same_on_both_runtimes(model, clips, tmp_path):
    """`tag model.onnx --multi --multi-threshold 0.05 --write-tags --dry-run` would have written
    several genres into files the torch path left alone as uncertain."""
    run, onnx = model
    out = {}
    for path, name in ((run, "t"), (onnx, "o")):
        text = _cli(
            "tag", path, *clips, "--db", tmp_path / f"{name}.sqlite", "--write-tags", "--dry-run",
            "--multi", "--multi-threshold", "0.05", "--workers", "1", "--table", "0",
        )  # fmt: skip
        out[name] = sorted(line for line in text.splitlines() if line.startswith(("would write", "uncertain")))
    assert out["t"] == out["o"] and out["t"]


@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_serve_reports_and_applies_the_stored_rule(model, clips, tmp_path):
    """/v1/model said "threshold": null while the stored threshold was applied; ?multi=true meant
    another rule than `tag --multi`; serve --db recorded the default rule's decision."""
    from embedkit.deploy.onnx_runtime import OnnxTagger
    from embedkit.deploy.resultsdb import ResultsDB
    from embedkit.deploy.serve import ServeConfig, create_app

    run, onnx = model
    stored = applied_rule(run)
    for t in (load_tagger(run), OnnxTagger.load(onnx)):
        db = tmp_path / f"{t.kind}-{t.model_id[:6]}.sqlite"
        with running(create_app(t, ServeConfig(db=str(db)))) as url:
            m = requests.get(f"{url}/v1/model", timeout=30).json()
            assert m["threshold"] == stored.threshold and m["rule"] == stored.to_dict()
            got = _http(url, clips[:2], {"multi": True, "threshold": 0.0})
        want = _decided(_tag_cli(run, clips[:2], {"multi": True, "threshold": 0.0}, tmp_path, "multi"))
        assert _decided(got) == want
        with ResultsDB(db) as d:
            rows = d.rows()
        assert len(rows) == 2 and all(
            r["rule"] == stored.with_overrides(multi=True, threshold=0.0).to_dict() for r in rows
        )


def test_a_rerun_under_another_rule_decides_stored_rows_again(model, clips, tmp_path):
    """Rows already in the database carry the rule they were decided under; a re-run with
    another rule decides them again from their stored probabilities (no model load) and
    rewrites them, so the database holds what the latest run decided."""
    from embedkit.deploy.batch import tag
    from embedkit.deploy.resultsdb import ResultsDB

    run, _ = model
    db = tmp_path / "re.sqlite"
    first = tag(run, clips, db=db, workers=1)
    again = tag(run, clips, db=db, workers=1, threshold=1.0)
    assert (again.n_tagged, again.n_done_before, again.n_redecided, again.model_loaded) == (
        0,
        len(clips),
        len(clips),
        False,
    )
    with ResultsDB(db) as d:
        rows = d.rows()
    assert all(r["decision"] == "uncertain" and r["genres"] == [] and r["rule"]["threshold"] == 1.0 for r in rows)
    back = tag(run, clips, db=db, workers=1)
    assert [r.decision for r in back.rows] == [r.decision for r in first.rows] and back.n_redecided == len(clips)
    same = tag(run, clips, db=db, workers=1)  # the same rule again: nothing to rewrite
    assert same.n_redecided == 0 and same.n_done_before == len(clips)
    # --margin without --multi decides nothing differently: no row is rewritten for it
    assert tag(run, clips, db=db, workers=1, margin=0.42).n_redecided == 0


def test_rows_of_an_older_database_are_decided_again(model, clips, tmp_path):
    """A database made before rows recorded their genres and rule: the new columns are added,
    its rows are decided under the rule applied from their stored probabilities (no model
    load), in the model's label order, and rewritten once."""
    import sqlite3

    from embedkit.deploy.batch import tag
    from embedkit.deploy.resultsdb import ResultsDB

    run, _ = model
    db = tmp_path / "old.sqlite"
    first = tag(run, clips, db=db, workers=1)
    con = sqlite3.connect(db)
    con.execute("ALTER TABLE tags DROP COLUMN genres")
    con.execute("ALTER TABLE tags DROP COLUMN rule")
    con.commit()
    con.close()
    again = tag(run, clips, db=db, workers=1)
    assert (again.model_loaded, again.n_redecided, again.n_done_before) == (False, len(clips), len(clips))
    assert [(r.decision, r.genres) for r in again.rows] == [(r.decision, r.genres) for r in first.rows]
    assert again.labels == first.labels
    with ResultsDB(db) as d:
        assert all(r["rule"] == first.rule.to_dict() and r["genres"] is not None for r in d.rows())
    assert tag(run, clips, db=db, workers=1).n_redecided == 0


def test_a_file_uncertain_under_a_stricter_rule_loses_the_genre_embedkit_wrote(model, clips, tmp_path):
    """--write-tags then a re-run under which the track is uncertain: the file gets back what it
    held before embedkit's write (no door would write that genre now), and untag has nothing
    left to undo."""
    pytest.importorskip("mutagen")
    import soundfile as sf

    from embedkit.deploy.batch import tag
    from embedkit.deploy.filetags import read_tags
    from embedkit.deploy.writeback import FileTagOptions

    run, _ = model
    lib = tmp_path / "lib"
    lib.mkdir()
    files = []
    for i, f in enumerate(clips[:3]):
        y, sr = sf.read(f)
        files.append(lib / f"t{i}.flac")
        sf.write(files[-1], y, sr)
    before = {f: f.read_bytes() for f in files}
    db = tmp_path / "w.sqlite"
    w = tag(run, files, db=db, workers=1, threshold=0.0, file_tags=FileTagOptions())
    assert w.file_tags.counts["written"] == 3 and all(read_tags(f).genre for f in files)
    dry = tag(run, files, db=db, workers=1, threshold=1.0, file_tags=FileTagOptions(dry_run=True))
    assert dry.file_tags.counts["would-clear"] == 3 and all(read_tags(f).genre for f in files)
    strict = tag(run, files, db=db, workers=1, threshold=1.0, file_tags=FileTagOptions())
    assert strict.file_tags.counts["cleared"] == 3
    for f in files:
        assert read_tags(f).genre is None and not read_tags(f).written_by_embedkit
        np.testing.assert_array_equal(sf.read(f)[0], sf.read(io.BytesIO(before[f]))[0])  # the audio untouched
    res = CliRunner().invoke(app, ["untag", str(run), "--db", str(db)])
    assert res.exit_code == 1 and "no files recorded" in res.output


def test_copies_of_a_bad_file_are_each_recorded(model, tmp_path):
    from embedkit.deploy.batch import tag
    from embedkit.deploy.resultsdb import ResultsDB

    run, _ = model
    bad = [tmp_path / "bad1.wav", tmp_path / "bad2.wav"]
    for b in bad:
        b.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    res = tag(run, bad, db=tmp_path / "b.sqlite", workers=1)
    assert sorted(f["path"] for f in res.failures) == sorted(str(b.absolute()) for b in bad)
    with ResultsDB(tmp_path / "b.sqlite") as d:
        assert len(d.failed(res.model_id)) == 2


@pytest.mark.parametrize(
    "rule, message",
    [
        ({"threshold": 0.5, "target": 0.97}, "unknown field"),
        ({"threshold": "0.5"}, "must be a number"),
        ({"multi": "false"}, "true or false"),
        ({"k": 2.5}, "must be an integer"),
    ],
)
def test_a_malformed_stored_rule_is_one_line(model, tmp_path, rule, message):
    from embedkit.errors import CalibrationError

    with pytest.raises(CalibrationError, match=message):
        DecisionRule.from_dict(rule)
    run, _ = model
    bad = tmp_path / "run"
    shutil.copytree(run, bad)
    cal = json.loads((bad / CALIBRATION_FILE).read_text())
    cal["rule"] = rule
    (bad / CALIBRATION_FILE).write_text(json.dumps(cal))
    res = CliRunner().invoke(app, ["tag", str(bad), __file__])
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output


# ---------------------------------------------------------------------------------------------
# "not-music": the third kind of decision, through every door


def _noise_files(root: Path) -> list[str]:
    """Non-music clips at the synthetic set's rate: white / brown noise, a tone, mains hum."""
    import soundfile as sf

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    sr, n = 22050, 22050 * 12
    t = np.arange(n) / sr
    brown = np.cumsum(rng.standard_normal(n))
    sigs = {
        "white": rng.standard_normal(n),
        "brown": brown - np.convolve(brown, np.ones(2205) / 2205, mode="same"),
        "tone": np.sin(2 * np.pi * 1000 * t),
        "hum": sum(np.sin(2 * np.pi * 50 * k * t) / k for k in (1, 2, 3)),
    }
    out = []
    for name, y in sigs.items():
        f = root / f"{name}.wav"
        sf.write(f, (0.3 * y / np.abs(y).max()).astype(np.float32), sr)
        out.append(str(f.absolute()))
    return out


def _scored(tagger, files, rule):
    """The library API with the not-music score: {path: (decision, genres, score)}."""
    out = {}
    for f in files:
        w, starts, dur = read_excerpt(
            f, tagger.sample_rate, Excerpt(), tagger.audio.clip_s, tagger.segment.segment_s, tagger.segment.hop_s
        )
        p, nm = tagger.score_segments(w)
        r = track_result(tagger, p, rule, path=f, duration_s=dur, window_starts_s=starts, not_music=nm)
        out[f] = (r.decision, r.genres, r.not_music)
    return out


@pytest.fixture(scope="module")
def nm_model(runs, clips, tmp_path_factory):
    """(run directory whose stored rule puts some of ``files`` above the not-music threshold,
    its .onnx, the files: synthetic clips and generated noise / tone / hum)."""
    from embedkit.deploy.onnx_export import export_onnx

    tmp = tmp_path_factory.mktemp("doors-nm")
    run = tmp / "run"
    shutil.copytree(runs["head"], run)
    files = clips[:4] + _noise_files(tmp / "noise")
    t = load_tagger(run)
    assert t.has_not_music and t.rule.not_music is not None  # fitted by `fit`, stored with the model
    scores = sorted(s for _, _, s in _scored(t, files, t.rule).values())
    cal = json.loads((run / CALIBRATION_FILE).read_text())
    cal["rule"]["not_music"] = _between(scores, len(scores) // 2)
    (run / CALIBRATION_FILE).write_text(json.dumps(cal))
    onnx = tmp / "model.onnx"
    export_onnx(load_tagger(run), onnx)
    return run, onnx, files


@pytest.mark.slow  # several seconds: the fast tier keeps a minute
def test_not_music_through_every_door(nm_model, tmp_path):
    """The same decisions (not-music included) and scores from the library (torch, ONNX), `tag`
    (torch, ONNX), `serve` (run, .onnx) and `--write-tags --dry-run`, which writes nothing for it;
    under the stored rule and under an override of the not-music threshold (`--not-music`,
    `?not_music=`, ``not_music=``)."""
    from embedkit.deploy.batch import tag
    from embedkit.deploy.onnx_runtime import OnnxTagger
    from embedkit.deploy.serve import ServeConfig, create_app
    from embedkit.deploy.writeback import FileTagOptions

    run, onnx, files = nm_model
    torch_tagger, onnx_tagger = load_tagger(run), OnnxTagger.load(onnx)
    stored = applied_rule(run)
    assert stored == torch_tagger.rule == onnx_tagger.rule and stored.not_music is not None
    scores = sorted(s for _, _, s in _scored(torch_tagger, files, stored).values())
    cases = {"stored": {}, "override": {"not_music": _between(scores, len(scores) // 4)}}
    with (
        running(create_app(torch_tagger, ServeConfig())) as url_t,
        running(create_app(onnx_tagger, ServeConfig())) as url_o,
    ):
        for name, over in cases.items():
            rule = stored.with_overrides(**over)
            ref = _scored(torch_tagger, files, rule)
            want = {f: (d, g) for f, (d, g, _) in ref.items()}
            assert {d == "not-music" for d, _ in want.values()} == {True, False}, name  # both kinds of answer
            assert all(g == [] for d, g in want.values() if d == "not-music")
            got_o = _scored(onnx_tagger, files, rule)
            for f in files:
                assert got_o[f][:2] == want[f], name
                np.testing.assert_allclose(got_o[f][2], ref[f][2], rtol=1e-4)
            doors = {
                "tag torch": _tag_cli(run, files, over, tmp_path, f"nm-{name}-t"),
                "tag onnx": _tag_cli(onnx, files, over, tmp_path, f"nm-{name}-o"),
                "serve run": _http(url_t, files, over),
                "serve onnx": _http(url_o, files, over),
            }
            for door, rows in doors.items():
                assert _decided(rows) == want, f"{door} under {name}"
                for f in files:  # the score is in every record, and so is the threshold applied
                    assert rows[f]["not_music"] == pytest.approx(ref[f][2], rel=1e-4), door
                    assert rows[f]["rule"]["not_music"] == rule.not_music, door
            for door, path in (("write-tags torch", run), ("write-tags onnx", onnx)):
                res = tag(path, files, file_tags=FileTagOptions(dry_run=True), workers=1, keep_rows=100, **over)
                status = {ch.path: ch.status for ch in res.file_tags.notes}
                assert res.rule == rule, door
                for f in files:
                    assert (status[f] == "not-music") == (want[f][0] == "not-music"), f"{door} under {name}"


def test_not_music_score_in_every_output_form(nm_model, tmp_path):
    """JSONL, CSV and the database row carry the score; a re-run under an override of the
    not-music threshold decides the stored rows again from their stored scores."""
    import csv

    from embedkit.deploy.batch import tag
    from embedkit.deploy.resultsdb import ResultsDB

    run, _, files = nm_model
    csv_out, db = tmp_path / "x.csv", tmp_path / "x.sqlite"
    _cli("tag", run, *files, "--out", csv_out, "--db", db, "--workers", "1")
    jsonl = _tag_cli(run, files, {}, tmp_path, "forms")
    with open(csv_out) as fh:
        rows_csv = {r["path"]: r for r in csv.DictReader(fh)}
    with ResultsDB(db) as d:
        rows_db = {r["path"]: r for r in d.rows()}
    rule = applied_rule(run)
    for f in files:
        j = jsonl[f]
        assert float(rows_csv[f]["not_music"]) == pytest.approx(j["not_music"], rel=1e-5)
        assert float(rows_csv[f]["not_music_threshold"]) == rule.not_music
        assert rows_db[f]["not_music"] == pytest.approx(j["not_music"]) and rows_db[f]["decision"] == j["decision"]
    # every track not-music under a threshold of 0: decided again from the stored scores
    again = tag(run, files, db=db, workers=1, not_music=0.0)
    assert again.model_loaded is False and all(r.decision == "not-music" for r in again.rows)


def test_nothing_is_written_into_a_non_music_file(nm_model, tmp_path):
    pytest.importorskip("mutagen")
    import soundfile as sf

    from embedkit.deploy.batch import tag
    from embedkit.deploy.writeback import FileTagOptions

    run, _, files = nm_model
    decided = {f: d for f, (d, _, _) in _scored(load_tagger(run), files, applied_rule(run)).items()}
    noise = [f for f in files if decided[f] == "not-music"]
    lib = tmp_path / "lib"
    lib.mkdir()
    copies = []
    for i, f in enumerate(noise):
        y, sr = sf.read(f)
        copies.append(lib / f"n{i}.flac")
        sf.write(copies[-1], y, sr)
    before = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in copies}
    res = tag(run, copies, db=tmp_path / "w.sqlite", workers=1, file_tags=FileTagOptions())
    assert res.file_tags.counts["not-music"] == len(copies) and not res.file_tags.counts["written"]
    for f in copies:
        assert (f.read_bytes(), f.stat().st_mtime_ns) == before[f]


def test_stream_windows_carry_the_not_music_decision(nm_model):
    """Each stream window's record: its own not-music score and the one rule's decision on it."""
    from embedkit.calibration import decide
    from embedkit.deploy.stream import StreamConfig, stream

    run, onnx, files = nm_model
    # an override between the two files' window scores (the stored threshold is for track means)
    t0 = load_tagger(run)
    window_scores = [
        s
        for f in (files[0], files[-4])
        for s in t0.score_segments(
            read_excerpt(
                f, t0.sample_rate, Excerpt.parse("full"), t0.audio.clip_s, t0.segment.segment_s, t0.segment.hop_s
            )[0]
        )[1]
    ]
    over = _between(window_scores, len(window_scores) // 2)
    decided = set()
    for path in (run, onnx):
        t = load_tagger(path)
        for f in (files[0], files[-4]):  # a synthetic clip and white noise
            recs: list[dict] = []
            summary = stream(path, f, StreamConfig(hop_s=t.segment.hop_s), emit=recs.append, not_music=over)
            wins = [r for r in recs if r["type"] == "window"]
            frames, _, _ = read_excerpt(
                f, t.sample_rate, Excerpt.parse("full"), t.audio.clip_s, t.segment.segment_s, t.segment.hop_s
            )
            p, nm = t.score_segments(frames)
            assert len(wins) == len(frames)
            rule = t.rule.with_overrides(not_music=over)
            assert summary["rule"] == rule.to_dict()
            for w, q, s in zip(wins, t.calibrate(p), nm):
                assert w["window"]["not_music"] == pytest.approx(s, rel=1e-6)
                assert w["window"]["decision"] == decide(q, t.labels, rule, s).label
            decided |= {w["window"]["decision"] == "not-music" for w in wins}
    assert decided == {True, False}  # windows of both kinds
