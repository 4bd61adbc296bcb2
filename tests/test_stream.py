"""`embedkit stream`: windows identical to embedkit.audio.segments over long streams, streaming
resampling, smoothing and hysteresis on three concatenated synthetic genres, raw PCM formats
and rates, the drop policy, bounded memory over an hour, and every way a stream can end."""

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st
from stream_fixtures import GENRES, pcm_bytes, recording_tagger, three_genres, tone_tagger
from typer.testing import CliRunner

import embedkit.deploy.stream as stream_mod
from embedkit.audio.decoding import load, resample
from embedkit.audio.segments import segment, window_starts
from embedkit.cli import app
from embedkit.config import AudioConfig, SegmentConfig
from embedkit.deploy.stream import (
    Decider,
    FileSource,
    LiveView,
    PcmSource,
    Resampler,
    StreamConfig,
    Windower,
    run_stream,
)

from conftest import FMA_SAMPLE, needs_shared

TESTS = Path(__file__).resolve().parent
runner = CliRunner()
PART_S = 30.0  # seconds of each synthetic genre
HYST = ["--hop", "1", "--smooth", "ema:7.5", "--enter", "0.6", "--exit", "0.4", "--min-duration", "5"]
RAW = ["--hop", "1", "--smooth", "none", "--enter", "0", "--exit", "0", "--min-duration", "0"]


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def run_cli(args, data: bytes, monkeypatch, noise=1.0):
    monkeypatch.setattr(stream_mod, "load_model", lambda m, checkpoint=None: tone_tagger(noise=noise))
    return runner.invoke(app, ["stream", "tone", *args], input=data)


def blocks_of(y, rng, max_block=5000):
    i = 0
    while i < len(y):
        n = int(rng.integers(0, max_block))
        yield y[i : i + n]
        i += n


# ---------------------------------------------------------------------------------- windows


@settings(max_examples=40, deadline=None)
@given(
    sr=st.sampled_from([8000, 16000, 22050, 44100]),
    segment_s=st.floats(0.01, 0.5),
    hop_s=st.floats(0.003, 0.6),
    n=st.integers(0, 30000),
    seed=st.integers(0, 2**31),
)
def test_windower_cuts_what_segment_cuts(sr, segment_s, hop_s, n, seed):
    rng = np.random.default_rng(seed)
    y = rng.standard_normal(n).astype(np.float32)
    w = Windower(sr, segment_s, hop_s)
    got = [out for b in blocks_of(y, rng, 3000) for out in w.push(b)]
    frames, start_s, _ = segment(y, sr, SegmentConfig(segment_s, hop_s))
    assert [k for k, _, _ in got] == list(range(len(frames)))
    assert np.array_equal(np.array([s for _, s, _ in got], dtype=np.int64), window_starts(n, sr, segment_s, hop_s))
    if len(frames):
        assert np.array_equal(np.stack([f for _, _, f in got]), frames)
    # memory: never more than one window + one hop + the last block
    assert len(w._buf) <= w.length + hop_s * sr + 3000 + 1


@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_window_starts_do_not_drift_over_an_hour():
    """A hop that is not a whole number of samples (98.4 at 8 kHz): an accumulated rounded hop
    would be 0.4 sample per window off, 117 000 samples (14.6 s) after the hour's 292 682 windows."""
    sr, segment_s, hop_s = 8000, 0.02, 0.0123
    n_total = 3600 * sr
    w = Windower(sr, segment_s, hop_s)
    rng = np.random.default_rng(1)
    zeros = np.zeros(20000, dtype=np.float32)
    starts, pushed = [], 0
    while pushed < n_total:
        m = min(int(rng.integers(1, 20000)), n_total - pushed)
        starts.extend(s for _, s, _ in w.push(zeros[:m]))
        pushed += m
    expected = window_starts(n_total, sr, segment_s, hop_s)
    assert len(starts) == len(expected) > 290_000
    assert np.array_equal(np.asarray(starts), expected)


@pytest.mark.parametrize("sr_in,sr_out", [(44100, 16000), (22050, 16000), (48000, 22050), (16000, 16000)])
def test_streaming_resampler_equals_whole_file_resampling(sr_in, sr_out):
    rng = np.random.default_rng(2)
    y = (0.1 * rng.standard_normal(sr_in * 7)).astype(np.float32)
    rs = Resampler(sr_in, sr_out)
    out = np.concatenate([rs.push(b) for b in blocks_of(y, rng)] + [rs.push(np.zeros(0, np.float32), last=True)])
    whole = resample(y, sr_in, sr_out)
    assert len(out) == len(whole)
    np.testing.assert_allclose(out, whole, atol=1e-6)


