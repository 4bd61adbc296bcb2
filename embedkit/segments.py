"""The one windowing function, shared by extraction, CNN training, batch tagging and streaming."""

from __future__ import annotations

import numpy as np

from .config import SegmentConfig


def window_starts(n_samples: int, sr: int, segment_s: float, hop_s: float) -> np.ndarray:
    """Start sample of every full window that fits in n_samples.

    Window k starts at round(k * hop_s * sr): computed from k, never by accumulating a rounded
    hop, so windows do not drift over long streams. Returns int64 [K] (K may be 0).
    """
    if segment_s <= 0 or hop_s <= 0:
        raise ValueError("segment_s and hop_s must be positive")
    length = int(round(segment_s * sr))
    if n_samples < length:
        return np.zeros(0, dtype=np.int64)
    # Upper bound on k, then filter exactly with the same rounding used for the starts.
    k_max = int(np.floor((n_samples - length) / (hop_s * sr) + 1e-9)) + 1
    k = np.arange(k_max + 1, dtype=np.int64)
    starts = np.round(k * hop_s * sr).astype(np.int64)
    return starts[starts + length <= n_samples]


def segment(y: np.ndarray, sr: int, cfg: SegmentConfig = SegmentConfig()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut y into windows.

    Returns (frames [K, L] float32 (a copy), start_s [K] float64, end_s [K] float64).
    """
    length = int(round(cfg.segment_s * sr))
    starts = window_starts(len(y), sr, cfg.segment_s, cfg.hop_s)
    if len(starts) == 0:
        return np.zeros((0, length), dtype=np.float32), np.zeros(0), np.zeros(0)
    idx = starts[:, None] + np.arange(length)[None, :]
    frames = np.asarray(y, dtype=np.float32)[idx]
    return frames, starts / sr, (starts + length) / sr
