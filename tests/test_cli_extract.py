"""`embedkit extract` and `embedkit models` through typer's CliRunner: summaries, one-line
errors (never a traceback), exit codes for failures, --strict, warnings and Ctrl-C."""

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.store import find_store

runner = CliRunner()
FAST = ["--backbone", "tiny-test", "--clip", "10"]


def run(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.stdout + res.stderr, res.stderr
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res


def one_error_line(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, res.stderr
    return lines[0]


def tone(path, seconds=10.0, sr=16000, channels=1):
    t = np.arange(int(seconds * sr)) / sr
    y = 0.3 * np.sin(2 * np.pi * 220 * t)
    sf.write(path, np.stack([y] * channels, axis=1) if channels > 1 else y, sr)
    return path


@pytest.fixture
def mixed(tmp_path):
    """A folder dataset with two good clips and two bad ones."""
    root = tmp_path / "data"
    (root / "rock").mkdir(parents=True)
    (root / "jazz").mkdir()
    tone(root / "rock" / "good.wav")
    tone(root / "jazz" / "stereo.wav", sr=44100, channels=2)
    (root / "jazz" / "empty.wav").write_bytes(b"")
    (root / "rock" / "broken [live].flac").write_bytes(b"fLaC not really")
    return root


def test_extract_summary_failures_and_rerun(tmp_path, mixed):
    cache = tmp_path / "cache"
    res = run("extract", mixed, *FAST, "--cache", cache)
    assert res.exit_code == 0, res.stderr
    err = res.stderr
    assert "2 tracks extracted (4 segments), 0 already done, 2 failed" in err
    assert f"skipped {mixed / 'jazz' / 'empty.wav'}: empty file (0 bytes)" in err
    assert f"skipped {mixed / 'rock' / 'broken [live].flac'}: cannot decode audio" in err
    assert "extract tiny-test" in err and "4/4" in err  # the progress bar's final state
    store = find_store(cache, "tiny-test")
    assert len(store.read()[0]) == 4 and len(store.failures()) == 2
    again = run("extract", mixed, *FAST, "--cache", cache)
    assert again.exit_code == 0
    assert "0 tracks extracted (0 segments), 2 already done, 0 failed (+2 failed in earlier runs" in again.stderr
    strict = run("extract", mixed, *FAST, "--cache", cache, "--strict")
    assert strict.exit_code == 1 and one_error_line(strict) == "error: --strict: 2 of 4 files failed"


def test_nothing_extractable_exits_non_zero(tmp_path):
    root = tmp_path / "data" / "x"
    root.mkdir(parents=True)
    (root / "a.wav").write_bytes(b"")
    tone(root / "b.wav", seconds=2.0)
    res = run("extract", tmp_path / "data", *FAST, "--cache", tmp_path / "c")
    assert res.exit_code == 1
    assert one_error_line(res) == "error: nothing could be extracted: 2 of 2 files failed"
    assert "too short: 2.00 s < 5 s" in res.stderr


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda d: [d / "absent"], "no such file or directory"),
        (lambda d: [d / "data", "--backbone", "nope"], "unknown backbone 'nope'; valid names:"),
        (lambda d: [d / "data", "--pad", "mirror"], "--pad must be 'loop' or 'zero'"),
        (lambda d: [d / "data", "--batch-size", "0"], "--batch-size must be >= 1"),
        (lambda d: [d / "data", "--clip", "3"], "clip length 3 s is shorter than one 5 s segment"),
        (lambda d: [d / "bad.csv"], "manifest lacks column(s) label"),
        (lambda d: [d / "dup.csv"], "duplicate path"),
        (lambda d: [d / "data", "--output", "taggram"], "has no output(s) ['taggram']"),
    ],
)
def test_bad_arguments_give_one_line(tmp_path, make_args, message):
    (tmp_path / "data" / "rock").mkdir(parents=True)
    tone(tmp_path / "data" / "rock" / "a.wav")
    (tmp_path / "bad.csv").write_text("path,genre\ndata/rock/a.wav,rock\n")
    (tmp_path / "dup.csv").write_text("path,label\ndata/rock/a.wav,rock\ndata/rock/a.wav,jazz\n")
    args = make_args(tmp_path)
    res = run(
        "extract", *args, *(["--backbone", "tiny-test"] if "--backbone" not in args else []), "--cache", tmp_path / "c"
    )
    assert res.exit_code != 0
    assert message in one_error_line(res)


