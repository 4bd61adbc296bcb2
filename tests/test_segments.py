"""The one windowing function: window k starts at round(k * hop_s * sr), all windows inside."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedkit.audio.segments import segment, window_starts
from embedkit.config import SegmentConfig


def test_default_gives_six_5s_windows_per_30s_clip():
    sr = 16000
    y = np.arange(30 * sr, dtype=np.float32)
    frames, start_s, end_s = segment(y, sr)
    assert frames.shape == (6, 5 * sr) and frames.dtype == np.float32
    np.testing.assert_array_equal(start_s, [0, 5, 10, 15, 20, 25])
    np.testing.assert_array_equal(end_s, [5, 10, 15, 20, 25, 30])
    for k in range(6):
        np.testing.assert_array_equal(frames[k], y[k * 5 * sr : (k + 1) * 5 * sr])
    frames[0, 0] = -1  # a copy, not a view on the caller's audio
    assert y[0] == 0


@pytest.mark.parametrize(
    "n, expected",
    [
        (0, []),
        (4 * 100 - 1, []),
        (5 * 100 - 1, []),
        (5 * 100, [0]),
        (5 * 100 + 1, [0]),
        (10 * 100, [0, 500]),
        (10 * 100 - 1, [0]),
    ],
)
def test_short_and_exact_lengths(n, expected):
    np.testing.assert_array_equal(window_starts(n, 100, 5.0, 5.0), expected)


def test_overlap_gap_and_fractional_hop():
    # overlapping: 2.5 s hop over 30 s -> 11 windows
    assert len(window_starts(30 * 22050, 22050, 5.0, 2.5)) == 11
    # hop longer than the window leaves gaps
    np.testing.assert_array_equal(window_starts(100, 10, 3.0, 7.0), [0, 70])
    # hop of 0.1234 s at 22.05 kHz = 2721.0... samples per hop, rounded per window
    starts = window_starts(22050 * 60, 22050, 1.0, 0.1234)
    np.testing.assert_array_equal(starts, [round(k * 0.1234 * 22050) for k in range(len(starts))])


def test_no_drift_over_an_hour():
    """Accumulating a rounded hop drifts; computing each start from k does not."""
    sr, hop, seg = 22050, 0.0231, 1.0  # 509.355 samples per hop: a rounded hop loses 0.355 each time
    n = 3600 * sr
    starts = window_starts(n, sr, seg, hop)
    k = np.arange(len(starts))
    np.testing.assert_array_equal(starts, [round(int(i) * hop * sr) for i in k])
    # the last window is still within half a sample of its ideal time
    assert abs(starts[-1] - k[-1] * hop * sr) <= 0.5
    accumulated = np.cumsum(np.r_[0, np.full(len(starts) - 1, round(hop * sr))])
    assert abs(accumulated[-1] - starts[-1]) > 1000  # what the naive loop would have drifted


def test_end_matches_window_length_and_empty_shape():
    sr = 22050
    cfg = SegmentConfig(segment_s=0.3333, hop_s=0.25)
    frames, s, e = segment(np.ones(sr, dtype=np.float32), sr, cfg)
    L = round(0.3333 * sr)
    assert frames.shape[1] == L
    np.testing.assert_allclose(e - s, L / sr)
    frames, s, e = segment(np.ones(10, dtype=np.float32), sr, cfg)
    assert frames.shape == (0, L) and len(s) == len(e) == 0


@pytest.mark.parametrize("seg, hop", [(0, 1), (1, 0), (-1, 1), (1, -0.5), (1, 1e-6), (1e-6, 1)])
def test_invalid_lengths_raise(seg, hop):
    with pytest.raises(ValueError):
        window_starts(1000, 16000, seg, hop)


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(0, 300_000),
    sr=st.sampled_from([8000, 11025, 16000, 22050, 32000, 44100, 48000, 96000]),
    seg=st.floats(0.01, 4.0),
    hop=st.floats(0.005, 4.0),
)
def test_window_properties(n, sr, seg, hop):
    starts = window_starts(n, sr, seg, hop)
    L = int(round(seg * sr))
    K = len(starts)
    # window k starts at round(k * hop * sr), computed from k
    assert starts.tolist() == [round(k * hop * sr) for k in range(K)]
    # every window inside the signal, strictly increasing
    assert np.all(starts >= 0) and np.all(starts + L <= n)
    assert np.all(np.diff(starts) > 0)
    # maximal: the next window would not fit
    assert round(K * hop * sr) + L > n
    if K:
        # coverage: with hop <= segment the windows tile [0, last end); the only holes are the
        # one-sample rounding gaps of a non-integer hop (hop = seg = 3812.5 samples gives
        # windows of 3812 starting 3812 or 3813 apart). The uncovered tail is under one hop.
        if hop <= seg:
            assert np.all(np.diff(starts) <= L + 1)
            if float(hop * sr).is_integer() and float(seg * sr).is_integer():
                assert np.all(np.diff(starts) <= L)
        assert n - (starts[-1] + L) < hop * sr + 1
