"""`embedkit stream` on real runs (melstats + lr fitted with `embedkit fit` on the generated
dataset): same window probabilities as `tag --excerpt full`, the CLI on a file, --realtime and
an ffmpeg pipe."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.synth import make_clip

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def melstats_run(synth_dataset, tmp_path_factory):
    from embedkit.datasets import load_dataset
    from embedkit.extract import extract

    tmp = tmp_path_factory.mktemp("streamrun")
    extract(load_dataset(synth_dataset), "melstats", cache=tmp / "cache", workers=2)
    res = runner.invoke(
        app,
        ["fit", "--backbone", "melstats", "--head", "lr", "--cache", str(tmp / "cache"), "--runs", str(tmp / "runs")],
    )
    assert res.exit_code == 0, res.output
    (run,) = list((tmp / "runs").iterdir())
    return run


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    """A 44.1 kHz stereo 'song' of three generated classes, 12 s each (not a training clip)."""
    y = np.concatenate([make_clip(c, 999 + c, 44100, 12.0) for c in (0, 1, 2)])
    path = tmp_path_factory.mktemp("song") / "song.wav"
    sf.write(path, np.stack([y, 0.8 * y], axis=1), 44100)
    return path


def stream_records(*args):
    res = runner.invoke(app, ["stream", *map(str, args)])
    assert res.exit_code == 0, res.output
    return [json.loads(l) for l in res.stdout.splitlines() if l.strip()]


def test_stream_equals_tag_excerpt_full(melstats_run, song, tmp_path):
    """Per-window probabilities: stream vs the windows `tag --excerpt full` reads (read_excerpt)
    through the same Tagger; track probabilities: stream's mean window vs the row that
    `embedkit tag --excerpt full` writes."""
    from embedkit.deploy.batch import Excerpt, read_excerpt
    from embedkit.deploy.tagger import load_tagger

    t = load_tagger(melstats_run)
    hop = t.segment.hop_s
    recs = stream_records(melstats_run, song, "--hop", hop)
    wins = [r for r in recs if r["type"] == "window"]
    frames, starts, _ = read_excerpt(
        str(song), t.sample_rate, Excerpt.parse("full"), t.audio.clip_s, t.segment.segment_s, hop
    )
    ref = t.calibrate(t.predict_segments(frames))
    assert len(wins) == len(frames) == 7
    np.testing.assert_allclose([r["start_s"] for r in wins], starts, atol=1e-6)
    got = np.array([[r["raw"][l] for l in t.labels] for r in wins])
    np.testing.assert_allclose(got, ref, atol=1e-5)

    out = tmp_path / "tags.jsonl"
    res = runner.invoke(
        app, ["tag", str(melstats_run), str(song), "--excerpt", "full", "--out", str(out), "--workers", "1"]
    )
    assert res.exit_code == 0, res.output
    row = json.loads(out.read_text().splitlines()[0])
    track = t.calibrate(got.mean(axis=0))
    np.testing.assert_allclose([row["probabilities"][l] for l in t.labels], track, atol=1e-5)


def test_cli_stream_file_decisions_and_summary(melstats_run, song):
    recs = stream_records(melstats_run, song, "--hop", "1", "--smooth", "ema:2", "--min-duration", "2")
    wins, summary = recs[:-1], recs[-1]
    labels = set(wins[0]["raw"])
    assert len(labels) == 4 and all(r["type"] == "window" for r in wins)
    assert [r["k"] for r in wins] == list(range(len(wins))) and len(wins) == 32  # (36 - 5) / 1 + 1
    for r in wins:
        assert sum(r["raw"].values()) == pytest.approx(1, abs=1e-4) and sum(r["smoothed"].values()) == pytest.approx(
            1, abs=1e-4
        )
        assert r["decision"] in labels | {"uncertain"} and r["lagging"] is False and r["dropped"] == 0
    assert summary["type"] == "summary" and summary["end"] == "eof" and summary["audio_s"] == 36.0
    assert summary["windows"] == 32 and summary["realtime_factor"] > 1
    assert set(summary["share"]) <= labels | {"uncertain"}


@pytest.mark.slow
def test_cli_realtime_paces_the_file(melstats_run, tmp_path):
    path = tmp_path / "short.flac"
    sf.write(path, make_clip(1, 5, 22050, 5.5), 22050)
    recs = stream_records(melstats_run, path, "--realtime", "--hop", "0.25")
    summary = recs[-1]
    assert summary["windows"] == 3 and summary["audio_s"] == 5.5
    assert 5.4 <= summary["wall_s"] < 9.0  # paced at 1x, not read at once
    assert all(r["delay_ms"] < 3000 for r in recs[:-1])  # each record soon after its window (loose: shared CPUs)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")
@pytest.mark.slow
def test_ffmpeg_pipe_like_the_readme(melstats_run, song):
    """`ffmpeg -i SONG -f f32le -ac 1 -ar 44100 - | embedkit stream RUN - --format f32le --rate 44100`."""
    ff = subprocess.Popen(
        ["ffmpeg", "-v", "error", "-i", str(song), "-f", "f32le", "-ac", "1", "-ar", "44100", "-"],
        stdout=subprocess.PIPE,
    )
    st = subprocess.run(
        [
            sys.executable,
            "-m",
            "embedkit.cli",
            "stream",
            str(melstats_run),
            "-",
            "--format",
            "f32le",
            "--rate",
            "44100",
        ],
        stdin=ff.stdout,
        capture_output=True,
        cwd=ROOT,
        timeout=120,
    )
    ff.stdout.close()
    assert ff.wait() == 0 and st.returncode == 0, st.stderr
    recs = [json.loads(l) for l in st.stdout.splitlines()]
    assert recs[-1]["type"] == "summary" and recs[-1]["audio_s"] == pytest.approx(36.0, abs=0.01)
    assert recs[-1]["windows"] == len(recs) - 1 == 13  # (36 - 5) / 2.5 + 1
    assert st.stderr == b""


@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_stream_a_cnn_run(synth_dataset, song, tmp_path):
    """A scratch-CNN run (tiny channels, 1 epoch) streams through the same path: its windows'
    probabilities equal the CNN's on segment() of the whole file."""
    from embedkit.cnn.train import TrainConfig, train_cnn
    from embedkit.config import AudioConfig
    from embedkit.datasets import load_dataset
    from embedkit.deploy.batch import Excerpt, read_excerpt
    from embedkit.deploy.tagger import load_tagger

    res = train_cnn(
        load_dataset(synth_dataset),
        train=TrainConfig(epochs=1, batch_size=4),
        channels=(4, 8),
        audio_cfg=AudioConfig(clip_s=12.0),
        runs_dir=tmp_path / "runs",
        cache=tmp_path / "cache",
        threads=1,
        workers=1,
    )
    t = load_tagger(res.run_dir)
    assert t.kind == "cnn"
    wins = [r for r in stream_records(res.run_dir, song, "--hop", "3") if r["type"] == "window"]
    frames, _, _ = read_excerpt(
        str(song), t.sample_rate, Excerpt.parse("full"), t.audio.clip_s, t.segment.segment_s, 3.0
    )
    assert len(wins) == len(frames) == 11
    np.testing.assert_allclose(
        [[r["raw"][l] for l in t.labels] for r in wins], t.calibrate(t.predict_segments(frames)), atol=1e-5
    )
