"""Audio ingestion: decode every container to float32 mono, soxr resampling, length policy,
one decode per file for several rates, and a clear error naming the file for each bad input."""

import os
import struct
import warnings

import numpy as np
import pytest
import soundfile as sf

from embedkit.audio import decoding as audio
from embedkit.config import AudioConfig
from embedkit.errors import AudioError, EmbedkitWarning

from conftest import FMA_SAMPLE, needs_shared

FORMATS = [  # (extension, soundfile format, subtype, lossless)
    ("wav", "WAV", "PCM_16", True),
    ("flac", "FLAC", "PCM_16", True),
    ("ogg", "OGG", "VORBIS", False),
    ("aiff", "AIFF", "PCM_16", True),
    ("mp3", "MP3", "MPEG_LAYER_III", False),
]


def sine(freq, sr, seconds, amp=0.5, channels=1):
    t = np.arange(int(round(seconds * sr))) / sr
    y = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return y if channels == 1 else np.stack([y * (1 - 0.25 * c) for c in range(channels)], axis=1)


def peak_hz(y, sr):
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    return np.fft.rfftfreq(len(y), 1 / sr)[np.argmax(spec)]


@pytest.mark.parametrize("ext, fmt, subtype, lossless", FORMATS)
def test_decode_every_format_to_float32_mono(tmp_path, ext, fmt, subtype, lossless):
    sr = 22050
    stereo = sine(440, sr, 2.0, channels=2)  # right channel at 0.75 x left
    path = tmp_path / f"tone.{ext}"
    sf.write(path, stereo, sr, format=fmt, subtype=subtype)
    y, got_sr = audio.decode(path)
    assert got_sr == sr and y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - len(stereo)) <= 0.01 * sr  # codecs may round to their frame size
    assert abs(peak_hz(y, sr) - 440) < 2
    expected = stereo.mean(axis=1)  # channels averaged
    if lossless:
        np.testing.assert_allclose(y, expected, atol=2e-4)  # 16-bit quantisation
    else:
        rms = float(np.sqrt(np.mean(y**2)))
        assert rms == pytest.approx(float(np.sqrt(np.mean(expected**2))), rel=0.05)


@needs_shared
def test_real_fma_mp3_44k_stereo():
    y, sr = audio.decode(FMA_SAMPLE)
    info = sf.info(FMA_SAMPLE)
    assert (sr, info.channels) == (44100, 2)
    assert len(y) / sr == pytest.approx(29.98, abs=0.01)
    assert y.dtype == np.float32 and np.isfinite(y).all() and np.abs(y).max() > 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 29.98 s -> 30 s is codec framing, padded without a warning
        clips = audio.load(FMA_SAMPLE, [16000, 22050])
    assert {r: len(c) for r, c in clips.items()} == {16000: 480000, 22050: 661500}
    # same music at both rates: the 16 kHz version matches a direct resample of the 22.05 kHz one
    y16 = audio.resample(clips[22050], 22050, 16000)
    assert np.corrcoef(y16[16000:-16000], clips[16000][16000 : len(y16) - 16000])[0, 1] > 0.99


