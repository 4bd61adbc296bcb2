"""Audio ingestion: decode -> float32 mono -> resample (soxr) -> fixed clip length.

Every stage (extraction, CNN features, tagging, streaming) goes through this module so that
training and deployment see exactly the same samples.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from .config import AudioConfig
from .errors import AudioError, EmbedkitWarning

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".aif", ".aiff", ".aifc", ".mp3", ".au", ".opus")


def decode(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Decode a file to float32 mono at its native rate.

    Returns (y [n_samples] float32, sample_rate). Raises AudioError naming the file and the
    problem for missing, empty, unreadable/truncated files and NaN/inf samples.
    """
    import soundfile as sf

    p = Path(path)
    if not p.exists():
        raise AudioError(p, "file not found")
    if p.is_dir():
        raise AudioError(p, "is a directory, not an audio file")
    if p.stat().st_size == 0:
        raise AudioError(p, "empty file (0 bytes)")
    try:
        data, sr = sf.read(str(p), dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile raises LibsndfileError/RuntimeError/TypeError variants
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise AudioError(p, f"cannot decode audio ({msg})") from None
    if data.shape[0] == 0:
        raise AudioError(p, "no audio samples (zero-length)")
    if not np.isfinite(data).all():
        raise AudioError(p, "contains NaN or infinite samples")
    # Down-mix by averaging channels (keeps the level of mono content in stereo files).
    y = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    return np.ascontiguousarray(y, dtype=np.float32), int(sr)


def resample(y: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited resampling with soxr (high quality); no-op when rates match."""
    if sr_in == sr_out:
        return y
    import soxr

    return soxr.resample(y, sr_in, sr_out, quality="HQ").astype(np.float32, copy=False)


def fix_length(y: np.ndarray, sr: int, cfg: AudioConfig, path: str | os.PathLike = "<array>") -> np.ndarray:
    """Bring a clip to cfg.clip_s seconds: trim from cfg.offset_s, or loop / zero-pad (with a warning)."""
    if cfg.clip_s is None:
        start = int(round(cfg.offset_s * sr))
        return y[start:] if start < len(y) else y
    target = int(round(cfg.clip_s * sr))
    start = int(round(cfg.offset_s * sr))
    if len(y) - start >= target:
        return y[start : start + target]
    if len(y) > target:  # offset pushed past the end: take the last clip_s seconds instead
        return y[len(y) - target :]
    if len(y) == target:
        return y
    warnings.warn(
        f"{path}: {len(y) / sr:.2f} s is shorter than {cfg.clip_s:g} s; {cfg.pad_mode}-padded",
        EmbedkitWarning,
        stacklevel=2,
    )
    if cfg.pad_mode == "loop":
        reps = int(np.ceil(target / len(y)))
        return np.tile(y, reps)[:target]
    out = np.zeros(target, dtype=np.float32)
    out[: len(y)] = y
    return out


def load(
    path: str | os.PathLike,
    sample_rates: int | list[int] | tuple[int, ...],
    cfg: AudioConfig = AudioConfig(),
    min_duration_s: float = 0.0,
    reject_silence: bool = True,
) -> dict[int, np.ndarray] | np.ndarray:
    """Decode once and return the clip at each requested rate.

    With a single int rate returns the array; with a list returns {rate: array}. The length
    policy is applied at each rate (round(clip_s * rate) samples).
    """
    y, sr = decode(path)
    duration = len(y) / sr
    if duration < min_duration_s:
        raise AudioError(path, f"too short: {duration:.2f} s < {min_duration_s:g} s (one segment)")
    if reject_silence and float(np.max(np.abs(y))) == 0.0:
        raise AudioError(path, "silent (every sample is zero)")
    rates = [sample_rates] if isinstance(sample_rates, int) else list(sample_rates)
    out = {}
    for rate in dict.fromkeys(rates):
        out[rate] = fix_length(resample(y, sr, rate), rate, cfg, path)
    return out[rates[0]] if isinstance(sample_rates, int) else out


def probe(path: str | os.PathLike) -> dict:
    """Cheap metadata (no full decode): duration, samplerate, channels."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception as exc:
        raise AudioError(path, f"cannot read header ({exc})") from None
    return {"duration_s": info.duration, "sample_rate": info.samplerate, "channels": info.channels}
