"""Augmentations: waveform (noise, gain, time stretch, pitch shift, time shift), SpecAugment
masks and mixup.

Every random draw comes from an explicit ``numpy.random.Generator`` passed in by the caller
(the trainer derives one per epoch from the seed), never from the global ``random`` /
``np.random`` state that audiomentations draws from: that is what makes a resumed run repeat
an uninterrupted one exactly. The expensive DSP is a maintained library: time stretch and
pitch shift use Signalsmith Stretch (``python-stretch``, the engine audiomentations 0.43 uses
by default), ~50-65 ms per 5 s crop at 44.1 kHz on one core, both transforms in one pass. That
is 4-8x faster than pedalboard's Rubber Band and ~1.4x the cost of librosa's phase vocoder,
chosen over it for quality: the phase vocoder smears transients, and its pitch shift is a
stretch plus a resample (bench/bench_cnn.py prints the comparison). Noise, gain and shift are
one line each.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, require

WAVE_AUGS = ("noise", "gain", "stretch", "pitch", "shift")
ALL_AUGS = WAVE_AUGS + ("specaugment", "mixup")


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations run, and their ranges. Each waveform transform is applied to a
    training crop with probability ``p``; SpecAugment and mixup apply to every batch."""

    enabled: tuple[str, ...] = ()
    p: float = 0.5
    noise_snr_db: tuple[float, float] = (10.0, 20.0)
    gain_db: float = 6.0  # uniform in [-gain_db, +gain_db]
    stretch: tuple[float, float] = (0.8, 1.2)  # speed factor (>1 faster / shorter)
    pitch_semitones: float = 2.0  # uniform in [-x, +x]
    shift_max: float = 0.5  # circular shift by up to this fraction of the length
    freq_masks: int = 2
    freq_width: int = 12  # max mel bands per mask (12 of the recipe's 96: cnn/recipe.py)
    time_masks: int = 2
    time_width: int = 20  # max frames per mask (0.46 s at the recipe's 22.05 kHz / hop 512)
    mixup_alpha: float = 0.2
    wave_mode: str = "pool"  # "pool" (pre-augmented variants) or "online"
    pool_size: int = 4

    def __post_init__(self):
        bad = [a for a in self.enabled if a not in ALL_AUGS]
        if bad:
            raise ConfigError(
                f"unknown augmentation {bad[0]!r}; choose from {', '.join(ALL_AUGS)}, all or none", field="augment"
            )
        if self.wave_mode not in ("pool", "online"):
            raise ConfigError(f"wave_mode must be pool or online, got {self.wave_mode!r}", field="wave_mode")
        if not 0 <= self.p <= 1:
            raise ConfigError(f"p (augmentation probability) must be in [0, 1], got {self.p:g}", field="p")
        if self.pool_size < 1:
            raise ConfigError(f"pool_size must be >= 1, got {self.pool_size}", field="pool_size")
        if self.mixup_alpha <= 0:
            raise ConfigError(f"mixup_alpha must be > 0, got {self.mixup_alpha:g}", field="mixup_alpha")

    @classmethod
    def parse(cls, spec: str, **kw) -> "AugmentConfig":
        """'all', 'none', or a comma list such as 'noise,gain,specaugment'."""
        spec = (spec or "none").strip().lower()
        names = (
            ALL_AUGS
            if spec == "all"
            else ()
            if spec in ("none", "")
            else tuple(s.strip() for s in spec.split(",") if s.strip())
        )
        return cls(
            enabled=tuple(a for a in ALL_AUGS if a in names) + tuple(a for a in names if a not in ALL_AUGS), **kw
        )

    def on(self, name: str) -> bool:
        return name in self.enabled

    @property
    def waveform(self) -> bool:
        return any(a in self.enabled for a in WAVE_AUGS)

    def wave_identity(self) -> dict[str, Any]:
        """The fields that determine pre-augmented variants (a pool-cache key)."""
        d = asdict(self)
        keep = ("p", "noise_snr_db", "gain_db", "stretch", "pitch_semitones", "shift_max", "pool_size")
        return {"enabled": [a for a in self.enabled if a in WAVE_AUGS], **{k: d[k] for k in keep}}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AugmentConfig":
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# Waveform transforms (explicit parameters; deterministic)


