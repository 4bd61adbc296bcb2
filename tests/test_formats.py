"""Every format a music library holds, through the one decode entry point
(``embedkit.audio.decoding``): a library generated with ffmpeg (FLAC, ALAC, AAC, MP3, Opus,
Vorbis, WMA, WavPack, AIFF, WAV, TTA, a video's soundtrack), tagged through ``embedkit tag``;
excerpts against full decodes; rates, channels and sample formats; bad input per format; the
folder scan and path lists.

APE and Musepack: FFmpeg decodes both (PyAV's wheels include the decoders) but no encoder for
either exists in FFmpeg or in Debian's packages installed by scripts/test.sh, so they are not
generated here.
"""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from embedkit.audio import decoding as audio
from embedkit.cli import app
from embedkit.deploy.inputs import InputReport, expand_inputs
from embedkit.errors import AudioError
from embedkit.synth import make_clip

FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="ffmpeg not installed (scripts/test.sh installs it)")
pytestmark = needs_ffmpeg
runner = CliRunner()

SR = 44100
SECONDS = 12.0
#: name -> (file name suffix, ffmpeg output options, lossless)
FORMATS = {
    "flac": (".flac", ["-c:a", "flac"], True),
    "alac": (".m4a", ["-c:a", "alac"], True),
    "aac": (".m4a", ["-c:a", "aac", "-b:a", "160k"], False),
    "mp3": (".mp3", ["-c:a", "libmp3lame", "-b:a", "192k"], False),
    "opus": (".opus", ["-c:a", "libopus", "-b:a", "128k"], False),
    "vorbis": (".ogg", ["-c:a", "libvorbis", "-q:a", "5"], False),
    "wma": (".wma", ["-c:a", "wmav2", "-b:a", "192k"], False),
    "wavpack": (".wv", ["-c:a", "wavpack"], True),
    "aiff": (".aiff", ["-c:a", "pcm_s16be"], True),
    "wav": (".wav", ["-c:a", "pcm_s16le"], True),
    "tta": (".tta", ["-c:a", "tta"], True),
    "webm": (".webm", ["-c:a", "libopus", "-b:a", "128k"], False),
}
LOSSLESS = sorted(k for k, v in FORMATS.items() if v[2])
LOSSY = sorted(k for k, v in FORMATS.items() if not v[2])


def ffmpeg(*args) -> None:
    subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-y", *map(str, args)], check=True)


def encode(src: Path, dst: Path, opts: list[str]) -> Path:
    ffmpeg("-i", src, *opts, dst)
    return dst


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> dict[str, list[Path]]:
    """Two 12 s 44.1 kHz stereo source clips (16-bit WAV) in every format: {format: [paths]}."""
    root = tmp_path_factory.mktemp("formats")
    srcs = []
    for i, label in enumerate((0, 2)):
        y = make_clip(label, 100 + i, SR, SECONDS)
        p = root / "src" / f"clip{i}.wav"
        p.parent.mkdir(exist_ok=True)
        sf.write(p, np.stack([y, 0.7 * y], axis=1), SR, subtype="PCM_16")
        srcs.append(p)
    out = {}
    for name, (suffix, opts, _) in FORMATS.items():
        (root / "lib" / name).mkdir(parents=True)
        out[name] = [encode(s, root / "lib" / name / f"{s.stem}{suffix}", opts) for s in srcs]
    return out


# ---------------------------------------------------------------------------------------------
# decoding


def test_decoder_is_chosen_by_content(library, tmp_path):
    kinds = {name: audio.sniff(paths[0]) for name, paths in library.items()}
    assert kinds == {
        "flac": "flac",
        "alac": "mp4",
        "aac": "mp4",
        "mp3": "mp3",
        "opus": "opus",
        "vorbis": "vorbis",
        "wma": "asf",
        "wavpack": "wavpack",
        "aiff": "aiff",
        "wav": "wav",
        "tta": "tta",
        "webm": "matroska",
    }
    # a wrong name changes nothing: an M4A called .mp3 and an Opus file called .wav decode
    for name, fake in (("aac", "really_aac.mp3"), ("opus", "really_opus.wav")):
        wrong = tmp_path / fake
        shutil.copy(library[name][0], wrong)
        y, sr = audio.decode(wrong)
        ref, ref_sr = audio.decode(library[name][0])
        assert sr == ref_sr
        np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_formats_decode_to_the_same_samples(library, name):
    ref, sr = audio.decode(library["wav"][0])
    y, got_sr = audio.decode(library[name][0])
    assert got_sr == sr == SR
    np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("name", LOSSY)