def test_file_stream_matches_whole_file_segments(tmp_path):
    """The per-window probabilities of a stream are those of the whole decoded file cut by
    embedkit.audio.segments (stereo 44.1 kHz file, model at 8 kHz, hop not a multiple of the block)."""
    tagger = tone_tagger(noise=1.0)
    y = three_genres(44100, part_s=8.0)
    path = tmp_path / "song.flac"
    sf.write(path, np.stack([y, 0.5 * y], axis=1), 44100)
    recs = []
    run_stream(tagger, FileSource(path, block_frames=3001), StreamConfig(hop_s=0.7), recs.append)
    wins = [r for r in recs if r["type"] == "window"]
    whole = load(path, tagger.sample_rate, AudioConfig(clip_s=None))
    frames, start_s, end_s = segment(whole, tagger.sample_rate, SegmentConfig(tagger.segment.segment_s, 0.7))
    ref = tagger.calibrate(tagger.predict_segments(frames))
    assert len(wins) == len(frames) > 25
    rec = recording_tagger()
    run_stream(rec, FileSource(path, block_frames=3001), StreamConfig(hop_s=0.7), lambda r: None)
    np.testing.assert_allclose(np.concatenate(rec.seen), frames, atol=1e-6)  # the very samples
    np.testing.assert_allclose([r["start_s"] for r in wins], start_s, atol=1e-6)
    np.testing.assert_allclose([[r["raw"][g] for g in GENRES] for r in wins], ref, atol=1e-5)


# ------------------------------------------------------------------- decisions and changes