def add_noise(y: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """White Gaussian noise at ``snr_db`` relative to the RMS of y."""
    rms = float(np.sqrt(np.mean(np.square(y, dtype=np.float64))))
    noise_rms = rms / (10.0 ** (snr_db / 20.0))
    return (y + rng.standard_normal(len(y)).astype(np.float32) * np.float32(noise_rms)).astype(np.float32)


def apply_gain(y: np.ndarray, gain_db: float) -> np.ndarray:
    return (y * np.float32(10.0 ** (gain_db / 20.0))).astype(np.float32)


def time_shift(y: np.ndarray, n: int) -> np.ndarray:
    """Circular shift by n samples (the crop still contains only this clip's audio)."""
    return np.roll(y, n)


def stretch_and_pitch(y: np.ndarray, sr: int, rate: float = 1.0, semitones: float = 0.0) -> np.ndarray:
    """Time stretch by ``rate`` (output ~len(y)/rate samples) and transpose by ``semitones``
    in one Signalsmith pass (doing both at once costs the same as either alone)."""
    ps = require("python_stretch", "pip install 'embedkit[augment]'", "time stretch / pitch shift")
    st = ps.Signalsmith.Stretch()
    st.preset(1, int(sr))
    st.setTimeFactor(float(rate))
    st.setTransposeSemitones(float(semitones))
    return np.ascontiguousarray(st.process(np.ascontiguousarray(y, dtype=np.float32)[None])[0], dtype=np.float32)


@dataclass
class WaveParams:
    """One draw of the waveform transforms (None = transform not applied)."""

    rate: float | None = None
    semitones: float | None = None
    shift: float | None = None  # fraction of the length
    gain_db: float | None = None
    snr_db: float | None = None
    seed: int = 0  # for the noise samples

    def source_factor(self) -> float:
        """How much source audio the transform consumes per output sample (the stretch rate)."""
        return self.rate or 1.0


def draw_params(cfg: AugmentConfig, rng: np.random.Generator) -> WaveParams:
    """Draw which transforms apply and their parameters. The draw sequence is fixed (every
    transform consumes its draws whether enabled or not), so enabling one augmentation does
    not reshuffle the others' parameters."""
    u = rng.random(5)
    vals = rng.random(5)
    seed = int(rng.integers(2**31))
    lo, hi = cfg.stretch
    p = WaveParams(seed=seed)
    if cfg.on("stretch") and u[0] < cfg.p:
        p.rate = float(lo + (hi - lo) * vals[0])
    if cfg.on("pitch") and u[1] < cfg.p:
        p.semitones = float(-cfg.pitch_semitones + 2 * cfg.pitch_semitones * vals[1])
    if cfg.on("shift") and u[2] < cfg.p:
        p.shift = float(-cfg.shift_max + 2 * cfg.shift_max * vals[2])
    if cfg.on("gain") and u[3] < cfg.p:
        p.gain_db = float(-cfg.gain_db + 2 * cfg.gain_db * vals[3])
    if cfg.on("noise") and u[4] < cfg.p:
        a, b = cfg.noise_snr_db
        p.snr_db = float(a + (b - a) * vals[4])
    return p


def augment_wave(y: np.ndarray, sr: int, p: WaveParams, out_len: int | None = None) -> np.ndarray:
    """Apply the drawn transforms: stretch/pitch -> shift -> gain -> noise (noise last so its
    SNR is relative to what the network hears). ``out_len`` (default len(y)) fixes the output
    length: a crop is cut ``len(y) = out_len * rate`` long so stretching lands on out_len;
    rounding leftovers are trimmed, a short result is tiled (np.resize repeats the signal)."""
    out_len = len(y) if out_len is None else out_len
    if p.rate is not None or p.semitones is not None:
        y = stretch_and_pitch(y, sr, p.rate or 1.0, p.semitones or 0.0)
    y = y[:out_len] if len(y) >= out_len else np.resize(y, out_len)
    if p.shift is not None:
        y = time_shift(y, int(round(p.shift * out_len)))
    if p.gain_db is not None:
        y = apply_gain(y, p.gain_db)
    if p.snr_db is not None:
        y = add_noise(y, p.snr_db, np.random.default_rng(p.seed))
    return np.ascontiguousarray(y, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Batch-level: SpecAugment and mixup


def spec_augment(x, cfg: AugmentConfig, rng: np.random.Generator):
    """Zero random mel bands and frame ranges of each example, in place.

    x: torch [B, M, T] (normalised, so 0 is the band mean under standardisation). Hand-written
    because torchaudio's masking is not usable with the pinned torch; widths are uniform in
    [0, width], positions uniform where the mask fits (Park et al., 2019)."""
    b, m, t = x.shape
    for i in range(b):
        for _ in range(cfg.freq_masks):
            w = int(rng.integers(0, min(cfg.freq_width, m) + 1))
            f0 = int(rng.integers(0, m - w + 1))
            x[i, f0 : f0 + w, :] = 0.0
        for _ in range(cfg.time_masks):
            w = int(rng.integers(0, min(cfg.time_width, t) + 1))
            t0 = int(rng.integers(0, t - w + 1))
            x[i, :, t0 : t0 + w] = 0.0
    return x


def mixup(x, targets, alpha: float, rng: np.random.Generator):
    """Mix each example with a random partner: x' = lam x + (1-lam) x[perm], same for the
    one-hot/soft targets [B, C] (so targets stay convex combinations). lam ~ Beta(alpha, alpha),
    one per batch. Returns (x', targets', lam, perm)."""
    import torch

    lam = float(rng.beta(alpha, alpha)) if alpha > 0 else 1.0
    perm = torch.from_numpy(rng.permutation(x.shape[0]))
    return lam * x + (1 - lam) * x[perm], lam * targets + (1 - lam) * targets[perm], lam, perm
