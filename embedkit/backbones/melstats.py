"""`melstats`: the classical no-weights baseline (the FMA paper's feature family).

Per segment: mean and std over time of 64 log-mel bands, 20 MFCCs, 12 chroma bins, 7 spectral
contrast bands and 6 scalar descriptors (centroid, bandwidth, roll-off, flatness, zero-crossing
rate, RMS), all from one STFT (n_fft 2048, hop 512, centred) of the batch [B, L].

The definitions are librosa's (melspectrogram/power_to_db, mfcc, chroma_stft, spectral_*,
zero_crossing_rate, rms), computed here from shared intermediates with cached filter banks:
calling the librosa functions one by one recomputes the normalised spectrum several times and
estimated the chroma tuning from the whole batch, which cost ~0.2-0.5 s per 30 s clip and made a
segment's features depend on the other segments in its batch (as did spectral contrast's dB
floor, now taken per segment). Chroma uses A440 tuning (0).
tests/test_extract.py compares every block with the librosa functions and batched with one-by-one.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .base import Backbone, BackboneSpec
from .registry import register_backbone

SR = 22050
N_FFT = 2048
HOP = 512
N_MELS = 64
N_MFCC = 20
N_CHROMA = 12
N_CONTRAST = 7  # 6 octave bands from 200 Hz + the top band
N_SCALARS = 6
AMIN = 1e-10
CHUNK = 8

SPEC = BackboneSpec(
    name="melstats",
    family="melstats",
    sample_rate=SR,
    embedding_dim=2 * (N_MELS + N_MFCC + N_CHROMA + N_CONTRAST + N_SCALARS),
    segment_s=5.0,
    frontend={
        "n_fft": N_FFT,
        "hop_length": HOP,
        "n_mels": N_MELS,
        "n_mfcc": N_MFCC,
        "chroma_tuning": 0.0,
        "feature_version": 2,  # 2: per-segment definitions (no batch-wide tuning / dB floor)
        "features": "logmel,mfcc,chroma,contrast,scalars",
    },
    weights="none (hand-crafted features)",
    license="n/a",
    description="mean/std of log-mel, MFCC, chroma, spectral contrast and scalar descriptors",
    pretrained=False,
)


@lru_cache(maxsize=1)
def _banks() -> dict[str, np.ndarray]:
    import librosa
    import scipy.fft

    return {
        "mel": librosa.filters.mel(sr=SR, n_fft=N_FFT, n_mels=N_MELS).astype(np.float32),  # [64, F]
        # librosa.feature.mfcc = DCT-II (orthonormal) of the dB mel bands, first 20 coefficients.
        "dct": scipy.fft.dct(np.eye(N_MELS), type=2, norm="ortho", axis=0)[:N_MFCC].astype(np.float32),  # [20, 64]
        "chroma": librosa.filters.chroma(sr=SR, n_fft=N_FFT, tuning=0.0, n_chroma=N_CHROMA).astype(
            np.float32
        ),  # [12, F]
        "freq": librosa.fft_frequencies(sr=SR, n_fft=N_FFT).astype(np.float64),  # [F] Hz
    }


def _scalars(y: np.ndarray, S: np.ndarray, power: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """[B, 6, T]: centroid, bandwidth, roll-off (each / Nyquist), flatness, ZCR, RMS."""
    import librosa

    f32 = freq.astype(np.float32)
    total = S.sum(axis=-2).astype(np.float64)  # [B, T]
    nonzero = total > np.finfo(np.float32).tiny
    safe = np.where(nonzero, total, 1.0)
    # librosa normalises columns to sum 1 and leaves all-zero columns at 0 (centroid 0).
    m1 = np.matmul(f32, S).astype(np.float64) / safe  # sum_f f p(f)
    m2 = np.matmul(f32**2, S).astype(np.float64) / safe  # sum_f f^2 p(f)
    centroid = np.where(nonzero, m1, 0.0)
    # sqrt(sum p (f - c)^2) = sqrt(E[f^2] - c^2) for normalised p; the difference is taken in
    # float64 (float32 sums leave ~1e-3 Hz of error on bandwidths of 100s of Hz).
    bandwidth = np.sqrt(np.maximum(np.where(nonzero, m2 - m1**2, 0.0), 0.0))
    cum = np.cumsum(S, axis=-2)  # float32, as librosa.feature.spectral_rolloff
    rolloff = freq[np.argmax(cum >= 0.85 * cum[:, -1:, :], axis=-2)]  # lowest bin reaching 85 %
    pw = np.maximum(power, AMIN)
    # float64 means: a float32 mean of 1025 logs is off by ~3e-4 and varies with the batch shape
    flatness = np.exp(np.log(pw).mean(axis=-2, dtype=np.float64)) / pw.mean(axis=-2, dtype=np.float64)
    zcr = librosa.feature.zero_crossing_rate(y, frame_length=N_FFT, hop_length=HOP)[:, 0, :]
    # librosa.feature.rms(S=...): DC and Nyquist bins count half.
    rms = np.sqrt(2 * (power.sum(axis=-2) - 0.5 * power[:, 0, :] - 0.5 * power[:, -1, :]) / N_FFT**2)
    nyq = SR / 2
    return np.stack([centroid / nyq, bandwidth / nyq, rolloff / nyq, flatness, zcr, rms], axis=1)


def features(y: np.ndarray) -> list[np.ndarray]:
    """Frame-level feature blocks of segments y float32 [B, L] at 22.05 kHz:
    [logmel [B,64,T], mfcc [B,20,T], chroma [B,12,T], contrast [B,7,T], scalars [B,6,T]]."""
    import librosa

    b = _banks()
    S = np.abs(librosa.stft(y, n_fft=N_FFT, hop_length=HOP))  # [B, F, T] magnitude
    power = S**2
    logmel = 10.0 * np.log10(np.maximum(np.matmul(b["mel"], power), AMIN))  # power_to_db(ref=1, top_db=None)
    mfcc = np.matmul(b["dct"], logmel)
    chroma = np.matmul(b["chroma"], power)
    # chroma_stft normalises every frame by its max (librosa.util.normalize, norm=inf).
    cmax = chroma.max(axis=-2, keepdims=True)
    chroma = np.where(cmax > np.finfo(np.float32).tiny, chroma / np.where(cmax > 0, cmax, 1), chroma)
    # One segment per call: spectral_contrast converts to dB with top_db=80 below the max of
    # everything it is given, so a batched call made a segment depend on its batch-mates.
    contrast = np.stack([librosa.feature.spectral_contrast(S=s, sr=SR, n_fft=N_FFT, hop_length=HOP) for s in S])
    return [logmel, mfcc, chroma, contrast, _scalars(y, S, power, b["freq"])]


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
    except ImportError:  # pragma: no cover
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


class MelStats(Backbone):
    spec = SPEC
    weights_id = "none"

    def embed(self, segments: np.ndarray) -> np.ndarray:
        """segments float32 [B, L] at 22.05 kHz -> float32 [B, 218] (means then stds per block)."""
        y = np.asarray(segments, dtype=np.float32)
        if y.ndim != 2:
            raise ValueError(f"segments must be [B, L], got {y.shape}")
        if y.shape[0] == 0:
            return np.zeros((0, SPEC.embedding_dim), dtype=np.float32)
        # Chunks of CHUNK segments keep the [B, 1025, T] intermediates cache-sized: one call
        # on 32 segments is ~1.5x slower per segment than four calls on 8. The filter-bank
        # products are small GEMMs (64 x 1025 x 216) on which OpenBLAS threads only spin:
        # limiting them to one cut CPU time by ~40 % while decode threads ran beside.
        with _one_blas_thread():
            out = np.concatenate([self._stats(y[i : i + CHUNK]) for i in range(0, len(y), CHUNK)])
        # Silence gives constant features; guard against NaN from 0/0 in flatness/contrast.
        return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)

    @staticmethod
    def _stats(y: np.ndarray) -> np.ndarray:
        return np.concatenate([np.concatenate([f.mean(-1), f.std(-1)], axis=-1) for f in features(y)], axis=-1)


def _load(spec: BackboneSpec, checkpoint: str | None = None, **_) -> MelStats:
    return MelStats()


register_backbone(SPEC, _load, identify=lambda spec, checkpoint=None: ("none", spec))
