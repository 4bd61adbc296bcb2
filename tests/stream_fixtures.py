"""Small Taggers and generated signals for the streaming tests (and a child-process entry
point: `python tests/stream_fixtures.py ARGS...` runs `embedkit ARGS` with MODEL "tone" or
"tone-noisy" loading a ToneTagger instead of a run)."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass

import numpy as np

from embedkit.config import AudioConfig, SegmentConfig
from embedkit.deploy.tagger import Tagger

GENRES = ("low", "mid", "high")
CENTRES = (300.0, 700.0, 1500.0)


@dataclass
class ToneTagger(Tagger):
    """Probabilities follow the window's dominant frequency: class c scores high when the peak
    of the spectrum is near CENTRES[c]. noise > 0 adds a deterministic per-window logit noise
    (seeded by the window's bytes), so raw decisions flicker the way a real model's do."""

    noise: float = 0.0

    def predict_segments(self, segments: np.ndarray) -> np.ndarray:
        x = np.asarray(segments, dtype=np.float64)
        if len(x) == 0:
            return np.zeros((0, len(self.labels)))
        spec = np.abs(np.fft.rfft(x * np.hanning(x.shape[1]), axis=1))
        f = np.argmax(spec[:, 1:], axis=1).astype(np.float64) + 1
        f *= self.sample_rate / x.shape[1]
        logits = -(np.log2(f[:, None] / np.asarray(CENTRES)[None, :]) ** 2) * 2.0
        if self.noise:
            for i, row in enumerate(x):
                seed = int.from_bytes(
                    hashlib.blake2b(row.astype(np.float32).tobytes(), digest_size=8).digest(), "little"
                )
                logits[i] += np.random.default_rng(seed).standard_normal(len(self.labels)) * self.noise
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)


@dataclass
class RecordingTagger(ToneTagger):
    """A ToneTagger that keeps every window it is given (``seen``), for parity tests."""

    def __post_init__(self):
        self.seen = []

    def predict_segments(self, segments: np.ndarray) -> np.ndarray:
        self.seen.append(np.array(segments, dtype=np.float32, copy=True))
        return super().predict_segments(segments)


def recording_tagger(sr: int = 8000, segment_s: float = 2.0) -> RecordingTagger:
    return RecordingTagger(
        kind="head",
        labels=list(GENRES),
        sample_rate=sr,
        segment=SegmentConfig(segment_s, segment_s),
        audio=AudioConfig(),
        model_id="rec",
    )


def tone_tagger(noise: float = 0.0, sr: int = 8000, segment_s: float = 2.0) -> ToneTagger:
    return ToneTagger(
        kind="head",
        labels=list(GENRES),
        sample_rate=sr,
        segment=SegmentConfig(segment_s, segment_s),
        audio=AudioConfig(),
        model_id="tone",
        noise=noise,
    )


def three_genres(sr: int, part_s: float = 30.0, seed: int = 0, order=(0, 1, 2)) -> np.ndarray:
    """Concatenated parts, each a tone at one class centre with vibrato, amplitude
    modulation and noise: float32 [len(order) * part_s * sr]."""
    rng = np.random.default_rng(seed)
    n = int(round(part_s * sr))
    t = np.arange(n) / sr
    parts = []
    for c in order:
        f = CENTRES[c] * (1 + 0.02 * np.sin(2 * np.pi * 0.3 * t))
        y = np.sin(2 * np.pi * np.cumsum(f) / sr) * (0.6 + 0.4 * np.sin(2 * np.pi * 1.7 * t))
        parts.append(0.3 * y + 0.05 * rng.standard_normal(n))
    return np.concatenate(parts).astype(np.float32)


def pcm_bytes(y: np.ndarray, fmt: str, channels: int = 1) -> bytes:
    """Mono float32 -> interleaved raw PCM (every channel the same signal)."""
    x = np.repeat(np.asarray(y, dtype=np.float32)[:, None], channels, axis=1)
    if fmt == "s16le":
        return np.clip(np.round(x * 32767), -32768, 32767).astype("<i2").tobytes()
    return x.astype("<f4").tobytes()


def main(argv: list[str]) -> None:
    """Run the embedkit CLI with MODEL 'tone' / 'tone-noisy' meaning a ToneTagger."""
    import os

    import embedkit.deploy.stream as st

    if os.environ.get("STREAM_TEST_RSS"):  # peak resident memory, for the bounded-memory test
        import atexit
        import resource

        atexit.register(
            lambda: print(
                f"peak_rss_kb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr, flush=True
            )
        )
    from embedkit.cli import main as cli_main

    real = st.load_model
    st.load_model = lambda m, checkpoint=None: (
        tone_tagger(noise=1.5 if str(m) == "tone-noisy" else 0.0)
        if str(m) in ("tone", "tone-noisy")
        else real(m, checkpoint)
    )
    sys.argv = ["embedkit", *argv]
    cli_main()


if __name__ == "__main__":
    main(sys.argv[1:])
