"""Which part of a song is listened to, decoded alone and cut into windows.

``Excerpt`` names it (``first``, ``middle``, ``spread:N``, ``full``; see ``embedkit tag --help``)
and ``read_excerpt`` decodes only that part (every format seeks: ``decoding.open_audio``),
resamples it with the decoder's margin (``decoding.MARGIN_S``) so the resampler sees real
samples at the edges, and cuts it with the one windowing function (``embedkit.audio.segments``). Batch tagging, the HTTP service and the
contract tests all read audio through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import AudioError, EmbedkitError
from .decoding import MARGIN_S

#: what ``embedkit tag`` listens to unless told. Measured (bench/bench_excerpts.py, musicnn-msd +
#: lr, heads fitted on other folds, 80 songs of 5 held-out gtzan_mini clips, 150 s): "middle"
#: decides 0.91 of songs right (0.93 clean, 0.90 behind a 30 s intro of another genre) for the
#: same 6 windows and CPU as "first", which gets 0.43 (0.85 clean, 0.00 with the intro);
#: spread:3 (0.95) and full (1.00) cost 3x and 5x here, and full grows with the song's length.
DEFAULT_EXCERPT = "middle"


@dataclass(frozen=True)
class Excerpt:
    """Which part of a song is listened to: mode "first", "middle", "spread" (n clips) or "full"."""

    mode: str = DEFAULT_EXCERPT
    n: int = 1

    @classmethod
    def parse(cls, text: str) -> "Excerpt":
        s = str(text).strip().lower()
        if s in ("first", "middle", "full"):
            return cls(s)
        if s.startswith("spread:"):
            n = s[7:]
            if n.isdigit() and int(n) >= 1:
                return cls("spread", int(n))
        raise EmbedkitError(f"--excerpt must be first, middle, spread:N (N >= 1) or full; got {text!r}")

    def __str__(self) -> str:
        return f"spread:{self.n}" if self.mode == "spread" else self.mode

    def clip_starts(self, duration_s: float, clip_s: float | None) -> list[float] | None:
        """Start times (s) of the clips listened to in a song of ``duration_s``; None: the
        whole song (``full``, or a run without a clip length)."""
        if self.mode == "full" or clip_s is None:
            return None
        room = max(0.0, duration_s - clip_s)
        if self.mode == "first" or room == 0:
            return [0.0]
        if self.mode == "middle":
            return [room / 2]
        return [float(s) for s in np.linspace(0.0, room, self.n)] if self.n > 1 else [0.0]


class TooLong(AudioError):
    """The whole song was asked for (``full``) and it is longer than the caller's limit."""


def read_excerpt(
    path: str,
    sample_rate: int,
    excerpt: Excerpt,
    clip_s: float | None,
    window_s: float,
    hop_s: float,
    *,
    max_full_s: float | None = None,
    duration_s: float | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Decode only what ``excerpt`` listens to and cut it into windows.

    max_full_s: when the whole song is read, decode at most this much (+ 1 s, to see that a
    file is longer than its header says) and raise ``TooLong`` beyond it (the HTTP service's
    bound on decoded audio); None: no limit. duration_s: the header's duration when the caller
    has already probed the file (not probed again).
    Returns (windows float32 [K, L] at ``sample_rate``, start_s [K] in song time, duration_s
    of the song (the decoded length when the whole file was decoded; else the header's)).
    Raises AudioError naming the file (unreadable, silent, shorter than one window...).
    """
    from ..audio import decoding as audio
    from ..audio.decoding import SILENCE_PEAK
    from ..audio.segments import segment
    from ..config import SegmentConfig

    seg = SegmentConfig(window_s, hop_s)
    if excerpt.mode == "full" or clip_s is None:
        y, sr = audio.decode(path, max_seconds=None if max_full_s is None else max_full_s + 1.0)
        if max_full_s is not None and len(y) > max_full_s * sr:
            raise TooLong(
                path, f"excerpt=full on more than {max_full_s:g} s of audio; use excerpt first, middle or spread:N"
            )
        regions = [(0.0, audio.resample(y, sr, sample_rate))]
        duration = len(y) / sr
    elif excerpt.mode == "first":
        y, sr = audio.decode(path, max_seconds=clip_s + MARGIN_S)
        kept = audio.resample(y, sr, sample_rate)[: int(round(clip_s * sample_rate))]
        # a file that ended inside the read is that long; a longer one: its header says (cheap)
        ended = len(y) < int(np.ceil((clip_s + MARGIN_S) * sr))
        duration = len(y) / sr if ended else _header_duration(path, duration_s)
        regions = [(0.0, kept)]
    else:
        duration = _header_duration(path, duration_s)
        regions = []
        for start in excerpt.clip_starts(duration, clip_s):
            left = min(start, MARGIN_S)
            y, sr = audio.decode(path, max_seconds=left + clip_s + MARGIN_S, start_s=start - left)
            r = audio.resample(y, sr, sample_rate)
            off = int(round(left * sample_rate))
            regions.append((start, r[off : off + int(round(clip_s * sample_rate))]))
    frames, starts = [], []
    for start, y in regions:
        f, s, _ = segment(y, sample_rate, seg)
        frames.append(f)
        starts.append(start + s)
    windows = np.concatenate(frames) if frames else np.zeros((0, int(round(window_s * sample_rate))), np.float32)
    if len(windows) == 0:
        raise AudioError(path, f"too short: {duration:.2f} s is less than one {window_s:g} s window")
    if float(np.max(np.abs(windows))) < SILENCE_PEAK:
        raise AudioError(path, "silent (every sample listened to is zero)")
    return windows, np.concatenate(starts), duration


def _header_duration(path: str, known: float | None) -> float:
    from .decoding import probe

    return float(probe(path)["duration_s"]) if known is None else float(known)