@pytest.mark.parametrize("seed,order", [(0, (0, 1, 2)), (1, (2, 0, 1)), (3, (0, 2, 1))])
def test_three_genres_change_events_with_and_without_hysteresis(seed, order, monkeypatch):
    """Each genre is entered once, between its boundary and 22 s after it (window 2 s, ema 7.5 s,
    minimum duration 5 s, maybe via `uncertain`; measured 7-20 s); with smoothing and hysteresis
    off, the noisy model's raw decisions also change into genres that are not playing."""
    data = pcm_bytes(three_genres(22050, PART_S, seed=seed, order=order), "f32le")
    truth = [GENRES[c] for c in order]
    res = run_cli(["-", "--rate", "22050", *HYST], data, monkeypatch)
    assert res.exit_code == 0, res.output
    recs = records(res.stdout)
    changes = [(r["time_s"], r["change"]) for r in recs if r["type"] == "window" and r["change"]]
    into_genres = [(t, c["to"]) for t, c in changes if c["to"] != "uncertain"]
    assert [g for _, g in into_genres] == truth
    for (t, g), boundary in zip(into_genres, (0.0, PART_S, 2 * PART_S)):
        assert boundary < t <= boundary + 22.0, (g, t)
    summary = recs[-1]
    assert summary["type"] == "summary" and summary["end"] == "eof" and summary["changes"] == len(changes)
    assert sum(summary["share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert all(summary["share"][g] > 0.15 for g in GENRES)

    raw = run_cli(["-", "--rate", "22050", *RAW], data, monkeypatch)
    raw_changes = [
        (r["time_s"], r["change"]["to"]) for r in records(raw.stdout) if r["type"] == "window" and r["change"]
    ]
    spurious = [(t, g) for t, g in raw_changes if g != truth[min(int((t - 1e-9) // PART_S), 2)]]
    assert len(raw_changes) > 3 and spurious  # the flicker that smoothing and hysteresis removed


@settings(max_examples=60, deadline=None)
@given(
    ps=st.lists(st.lists(st.floats(0.01, 1.0), min_size=3, max_size=3), min_size=1, max_size=60),
    enter=st.floats(0.4, 0.9),
    gap=st.floats(0.0, 0.3),
    min_d=st.sampled_from([0.0, 1.0, 3.0]),
)
def test_decider_invariants(ps, enter, gap, min_d):
    """Commits are at least min_duration apart; a genre is entered only at >= enter."""
    d = Decider(list(GENRES), enter, enter - gap, min_d)
    last_t = None
    for i, p in enumerate(ps):
        p = np.asarray(p) / np.sum(p)
        ch = d.update(p, float(i))
        if ch:
            if last_t is not None:
                assert i - last_t >= min_d
            if ch["to"] != "uncertain":
                assert p[GENRES.index(ch["to"])] >= enter
            assert d.state == ch["to"] and ch["from"] != ch["to"]
            last_t = i


# ------------------------------------------------------------------------- stdin formats


@pytest.mark.parametrize("fmt", ["f32le", "s16le"])
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("rate", [22050, 44100, 48000])
def test_stdin_formats_channels_rates(fmt, channels, rate, monkeypatch):
    y = three_genres(rate, part_s=12.0, seed=rate)
    res = run_cli(
        [
            "-",
            "--format",
            fmt,
            "--rate",
            str(rate),
            "--channels",
            str(channels),
            "--hop",
            "1",
            "--smooth",
            "ema:2",
            "--min-duration",
            "2",
        ],
        pcm_bytes(y, fmt, channels),
        monkeypatch,
        noise=0.0,
    )
    assert res.exit_code == 0, res.output
    recs = records(res.stdout)
    summary = recs[-1]
    assert summary["audio_s"] == pytest.approx(36.0, abs=1e-3)
    assert summary["windows"] == len(window_starts(36 * 8000, 8000, 2.0, 1.0))
    wins = [r for r in recs if r["type"] == "window"]
    # the model sees the right signal: each part's middle window decides its genre
    for c, g in enumerate(GENRES):
        mid = min(wins, key=lambda r: abs(r["start_s"] - (12 * c + 6)))
        assert max(mid["raw"], key=mid["raw"].get) == g
    assert [c["to"] for c in (r["change"] for r in wins) if c] == list(GENRES)


# ------------------------------------------------------------------ malformed input, flags


@pytest.mark.parametrize(
    "data,args,message",
    [
        (pcm_bytes(np.zeros(40000), "f32le") + b"\x00\x01\x02", [], "stream ended inside a frame (3 trailing bytes"),
        (
            pcm_bytes(np.zeros(40000), "s16le", 2) + b"\x00",
            ["--format", "s16le", "--channels", "2"],
            "(1 trailing bytes; a s16le frame of 2 channel(s) is 4 bytes)",
        ),
        (b"hello, this is not audio at all, just a line of text\n" * 200, [], "is text, not raw f32le audio"),
        (b"RIFF\x24\x08\x00\x00WAVEfmt " + bytes(4000), [], "holds a WAV file, not raw PCM"),
        (b"fLaC" + bytes(4000), ["--format", "s16le"], "holds a FLAC file"),
        (b"ID3\x04" + bytes(4000), [], "holds an MP3 file"),
        (pcm_bytes(three_genres(8000, 2.0), "s16le"), [], "not 1-channel f32le audio"),  # s16le bytes read as f32le
        (bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8)), [], "not 1-channel f32le audio"),
    ],
)
def test_malformed_stdin_is_one_line(data, args, message, monkeypatch):
    res = run_cli(["-", *args], data, monkeypatch)
    assert res.exit_code == 1
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: <stdin>: ") and message in err[0], res.stderr
    assert "Traceback" not in res.output
    summary = records(res.stdout)[-1]
    assert summary["type"] == "summary" and summary["end"] == "error"


def test_truncated_final_frame_keeps_the_windows_before_it(monkeypatch):
    y = three_genres(8000, part_s=5.0)
    res = run_cli(["-", "--rate", "8000", "--hop", "1"], pcm_bytes(y, "f32le") + b"\x00\x00", monkeypatch)
    assert res.exit_code == 1 and "the 15.00 s before it were processed" in res.stderr
    recs = records(res.stdout)
    assert sum(r["type"] == "window" for r in recs) == 14 and recs[-1]["audio_s"] == 15.0


@pytest.mark.parametrize(
    "args,message",
    [
        (["-", "--format", "mp3"], "--format must be f32le or s16le"),
        (["-", "--rate", "0"], "--rate must be 8000..384000 Hz, got 0"),
        (["-", "--rate", "1"], "--rate must be 8000..384000 Hz, got 1"),  # grew to 6.5 GB before (issue 27)
        (["-", "--rate", "2147483647"], "--rate must be 8000..384000 Hz"),  # "uncertain", exit 0 before
        (["-", "--channels", "65"], "--channels must be between 1 and 64"),
        (["-", "--channels", "0"], "--channels must be between 1 and 64"),
        (["-", "--realtime"], "--realtime paces a file"),
        (["-", "--hop", "0"], "hop must be positive"),
        (["-", "--smooth", "ema:-1"], "smoothing 'ema:-1'"),
        (["-", "--smooth", "last:2.5"], "smoothing 'last:2.5'"),
        (["-", "--enter", "0.3", "--exit", "0.5"], "thresholds need 0 <= exit <= enter <= 1"),
        (["-", "--view", "tv"], "--view must be auto, json or live"),
        (["song.wav", "--rate", "16000"], "describe raw PCM on stdin"),
        (["missing.wav"], "missing.wav: file not found"),
    ],
)
def test_bad_flags_are_one_line(args, message, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    res = run_cli(args, b"", monkeypatch)
    assert res.exit_code != 0
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Traceback" not in res.output


def test_not_an_audio_file(tmp_path, monkeypatch):
    bad = tmp_path / "notes.mp3"
    bad.write_text("not audio\n" * 100)
    res = run_cli([str(bad)], b"", monkeypatch)
    assert res.exit_code == 1 and res.stderr.startswith(f"error: {bad}: cannot decode audio")


# ---------------------------------------------------------------------- lag and drop policy


class FakeClock:
    def __init__(self):
        self.t = 1000.0
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            return self.t

    def advance(self, dt):
        with self.lock:
            self.t += dt


def slow_tagger(clock, per_window_s, ready=lambda: True):
    """A tagger taking per_window_s of the fake clock per window; every call first waits (real
    time) until ready(), so the reader has queued what it can whatever the machine's load."""
    tg = tone_tagger()
    inner = tg.predict_segments

    class Slow(type(tg)):
        def predict_segments(self, segments):
            t_end = time.monotonic() + 10
            while not ready() and time.monotonic() < t_end:
                time.sleep(0.01)
            clock.advance(per_window_s * len(segments))  # compute time, on the fake clock
            return inner(segments)

    return Slow(**{f: getattr(tg, f) for f in tg.__dataclass_fields__})


@pytest.mark.parametrize("batch", [1, 8])
def test_live_source_behind_real_time_drops_and_says_lagging(batch):
    """A model taking 1.5 s (of the fake clock) per window on a live 1 s-hop stream: late windows
    are dropped (the newest kept), records say lagging and how many were dropped."""
    clock = FakeClock()
    data = pcm_bytes(three_genres(8000, part_s=20.0), "f32le")
    fh = io.BytesIO(data)
    src = PcmSource(fh, "f32le", 8000, 1, live=True)
    recs = []
    # queue > the 59 windows: the reader never waits, so the first call sees everything read
    tagger = slow_tagger(clock, 1.5, ready=lambda: fh.tell() == len(data))
    summary = run_stream(tagger, src, StreamConfig(hop_s=1.0, queue=64, batch=batch), recs.append, clock=clock)
    wins = [r for r in recs if r["type"] == "window"]
    total = len(window_starts(60 * 8000, 8000, 2.0, 1.0))
    assert summary["dropped"] > 0 and summary["windows"] + summary["dropped"] == total
    assert sum(r["dropped"] for r in wins) == summary["dropped"]
    assert any(r["lagging"] for r in wins)
    assert [r["k"] for r in wins] == sorted(r["k"] for r in wins)


def test_file_read_as_fast_as_possible_never_drops():
    clock = FakeClock()
    y = three_genres(8000, part_s=5.0)
    src = PcmSource(io.BytesIO(pcm_bytes(y, "f32le")), "f32le", 8000, 1, live=False)
    summary = run_stream(
        slow_tagger(clock, 3.0), src, StreamConfig(hop_s=1.0, queue=2, batch=1), lambda r: None, clock=clock
    )
    assert summary["dropped"] == 0 and summary["windows"] == 14


def test_realtime_file_is_paced_at_1x(tmp_path):
    clock = FakeClock()
    path = tmp_path / "a.wav"
    sf.write(path, three_genres(8000, part_s=2.0), 8000)
    src = FileSource(path, realtime=True, clock=clock, sleep=clock.advance)
    t0, delivered = clock(), 0
    for b in src.blocks():
        delivered += len(b)
        assert clock() - t0 >= delivered / 8000 - 1e-9  # never before its last sample has played
    assert clock() - t0 == pytest.approx(6.0, abs=1e-6)


# ------------------------------------------------------------------------ microphone (fake)


def fake_sounddevice(y, sr, block=800):
    mod = types.ModuleType("sounddevice")
    mod.query_devices = lambda device, kind: {"name": "fake input", "default_samplerate": sr}

    class InputStream:
        def __init__(self, device, samplerate, channels, dtype, blocksize, callback):
            self.cb, self.block, self.channels = callback, blocksize, channels
            self.closed = threading.Event()

        def start(self):
            def feed():
                for i in range(0, len(y), self.block):
                    if self.closed.is_set():
                        return
                    self.cb(np.repeat(y[i : i + self.block, None], self.channels, axis=1), self.block, None, None)

            threading.Thread(target=feed, daemon=True).start()

        def stop(self):
            self.closed.set()

        close = stop

    mod.InputStream = InputStream
    return mod


def test_microphone_through_sounddevice_until_ctrl_c(monkeypatch):
    y = three_genres(16000, part_s=6.0)
    monkeypatch.setitem(sys.modules, "sounddevice", fake_sounddevice(y, 16000))
    recs = []

    def emit(r):
        recs.append(r)
        if r["type"] == "window" and r["k"] == 10:
            raise KeyboardInterrupt  # Ctrl-C while the input keeps coming

    src = stream_mod.open_source("mic:fake", channels=2)
    summary = run_stream(tone_tagger(), src, StreamConfig(hop_s=1.0), emit)
    assert src.name == "mic:fake input" and src.sample_rate == 16000
    assert summary["end"] == "interrupted" and summary["windows"] == 11
    assert recs[-1]["type"] == "summary"


def test_microphone_without_sounddevice_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", None)
    res = run_cli(["mic"], b"", monkeypatch)
    assert res.exit_code == 1
    assert (
        res.stderr.strip() == "error: sounddevice is required for microphone input: run `pip install 'embedkit[live]'`"
    )


# ------------------------------------------------------------------------------ live view


def test_live_view_renders_decision_bars_and_summary():
    from rich.console import Console

    buf = io.StringIO()
    view = LiveView(Console(file=buf, width=100, force_terminal=False))
    rec = {
        "type": "window",
        "time_s": 75.0,
        "decision": "mid",
        "lagging": True,
        "smoothed": {"low": 0.1, "mid": 0.7, "high": 0.2},
        "change": {"from": "low", "to": "mid"},
    }
    view(rec)
    view(
        {
            "type": "summary",
            "end": "eof",
            "audio_s": 90.0,
            "windows": 89,
            "changes": 3,
            "share": {"mid": 0.5, "low": 0.5},
        }
    )
    text = buf.getvalue()
    assert "0:01:15.0" in text and "mid" in text and "lagging" in text and "low -> mid" in text
    assert "█" * 28 in text  # 0.7 of a 40-character bar
    assert "stream ended (eof)" in text and "50.0%" in text


# ---------------------------------------------------- child processes: pipes, signals, memory


def child(args, **kw):
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{TESTS.parent}", OMP_NUM_THREADS="1", **kw.pop("env", {}))
    return subprocess.Popen(
        [sys.executable, str(TESTS / "stream_fixtures.py"), "stream", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        **kw,
    )


def feed(proc, data: bytes, chunk=1 << 16, pause=0.0):
    def run():
        try:
            for i in range(0, len(data), chunk):
                proc.stdin.write(data[i : i + chunk])
                if pause:
                    time.sleep(pause)
            proc.stdin.close()
        except (BrokenPipeError, ValueError, OSError):
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.slow  # several seconds: the fast tier keeps a minute
def test_broken_pipe_stops_quietly():
    """`embedkit stream ... | head -2`: the reader leaves; the stream stops, exit 0, nothing on stderr."""
    p = child(["tone", "-", "--format", "s16le", "--rate", "8000", "--hop", "0.5"])
    feed(p, pcm_bytes(np.tile(three_genres(8000, 10.0), 20), "s16le"))  # 10 minutes
    first = [p.stdout.readline() for _ in range(2)]
    assert all(json.loads(line)["type"] == "window" for line in first)
    p.stdout.close()
    assert p.wait(timeout=60) == 0
    assert p.stderr.read() == b""


@pytest.mark.slow
def test_ctrl_c_writes_the_summary_and_exits_130():
    p = child(["tone", "-", "--format", "s16le", "--rate", "8000", "--hop", "1"])
    feed(
        p, pcm_bytes(np.tile(three_genres(8000, 20.0), 10), "s16le"), chunk=8000, pause=0.25
    )  # 2x real time for 5 minutes: still streaming at the signal, however loaded the machine
    lines = [p.stdout.readline() for _ in range(3)]
    assert all(json.loads(line)["type"] == "window" for line in lines)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130
    summary = json.loads(out.splitlines()[-1])
    assert summary["type"] == "summary" and summary["end"] == "interrupted" and summary["windows"] >= 3
    assert err.decode().strip().splitlines() == [err.decode().strip()] and err.startswith(b"error: interrupted after ")


def _peak_rss_mb(minutes: float) -> tuple[float, dict]:
    part = three_genres(8000, 10.0)
    data = pcm_bytes(part, "s16le")
    p = child(["tone", "-", "--format", "s16le", "--rate", "8000"], env={"STREAM_TEST_RSS": "1"})
    reps = int(minutes * 60 / 30)

    def run():
        for _ in range(reps):
            p.stdin.write(data)
        p.stdin.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    out = p.stdout.read()  # not communicate(): it would close stdin under the writer
    err = p.stderr.read()
    assert p.wait(timeout=300) == 0, err
    kb = int(err.decode().strip().splitlines()[-1].split("=")[1])
    return kb / 1024, json.loads(out.splitlines()[-1])


@pytest.mark.slow
def test_one_hour_stream_in_bounded_memory():
    """Peak RSS of a 6-minute and a 60-minute stdin stream (s16le 8 kHz, 2.5 s hop): the hour
    adds under 8 MB (measured: 65.4 MB for 6 min, 1 h and 3 h alike)."""
    small, s_small = _peak_rss_mb(6)
    big, s_big = _peak_rss_mb(60)
    assert s_big["audio_s"] == 3600.0 and s_big["windows"] == len(window_starts(3600 * 8000, 8000, 2.0, 2.5))
    assert big - small < 8.0, (small, big)


def test_cli_live_view(monkeypatch):
    res = run_cli(
        ["-", "--rate", "8000", "--hop", "1", "--view", "live"],
        pcm_bytes(three_genres(8000, 4.0), "f32le"),
        monkeypatch,
        noise=0.0,
    )
    assert res.exit_code == 0, res.output
    assert "stream ended (eof)" in res.stdout and "uncertain" in res.stdout and '"type"' not in res.stdout


@needs_shared
def test_mp3_read_in_blocks_equals_the_whole_decode():
    """The real FMA clip (44.1 kHz stereo MP3): block-wise decoding, down-mix and streaming
    resampling give the windows of the whole decoded file."""
    tagger = recording_tagger(sr=16000, segment_s=3.0)
    run_stream(tagger, FileSource(FMA_SAMPLE, block_frames=4096), StreamConfig(hop_s=1.5), lambda r: None)
    whole = load(FMA_SAMPLE, 16000, AudioConfig(clip_s=None))
    frames, _, _ = segment(whole, 16000, SegmentConfig(3.0, 1.5))
    seen = np.concatenate(tagger.seen)
    assert seen.shape == frames.shape == (18, 48000)
    np.testing.assert_allclose(seen, frames, atol=1e-6)


def test_stream_shorter_than_one_window_ends_cleanly(monkeypatch):
    res = run_cli(
        ["-", "--rate", "8000"], pcm_bytes(three_genres(8000, 0.5), "f32le"), monkeypatch
    )  # 1.5 s < 2 s window
    assert res.exit_code == 0
    (summary,) = records(res.stdout)
    assert summary["windows"] == 0 and summary["audio_s"] == 1.5 and summary["end"] == "eof" and summary["share"] == {}


def test_stdin_on_a_terminal_is_refused(monkeypatch):
    class Tty(io.BytesIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Tty())
    with pytest.raises(stream_mod.StreamError, match="stdin is a terminal, not audio"):
        stream_mod.open_source("-")


def test_smoother_ema_follows_stream_time_and_last_n():
    from embedkit.deploy.stream import Smoother

    ema = Smoother("ema:5")
    a, b = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    np.testing.assert_allclose(ema.update(a, 1.0), a)
    # a gap of one time constant (dropped windows) moves 1 - 1/e of the way, not one hop's worth
    np.testing.assert_allclose(ema.update(b, 5.0), a + (1 - np.exp(-1)) * (b - a))
    last = Smoother("last:2")
    last.update(a, 1.0)
    last.update(b, 1.0)
    np.testing.assert_allclose(last.update(b, 1.0), b)
    np.testing.assert_allclose(Smoother("none").update(a, 1.0), a)


# ------------------------------------------------------------------ issue 27: sane rates, abnormal ends


def test_a_file_whose_header_rate_is_not_audio_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "odd.wav"
    sf.write(path, np.zeros(4000, np.float32), 1000)  # a valid WAV at 1 kHz: no audio has that rate
    res = run_cli([str(path)], b"", monkeypatch)
    assert res.exit_code == 1 and "sample rate 1000 Hz is outside 8000..384000 Hz" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


class _PipeFromWriter:
    """stdin from a writer process (this process is its parent, so its exit stays visible):
    at the second read, ``act(proc)`` ends the writer mid-stream."""

    WRITER = (
        "import sys; sys.stdout.buffer.write(bytes(4 * 8000 * 12)); sys.stdout.buffer.flush(); "
        "sys.stdin.readline(); sys.exit(int(sys.argv[1]))"
    )

    def __init__(self, exit_code: int, act):
        r, w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.WRITER, str(exit_code)], stdout=w, stdin=subprocess.PIPE
        )
        os.close(w)
        self.fd, self.reads, self.act = r, 0, act

    def read1(self, n: int) -> bytes:
        self.reads += 1
        if self.reads == 2:
            self.act(self.proc)
        return os.read(self.fd, n)

    def close(self):
        os.close(self.fd)
        self.proc.wait(10)


def _quit(proc):
    proc.stdin.write(b"\n")
    proc.stdin.close()


@pytest.mark.parametrize(
    "exit_code,act,message",
    [
        (0, lambda p: p.kill(), "the program writing it (python"),
        (3, _quit, "failed with exit status 3"),
        (0, _quit, None),
    ],
)
def test_an_input_that_ended_abnormally_is_an_error_not_an_end(exit_code, act, message):
    """ffmpeg killed mid-stream read as a normal end (exit 0); now the writer's death or failure
    is reported with the windows before it kept (issue 27 #10)."""
    from embedkit.errors import StreamError

    fh = _PipeFromWriter(exit_code, act)
    out: list[dict] = []
    try:
        src = PcmSource(fh, "f32le", 8000, 1, live=False)
        if message is None:
            summary = run_stream(tone_tagger(), src, StreamConfig(hop_s=1.0), out.append)
            assert summary["end"] == "eof" and summary["audio_s"] == 12.0
        else:
            with pytest.raises(StreamError) as err:
                run_stream(tone_tagger(), src, StreamConfig(hop_s=1.0), out.append)
            msg = str(err.value)
            assert message in msg and "ended abnormally" in msg, msg
            if exit_code == 0:  # killed while it still had audio to write
                assert "killed by SIGKILL after " in msg and "after 12.00 s" not in msg, msg
            else:
                assert "after 12.00 s of audio" in msg, msg
            assert out[-1]["type"] == "summary" and out[-1]["end"] == "error"
            assert sum(r["type"] == "window" for r in out) > 0  # the windows before the end are kept
    finally:
        fh.close()


@pytest.mark.slow
@pytest.mark.skipif(not __import__("shutil").which("ffmpeg"), reason="ffmpeg not installed")
def test_cli_reports_ffmpeg_killed_mid_stream():
    """`ffmpeg ... | embedkit stream RUN -` with ffmpeg killed (kill -9) after the first windows:
    exit 1 and one line naming it, instead of exit 0."""
    ff = subprocess.Popen(
        ["ffmpeg", "-v", "error", "-re", "-f", "lavfi", "-i", "sine=f=440:r=8000", "-f", "f32le", "-ac", "1", "-"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{TESTS.parent}", OMP_NUM_THREADS="1")
    p = subprocess.Popen(
        [sys.executable, str(TESTS / "stream_fixtures.py"), "stream", "tone", "-", "--rate", "8000", "--hop", "0.5"],
        stdin=ff.stdout,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    ff.stdout.close()
    try:
        assert json.loads(p.stdout.readline())["type"] == "window"
        ff.kill()  # this process is ffmpeg's parent and does not reap it yet: as a supervisor would
        out, err = p.communicate(timeout=60)
    finally:
        ff.wait(10)
    lines = err.decode().strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, err
    assert "ended abnormally" in lines[0] and "(ffmpeg, pid" in lines[0] and "SIGKILL" in lines[0]
    assert json.loads(out.splitlines()[-1])["end"] == "error"