def test_lossy_formats_are_aligned_with_the_source(library, name):
    """Encoder delay and padding removed (MP4 edit list, LAME header, Opus pre-skip, Ogg
    granules): the decode starts with the music's first sample and has its length. WMA is the
    exception: FFmpeg's WMA encoder records no delay, and its decoder (the ``ffmpeg`` command's
    too) gives the music from sample 2048 on (one frame, 46 ms), padded at the end."""
    from scipy.signal import correlate

    ref, _ = audio.decode(library["wav"][0])
    y, sr = audio.decode(library[name][0])
    if sr != SR:
        y = audio.resample(y, sr, SR)
    expected_lag = -2048 if name == "wma" else 0
    assert abs(len(y) - len(ref)) <= (2048 if name == "wma" else 0.002 * SR)
    seg = ref[SR : 3 * SR]
    xc = correlate(y[SR - 4096 : 3 * SR + 4096], seg, mode="valid", method="fft")  # lags -4096..4096
    lag = int(np.argmax(xc)) - 4096
    assert lag == expected_lag
    n = min(len(ref), len(y) + expected_lag) - 2000
    assert np.corrcoef(ref[1000 - expected_lag : n], y[1000 : n + expected_lag])[0, 1] > 0.99


def _band_db(y: np.ndarray, sr: int, n_fft: int = 2048, hop: int = 512, bands: int = 64) -> np.ndarray:
    """Power in log-spaced bands (50 Hz to Nyquist) per 2048-sample frame, in dB [frames, bands]:
    what a log-mel front end sees."""
    idx = np.arange(0, len(y) - n_fft + 1, hop)[:, None] + np.arange(n_fft)
    power = np.abs(np.fft.rfft(y[idx] * np.hanning(n_fft), axis=1)) ** 2
    freqs = np.fft.rfftfreq(n_fft, 1 / sr)
    edges = np.geomspace(50.0, sr / 2, bands + 1)
    which = np.clip(np.searchsorted(edges, freqs) - 1, 0, bands - 1)
    out = np.zeros((len(power), bands))
    for b in range(bands):
        out[:, b] = power[:, which == b].sum(axis=1)
    return 10 * np.log10(out + 1e-12)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_excerpt_equals_the_slice_of_a_full_decode(library, name):
    """Sample-exact in every container here: the frame a seek lands on is placed by its
    timestamp (ASF's milliseconds snapped to WMA's fixed frame grid), and PREROLL_S of decoding
    before the target refills the decoder's overlap / bit reservoir. The one exception is noise
    the codec synthesises: AAC's perceptual noise substitution (FFmpeg's encoder uses it) draws
    from a generator whose state depends on everything decoded before, so after a seek those
    bands hold other noise of the same energy; the log-mel spectrum is what must agree."""
    path = library[name][1]
    full, sr = audio.decode(path)
    for start_s in (0.0, 1.0, 3.0, 7.4321):
        part, part_sr = audio.decode(path, max_seconds=2.5, start_s=start_s)
        k = int(round(start_s * sr))
        ref = full[k : k + len(part)]
        assert part_sr == sr and len(part) == int(np.ceil(2.5 * sr))
        if FORMATS[name][2] or name != "aac":
            np.testing.assert_allclose(part, ref, rtol=0, atol=1e-6 if name in ("opus", "webm") else 0)
            continue
        lags = list(range(-32, 33))
        xc = [float(np.dot(part[1000:-1000], full[k + 1000 + lag : k + len(part) - 1000 + lag])) for lag in lags]
        assert lags[int(np.argmax(xc))] == 0  # aligned
        a, b = _band_db(part, sr), _band_db(ref, sr)
        loud = b > b.max() - 60
        assert np.abs(a - b)[loud].mean() < 0.3  # dB (0.07-0.17 measured)


