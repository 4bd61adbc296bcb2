"""The one windowing function: extraction and CNN training/evaluation cut clips with it, and
the deployment stage (batch tagging, streaming) is designed to use it too."""

from __future__ import annotations

import numpy as np

from ..config import SegmentConfig
from ..errors import SegmentError


def _check(sr: int, segment_s: float, hop_s: float) -> int:
    if sr <= 0:
        raise SegmentError(f"sample rate must be positive, got {sr}")
    if not (segment_s > 0 and hop_s > 0):
        raise SegmentError(f"segment_s and hop_s must be positive, got {segment_s}, {hop_s}")
    length = int(round(segment_s * sr))
    # Below one sample, rounding would give empty windows or repeated start positions.
    if length < 1 or hop_s * sr < 1:
        raise SegmentError(f"segment ({segment_s} s) and hop ({hop_s} s) must each span at least one sample at {sr} Hz")
    return length


def window_starts(n_samples: int, sr: int, segment_s: float, hop_s: float) -> np.ndarray:
    """Start sample of every full window that fits in n_samples.

    Window k starts at round(k * hop_s * sr) (round half to even, as Python's ``round``):
    computed from k, never by accumulating a rounded hop, so windows do not drift over long
    streams. Every window [start, start + round(segment_s * sr)) lies inside [0, n_samples).
    Returns int64 [K] (K may be 0, when the clip is shorter than one window).
    """
    length = _check(sr, segment_s, hop_s)
    if n_samples < length:
        return np.zeros(0, dtype=np.int64)
    # Upper bound on k (one past the exact count), then filter with the very rounding used for
    # the starts, so the bound's own float error cannot add or drop a window.
    k_max = int(np.floor((n_samples - length) / (hop_s * sr))) + 1
    k = np.arange(k_max + 1, dtype=np.int64)
    starts = np.round(k * hop_s * sr).astype(np.int64)
    return starts[starts + length <= n_samples]


def segment(y: np.ndarray, sr: int, cfg: SegmentConfig = SegmentConfig()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut y [n] into windows.

    Returns (frames [K, L] float32 (a copy, L = round(segment_s * sr)), start_s [K] float64,
    end_s [K] float64) in seconds; end_s - start_s = L / sr exactly.
    """
    length = _check(sr, cfg.segment_s, cfg.hop_s)
    y = np.asarray(y, dtype=np.float32)
    starts = window_starts(len(y), sr, cfg.segment_s, cfg.hop_s)
    if len(starts) == 0:
        return np.zeros((0, length), dtype=np.float32), np.zeros(0), np.zeros(0)
    # A strided view gathers the windows without an index array of K*L int64s.
    frames = np.lib.stride_tricks.sliding_window_view(y, length)[starts]
    return np.ascontiguousarray(frames), starts / sr, (starts + length) / sr