def test_warnings_are_one_line_each(tmp_path):
    (tmp_path / "a").mkdir()
    tone(tmp_path / "a" / "x.wav")
    (tmp_path / "m.csv").write_text("path,label\na/x.wav,rock\na/x.wav,rock\n")
    res = run("extract", tmp_path / "m.csv", *FAST, "--cache", tmp_path / "c")
    assert res.exit_code == 0
    assert "warning " in res.stderr and "1 repeated row(s) ignored" in res.stderr
    assert "warnings.warn" not in res.stderr and "EmbedkitWarning" not in res.stderr


def test_padding_note_and_decoder_chatter_goes_to_a_log(tmp_path):
    (tmp_path / "d" / "x").mkdir(parents=True)
    sf.write(tmp_path / "full.mp3", np.sin(np.arange(8 * 22050) / 10).astype(np.float32) * 0.3, 22050, format="MP3")
    cut = tmp_path / "d" / "x" / "cut.mp3"  # a cut MP3 decodes partially; libmpg123 complains on fd 2
    cut.write_bytes((tmp_path / "full.mp3").read_bytes()[:-3000])
    res = run("extract", tmp_path / "d", *FAST, "--cache", tmp_path / "c")
    assert res.exit_code == 0, res.stderr
    assert "note 1 clip(s) adjusted to the clip length" in res.stderr and "loop-padded" in res.stderr
    log = find_store(tmp_path / "c", "tiny-test").root / "decoder.log"
    if log.exists():  # depends on the libmpg123 build; when it speaks, it speaks into the log
        assert f"decoder messages: {log}" in res.stderr


def test_ctrl_c_and_internal_errors_are_one_line(tmp_path, monkeypatch):
    import embedkit.extract

    (tmp_path / "d" / "x").mkdir(parents=True)
    tone(tmp_path / "d" / "x" / "a.wav")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(embedkit.extract, "extract", interrupted)
    res = run("extract", tmp_path / "d", *FAST, "--cache", tmp_path / "c")
    assert res.exit_code == 130 and "finished work is kept" in one_error_line(res)

    def bug(*a, **k):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(embedkit.extract, "extract", bug)
    res = run("extract", tmp_path / "d", *FAST, "--cache", tmp_path / "c")
    assert res.exit_code == 1
    assert (
        one_error_line(res) == "error: internal error: ZeroDivisionError: oops (set EMBEDKIT_DEBUG=1 for the traceback)"
    )


def test_store_locked_by_another_run(tmp_path):
    (tmp_path / "d" / "x").mkdir(parents=True)
    tone(tmp_path / "d" / "x" / "a.wav")
    assert run("extract", tmp_path / "d", *FAST, "--cache", tmp_path / "c").exit_code == 0
    with find_store(tmp_path / "c", "tiny-test").lock():
        res = run("extract", tmp_path / "d", *FAST, "--cache", tmp_path / "c")
    assert res.exit_code == 1 and "another embedkit run is writing this store" in one_error_line(res)


def test_models_lists_backbones():
    res = run("models")
    assert res.exit_code == 0
    for name, sr, dim in (("melstats", "22050 Hz", "218"), ("tiny-test", "16000 Hz", "32")):
        line = next(ln for ln in res.stdout.splitlines() if f" {name} " in ln)
        assert sr in line and f" {dim} " in line
    assert "hand-crafted" in res.stdout
    res = run("models", "nomatch*")
    assert res.exit_code == 1 and "no backbone matches 'nomatch*'" in one_error_line(res)