@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_sample_rates_channels_and_sample_formats(tmp_path):
    """8 kHz to 192 kHz, mono to 5.1 (channel average), 16/24/32-bit integers and float, in
    libsndfile's and FFmpeg's containers: the same numbers from both decoders."""
    rng = np.random.default_rng(0)
    for sr, ch, codec, subtype in (
        (8000, 1, "pcm_s16le", "PCM_16"),
        (192000, 2, "pcm_s24le", "PCM_24"),
        (48000, 6, "pcm_f32le", "FLOAT"),
        (96000, 2, "pcm_s32le", "PCM_32"),
    ):
        y = rng.uniform(-0.5, 0.5, (sr // 4, ch)).astype(np.float32)
        wav = tmp_path / f"{sr}_{ch}_{subtype}.wav"
        sf.write(wav, y, sr, subtype=subtype)
        ref, got_sr = audio.decode(wav)  # libsndfile
        assert got_sr == sr and ref.shape == (sr // 4,)
        np.testing.assert_allclose(ref, y.mean(axis=1), atol=2.0**-15)
        # the same samples from FFmpeg-only containers (ALAC holds up to 24-bit integers)
        targets = [("wv", "wavpack"), ("caf", codec)] + ([("m4a", "alac")] if subtype in ("PCM_16", "PCM_24") else [])
        for ext, c in targets:
            out = encode(wav, tmp_path / f"{wav.stem}.{ext}", ["-c:a", c])
            got, got_sr = audio.decode(out)
            assert got_sr == sr, out
            np.testing.assert_array_equal(got, ref, err_msg=str(out))


def test_a_video_file_gives_its_soundtrack(library, tmp_path):
    """A music video (.mp4 with H.264 / MPEG-4 video + AAC): the audio stream is decoded, the
    video's packets are not."""
    video = tmp_path / "video.mp4"
    ffmpeg(
        "-f", "lavfi", "-i", f"testsrc=size=64x48:rate=10:duration={SECONDS}",
        "-i", library["wav"][0], "-c:v", "mpeg4", "-c:a", "aac", "-b:a", "160k", "-shortest", video,
    )  # fmt: skip
    y, sr = audio.decode(video)
    ref, _ = audio.decode(library["aac"][0])
    assert sr == SR and abs(len(y) - len(ref)) < 0.05 * SR
    assert np.corrcoef(y[SR : 10 * SR], ref[SR : 10 * SR])[0, 1] > 0.99


# ---------------------------------------------------------------------------------------------
# bad input per format: one line naming the file


def _drm(src: Path, dst: Path) -> Path:
    """An iTunes-style protected file: the sample entry renamed 'drms' (FairPlay)."""
    data = src.read_bytes()
    assert data.count(b"mp4a") >= 1
    dst.write_bytes(data.replace(b"mp4a", b"drms"))
    return dst


def _cover_only(tmp_path: Path) -> Path:
    """An .m4a holding a video stream (a cover / visualiser) and no audio."""
    out = tmp_path / "cover_only.m4a"
    ffmpeg("-f", "lavfi", "-i", "color=c=blue:size=32x32:duration=1", "-c:v", "mpeg4", "-f", "mp4", out)
    return out


BAD = {
    "truncated.m4a": (lambda lib, d: _cut(lib["aac"][0], d / "truncated.m4a", 0.5), "without its index"),
    "truncated_faststart.m4a": (
        lambda lib, d: _cut(_faststart(lib, d), d / "truncated_faststart.m4a", 0.5),
        "truncated: the header announces 12.00 s",
    ),
    "truncated.wv": (lambda lib, d: _cut(lib["wavpack"][0], d / "truncated.wv", 0.4), "truncated"),
    "truncated.opus": (lambda lib, d: _cut(lib["opus"][0], d / "truncated.opus", 0.002), "truncated"),
    "empty.m4a": (lambda lib, d: _write(d / "empty.m4a", b""), "empty file (0 bytes)"),
    "empty.opus": (lambda lib, d: _write(d / "empty.opus", b""), "empty file (0 bytes)"),
    "text.m4a": (lambda lib, d: _write(d / "text.m4a", b"not audio at all\n" * 50), "cannot decode audio"),
    "junk.wma": (lambda lib, d: _write(d / "junk.wma", os.urandom(4096)), "cannot decode audio"),
    "protected.m4p": (lambda lib, d: _drm(lib["aac"][0], d / "protected.m4p"), "DRM-protected"),
    "cover_only.m4a": (lambda lib, d: _cover_only(d), "no audio stream"),
}


def _faststart(lib, d: Path) -> Path:
    """The AAC clip with its index in front (``-movflags +faststart``, as streaming sites serve it)."""
    return encode(lib["wav"][0], d / "faststart.m4a", ["-c:a", "aac", "-movflags", "+faststart"])


def _cut(src: Path, dst: Path, share: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * share)])
    return dst


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_raise_one_line_naming_the_file(library, tmp_path, case):
    make, problem = BAD[case]
    path = make(library, tmp_path)
    with pytest.raises(AudioError) as err:
        audio.load(path, 16000)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and problem in err.value.problem and "\n" not in msg, msg
    assert "Traceback" not in msg and "Errno" not in msg, msg


# ---------------------------------------------------------------------------------------------
# folder scan and path lists


def test_folder_scan_takes_every_audio_file_and_counts_the_rest(library, tmp_path):
    lib = tmp_path / "lib"
    (lib / "album").mkdir(parents=True)
    m4a = shutil.copy(library["aac"][0], lib / "album" / "01.m4a")
    no_ext = shutil.copy(library["mp3"][0], lib / "album" / "02")  # an MP3 saved without extension
    odd = shutil.copy(library["opus"][0], lib / "album" / "03.dat")
    ffmpeg("-f", "lavfi", "-i", "color=c=red:size=8x8", "-frames:v", "1", lib / "album" / "cover.jpg")
    (lib / "album" / "notes.nfo").write_text("ripped by someone\n")
    (lib / "album" / "._01.m4a").write_bytes(b"\x00\x05\x16\x07" + b"\0" * 60)
    (lib / "album" / "04.flac").symlink_to(lib / "gone.flac")
    rep = InputReport()
    got = expand_inputs([lib], report=rep)
    assert got == sorted(str(p) for p in (m4a, no_ext, odd))
    kinds = dict((Path(p).name, k) for p, k in rep.not_audio)
    assert kinds == {
        "cover.jpg": "JPEG image",
        "notes.nfo": "unrecognised content",
        "._01.m4a": "macOS metadata (._ file)",
        "04.flac": "broken link",
    }
    (line,) = rep.summary()
    assert line.startswith("4 files in the folders scanned are not audio (") and "1 JPEG image" in line


def test_unreadable_subfolder_is_reported(tmp_path, monkeypatch, library):
    lib = tmp_path / "lib"
    (lib / "ok").mkdir(parents=True)
    (lib / "private").mkdir()
    shutil.copy(library["flac"][0], lib / "ok" / "a.flac")
    shutil.copy(library["flac"][1], lib / "private" / "b.flac")
    real = os.scandir

    def scandir(path="."):
        if Path(path).name == "private":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    rep = InputReport()
    assert expand_inputs([lib], report=rep) == [str(lib / "ok" / "a.flac")]
    assert rep.problems == [
        f"{lib / 'private'}: cannot read this folder (Permission denied); its files were not scanned"
    ]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any folder")
def test_unreadable_subfolder_is_reported_for_real(tmp_path, library):
    lib = tmp_path / "lib"
    (lib / "private").mkdir(parents=True)
    shutil.copy(library["flac"][0], lib / "private" / "b.flac")
    os.chmod(lib / "private", 0)
    try:
        rep = InputReport()
        assert expand_inputs([lib], report=rep) == []
        assert len(rep.problems) == 1 and "private: cannot read this folder" in rep.problems[0]
    finally:
        os.chmod(lib / "private", 0o755)


def test_m3u_urls_file_urls_and_cp1252(tmp_path, library):
    music = tmp_path / "Musique"
    music.mkdir()
    a = shutil.copy(library["mp3"][0], music / "Beyoncé – Halo.mp3")
    b = shutil.copy(library["aac"][0], music / "b c.m4a")
    lst = tmp_path / "lists" / "mix.m3u"
    lst.parent.mkdir()
    text = "\r\n".join(
        [
            "#EXTM3U",
            "#EXTINF:123,Beyoncé - Halo",
            str(a),
            "http://example.com/stream.mp3",
            "HTTPS://radio.example/live",
            "file://" + str(b).replace(" ", "%20"),
            "file://otherhost/x.mp3",
        ]
    )
    lst.write_bytes(text.encode("cp1252"))  # classic M3U from Windows players
    rep = InputReport()
    assert expand_inputs([lst], report=rep) == [str(a), str(b)]
    assert rep.problems == [
        f"{lst}: not UTF-8; read as cp1252",
        f"{lst}:4: http://example.com/stream.mp3: URLs are not supported (give a local path or a file:// URL)",
        f"{lst}:5: HTTPS://radio.example/live: URLs are not supported (give a local path or a file:// URL)",
        f"{lst}:7: file://otherhost/x.mp3: URLs are not supported (give a local path or a file:// URL)",
    ]
    # bytes cp1252 leaves undefined (0x81) fall back to Latin-1, never an abort
    odd = tmp_path / "odd.m3u"
    odd.write_bytes(b"caf\x81.mp3\n")
    rep = InputReport()
    assert expand_inputs([odd], report=rep) == [str(tmp_path / "caf\x81.mp3")]
    assert rep.problems == [f"{odd}: not UTF-8; read as latin-1"]


# ---------------------------------------------------------------------------------------------
# through `embedkit tag`


def assert_same_decision(got: dict, ref: dict, *, exact: bool, name: str) -> None:
    """A copy's decision is the reference's; a lossy copy of a clip on the not-music boundary
    (these synthetic clips are nearly still tones) may fall on either side of it, but only just:
    its not-music score within 15 % of the reference's."""
    t = ref["rule"]["not_music"]
    if exact or t is None or abs(ref["not_music"] - t) > 0.15 * t:
        assert got["decision"] == ref["decision"], name
    else:
        assert got["not_music"] == pytest.approx(ref["not_music"], rel=0.15), name
        assert "not-music" in (got["decision"], ref["decision"]), name


def _tag(run_dir, inputs, tmp_path, *extra) -> tuple[dict, str]:
    out = tmp_path / "tags.jsonl"
    res = runner.invoke(
        app, ["tag", str(run_dir), *map(str, inputs), "--out", str(out), "--workers", "2", "--table", "0", *extra]
    )
    import json

    rows = {r["path"]: r for r in map(json.loads, out.read_text().splitlines())} if out.exists() else {}
    return rows, res.output


@pytest.mark.slow
def test_every_format_is_tagged_through_the_cli(library, tiny_holdout_run, tmp_path):
    lib = Path(library["flac"][0]).parents[1]
    (lib / "cover.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 100)
    rows, output = _tag(tiny_holdout_run, [lib], tmp_path)
    flat = " ".join(output.split())
    n = 2 * len(FORMATS)
    assert len(rows) == n, output
    assert f"{n} tracks tagged (middle" in flat and ", 0 failed" in flat  # tag's default excerpt
    assert "1 file in the folders scanned is not audio (1 JPEG image)" in flat
    for i in range(2):
        ref = rows[str(library["flac"][i])]
        for name in FORMATS:
            got = rows[str(library[name][i])]
            assert got["n_windows"] == ref["n_windows"] == 2, name
            if FORMATS[name][2]:
                for label, p in ref["probabilities"].items():
                    assert got["probabilities"][label] == pytest.approx(p, abs=1e-6), name
            assert_same_decision(got, ref, exact=FORMATS[name][2], name=name)


@pytest.mark.slow
def test_bad_inputs_are_one_line_each_and_the_batch_goes_on(library, tiny_holdout_run, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    paths = [make(library, bad) for make, _ in BAD.values()]
    good = [library["aac"][0], library["opus"][0]]
    m3u = tmp_path / "radio.m3u"
    m3u.write_text(f"#EXTM3U\nhttp://radio.example/live.mp3\n{good[1]}\n")
    rows, output = _tag(tiny_holdout_run, [good[0], m3u, *paths], tmp_path)
    assert sorted(rows) == sorted(map(str, good)), output
    assert f"{m3u}:2: http://radio.example/live.mp3: URLs are not supported" in " ".join(output.split())
    lines = [ln for ln in output.splitlines() if ln.startswith("skipped ")]
    assert len(lines) == len(BAD), output
    for p in paths:
        (line,) = [ln for ln in lines if ln.startswith(f"skipped {p}:")]
        assert "Traceback" not in line


@pytest.mark.slow
def test_lossy_embeddings_match_the_flac(library, tmp_path):
    """A real backbone (musicnn-msd; melstats without its checkpoints) on real music (one
    gtzan_mini clip per genre for four genres when ../shared is there; else the generated
    clips): the track's embedding (the mean over the windows listened to) of every lossy file
    against the FLAC's, cosine >= 0.99; single windows >= 0.97 (libvorbis q5 and WMA at
    22.05 kHz mono reach 0.977 / 0.982 on single windows, >= 0.997 per track)."""
    from embedkit.audio.excerpts import Excerpt, read_excerpt
    from embedkit.backbones import load_backbone

    from conftest import GTZAN

    try:
        bb = load_backbone("musicnn-msd")
    except Exception:
        bb = load_backbone("melstats")
    sr = bb.spec.sample_rate
    if GTZAN.exists():
        sources = [sorted((GTZAN / g).glob("*.flac"))[0] for g in ("blues", "classical", "metal", "jazz")]
        encoded = {
            name: [encode(src, tmp_path / f"{src.stem}.{name}{FORMATS[name][0]}", FORMATS[name][1]) for src in sources]
            for name in LOSSY
        }
        clip_s = 30.0
    else:
        sources, encoded, clip_s = library["flac"], {name: library[name] for name in LOSSY}, 10.0
    for i, src in enumerate(sources):
        ref = bb.embed(read_excerpt(str(src), sr, Excerpt("first"), clip_s, 5.0, 5.0)[0])
        for name in LOSSY:
            e = bb.embed(read_excerpt(str(encoded[name][i]), sr, Excerpt("first"), clip_s, 5.0, 5.0)[0])
            n = min(len(e), len(ref))  # a WMA ends up to ~15 ms short: one window fewer in a 30 s clip
            e, r = e[:n], ref[:n]
            windows = (e * r).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(r, axis=1)
            m, mr = e.mean(0), r.mean(0)
            track = float(m @ mr / np.linalg.norm(m) / np.linalg.norm(mr))
            assert track >= 0.99 and windows.min() >= 0.97, (name, src.name, track, windows)


@pytest.mark.slow
def test_serve_accepts_every_format(library, tiny_holdout_run, tmp_path):
    """`embedkit serve` decodes uploads through the same entry point: M4A/MP4 (and a video's
    soundtrack) are answered, not refused with 415; ALAC gives the FLAC's probabilities."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from embedkit.deploy.serve import create_app
    from embedkit.deploy.tagger import load_tagger

    video = tmp_path / "clip.mp4"
    ffmpeg(
        "-f", "lavfi", "-i", f"testsrc=size=64x48:rate=10:duration={SECONDS}",
        "-i", library["wav"][0], "-c:v", "mpeg4", "-c:a", "aac", "-shortest", video,
    )  # fmt: skip
    uploads = {
        "flac": (library["flac"][0], "audio/flac"),
        "alac": (library["alac"][0], "audio/mp4"),
        "aac": (library["aac"][0], "audio/x-m4a"),
        "opus": (library["opus"][0], "audio/ogg"),
        "wma": (library["wma"][0], "audio/x-ms-wma"),
        "video": (video, "video/mp4"),
    }
    got = {}
    with TestClient(create_app(load_tagger(tiny_holdout_run)), base_url="http://127.0.0.1") as c:
        for name, (path, ctype) in uploads.items():
            r = c.post("/v1/tag", files={"file": (Path(path).name, Path(path).read_bytes(), ctype)})
            assert r.status_code == 200, (name, r.text)
            got[name] = r.json()
    ref = got["flac"]["probabilities"]
    assert got["alac"]["probabilities"] == pytest.approx(ref, abs=1e-6)
    for name in uploads:
        assert_same_decision(got[name], got["flac"], exact=name == "alac", name=name)