@pytest.mark.parametrize("sr_in", [8000, 11025, 16000, 22050, 32000, 44100, 48000, 88200, 96000])
@pytest.mark.parametrize("sr_out", [16000, 22050])
def test_resampling_preserves_a_sinusoid(tmp_path, sr_in, sr_out):
    path = tmp_path / f"s{sr_in}.wav"
    sf.write(path, sine(1000.0, sr_in, 3.0), sr_in, subtype="FLOAT")
    y = audio.load(path, sr_out, AudioConfig(clip_s=2.0))
    assert y.dtype == np.float32 and len(y) == 2 * sr_out
    assert abs(peak_hz(y, sr_out) - 1000.0) < 1.0
    mid = y[sr_out // 4 : -sr_out // 4]
    assert np.sqrt(np.mean(mid**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)  # level kept
    # band-limited: no images / aliases of the tone elsewhere in the spectrum
    spec = np.abs(np.fft.rfft(mid * np.hanning(len(mid))))
    freqs = np.fft.rfftfreq(len(mid), 1 / sr_out)
    assert spec[np.abs(freqs - 1000) > 50].max() < 1e-3 * spec.max()


def test_one_decode_for_several_rates(tmp_path, monkeypatch):
    path = tmp_path / "a.flac"
    sf.write(path, sine(300, 44100, 3.0, channels=2), 44100)
    calls = []
    real = audio.decode
    monkeypatch.setattr(audio, "decode", lambda p, **kw: calls.append(p) or real(p, **kw))
    out = audio.load(path, [16000, 22050, 16000, 44100], AudioConfig(clip_s=2.0))
    assert len(calls) == 1
    assert {r: len(y) for r, y in out.items()} == {16000: 32000, 22050: 44100, 44100: 88200}
    assert isinstance(audio.load(path, np.int64(16000), AudioConfig(clip_s=2.0)), np.ndarray)


def test_only_the_kept_part_is_decoded_and_matches_a_full_decode(tmp_path):
    sr = 44100
    y = np.random.default_rng(0).standard_normal(20 * sr).astype(np.float32) * 0.1
    path = tmp_path / "long.wav"
    sf.write(path, y, sr, subtype="FLOAT")
    cfg = AudioConfig(clip_s=3.0, offset_s=2.0)
    part, _ = audio.decode(path, max_seconds=5.25)
    assert len(part) == int(np.ceil(5.25 * sr))
    got = audio.load(path, 16000, cfg)
    full = audio.fix_length(audio.resample(y, sr, 16000), 16000, cfg)
    np.testing.assert_allclose(got, full, atol=1e-6)


# -- length policy --------------------------------------------------------------------------
def ramp(n):
    return np.arange(n, dtype=np.float32) + 1


def test_trim_with_offset_and_clamped_offset():
    sr = 10
    y = ramp(100)  # 10 s
    np.testing.assert_array_equal(audio.fix_length(y, sr, AudioConfig(clip_s=3.0, offset_s=2.0)), y[20:50])
    with pytest.warns(EmbedkitWarning, match="kept the last 3 s"):
        out = audio.fix_length(y, sr, AudioConfig(clip_s=3.0, offset_s=9.0), "x.wav")
    np.testing.assert_array_equal(out, y[70:])
    np.testing.assert_array_equal(audio.fix_length(y, sr, AudioConfig(clip_s=None, offset_s=4.0)), y[40:])


def test_loop_and_zero_padding_warn():
    sr = 10
    y = ramp(25)
    with pytest.warns(EmbedkitWarning, match=r"short\.wav: 2\.50 s is shorter than 6 s; loop-padded"):
        out = audio.fix_length(y, sr, AudioConfig(clip_s=6.0, pad_mode="loop"), "short.wav")
    np.testing.assert_array_equal(out, np.r_[y, y, y[:10]])
    with pytest.warns(EmbedkitWarning, match="zero-padded"):
        out = audio.fix_length(y, sr, AudioConfig(clip_s=6.0, pad_mode="zero"))
    np.testing.assert_array_equal(out, np.r_[y, np.zeros(35, np.float32)])


def test_notes_collect_instead_of_warning_and_tiny_shortfall_is_silent():
    sr = 1000
    notes = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        audio.fix_length(ramp(2500), sr, AudioConfig(clip_s=6.0), "a.wav", notes=notes)
        assert audio.fix_length(ramp(5980), sr, AudioConfig(clip_s=6.0)).shape == (6000,)  # 20 ms short
    assert notes == ["a.wav: 2.50 s is shorter than 6 s; loop-padded"]


# -- bad input: one AudioError naming the file ----------------------------------------------
def write_bytes(path, data):
    path.write_bytes(data)
    return path


def truncated_wav(tmp_path):
    path = tmp_path / "full.wav"
    sf.write(path, sine(440, 8000, 2.0), 8000)
    return write_bytes(tmp_path / "truncated.wav", path.read_bytes()[: path.stat().st_size // 2])


def float_wav_with(tmp_path, value):
    y = sine(440, 8000, 2.0)
    y[1234] = value
    path = tmp_path / f"bad_{value}.wav"
    sf.write(path, y, 8000, subtype="FLOAT")
    return path


BAD = {
    "missing": (lambda d: d / "nope.wav", "file not found"),
    "directory": (lambda d: (d / "dir.wav").mkdir() or d / "dir.wav", "is a directory"),
    "zero bytes": (lambda d: write_bytes(d / "empty.mp3", b""), "empty file (0 bytes)"),
    "not audio": (
        lambda d: write_bytes(d / "notes.wav", b"this is a text file, not audio\n" * 10),
        "cannot decode audio",
    ),
    "truncated wav": (truncated_wav, "truncated"),
    "truncated flac": (
        lambda d: (
            sf.write(d / "f.flac", sine(440, 8000, 2.0), 8000),
            write_bytes(d / "cut.flac", (d / "f.flac").read_bytes()[:3000]),
        )[1],
        "cannot decode audio",
    ),
    "nan": (lambda d: float_wav_with(d, np.nan), "NaN or infinite"),
    "inf": (lambda d: float_wav_with(d, np.inf), "NaN or infinite"),
    "no samples": (
        lambda d: (sf.write(d / "none.wav", np.zeros(0, np.float32), 8000), d / "none.wav")[1],
        "no audio samples",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_raise_one_line_naming_the_file(tmp_path, case):
    make, problem = BAD[case]
    path = make(tmp_path)
    with pytest.raises(AudioError) as err:
        audio.load(path, 16000)
    msg = str(err.value)
    assert msg.startswith(str(path)) and problem in msg and "\n" not in msg
    assert err.value.path == str(path)


def test_streamed_wav_with_unknown_length_is_not_called_truncated(tmp_path):
    """Streaming writers put 0xFFFFFFFF in the data size; that is not damage."""
    path = tmp_path / "ok.wav"
    sf.write(path, sine(440, 8000, 2.0), 8000)
    raw = bytearray(path.read_bytes())
    i = raw.find(b"data")
    raw[i + 4 : i + 8] = struct.pack("<I", 0xFFFFFFFF)
    path.write_bytes(bytes(raw))
    y, sr = audio.decode(path)
    assert len(y) == 16000


def test_silent_and_too_short_are_rejected_by_load(tmp_path):
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(3 * 8000, np.float32), 8000)
    with pytest.raises(AudioError, match="silent"):
        audio.load(silent, 16000, AudioConfig(clip_s=3.0))
    assert audio.load(silent, 16000, AudioConfig(clip_s=3.0), reject_silence=False).max() == 0
    short = tmp_path / "short.wav"
    sf.write(short, sine(440, 8000, 2.0), 8000)
    with pytest.raises(AudioError, match=r"short\.wav: too short: 2\.00 s < 5 s"):
        audio.load(short, 16000, min_duration_s=5.0)


def test_multichannel_is_downmixed(tmp_path):
    sr = 48000
    y = np.stack([sine(500, sr, 1.0) * (c + 1) / 6 for c in range(6)], axis=1)  # 5.1
    path = tmp_path / "surround.wav"
    sf.write(path, y, sr, subtype="FLOAT")
    mono, got_sr = audio.decode(path)
    np.testing.assert_allclose(mono, y.mean(axis=1), atol=1e-7)
    assert got_sr == sr


def test_native_stderr_is_captured_to_a_log(tmp_path):
    log = tmp_path / "decoder.log"
    with audio.native_stderr_to(log):
        os.write(2, b"Warning: Xing stream size off\n")
    assert b"Xing stream size off" in log.read_bytes()
    os.write(2, b"")  # fd 2 restored and writable
