"""`melstats`: the classical no-weights baseline (the FMA paper's feature family).

Per segment: mean and std over time of 64 log-mel bands, 20 MFCCs, 12 chroma bins, 7 spectral
contrast bands and 6 scalar descriptors (centroid, bandwidth, roll-off, flatness, zero-crossing
rate, RMS). librosa computes each on the whole batch [B, L] at once.
"""

from __future__ import annotations

import numpy as np

from . import register_backbone
from .base import Backbone, BackboneSpec

SR = 22050
N_FFT = 2048
HOP = 512
N_MELS = 64
N_MFCC = 20

SPEC = BackboneSpec(
    name="melstats",
    family="melstats",
    sample_rate=SR,
    embedding_dim=2 * (N_MELS + N_MFCC + 12 + 7 + 6),
    segment_s=5.0,
    frontend={"n_fft": N_FFT, "hop_length": HOP, "n_mels": N_MELS, "n_mfcc": N_MFCC, "features": "logmel,mfcc,chroma,contrast,scalars"},
    weights="none (hand-crafted features)",
    license="n/a",
    description="mean/std of log-mel, MFCC, chroma, spectral contrast and scalar descriptors",
)


class MelStats(Backbone):
    spec = SPEC
    weights_id = "none"

    def embed(self, segments: np.ndarray) -> np.ndarray:
        import librosa

        y = np.asarray(segments, dtype=np.float32)
        if y.ndim != 2:
            raise ValueError(f"segments must be [B, L], got {y.shape}")
        if y.shape[0] == 0:
            return np.zeros((0, SPEC.embedding_dim), dtype=np.float32)
        stft = np.abs(librosa.stft(y, n_fft=N_FFT, hop_length=HOP))  # [B, F, T]
        power = stft**2
        mel = librosa.feature.melspectrogram(S=power, sr=SR, n_mels=N_MELS)
        logmel = librosa.power_to_db(mel, ref=1.0, top_db=None)
        mfcc = librosa.feature.mfcc(S=logmel, n_mfcc=N_MFCC)
        chroma = librosa.feature.chroma_stft(S=power, sr=SR)
        contrast = librosa.feature.spectral_contrast(S=stft, sr=SR)
        scalars = np.concatenate(
            [
                librosa.feature.spectral_centroid(S=stft, sr=SR) / (SR / 2),
                librosa.feature.spectral_bandwidth(S=stft, sr=SR) / (SR / 2),
                librosa.feature.spectral_rolloff(S=stft, sr=SR) / (SR / 2),
                librosa.feature.spectral_flatness(S=stft),
                librosa.feature.zero_crossing_rate(y, frame_length=N_FFT, hop_length=HOP),
                librosa.feature.rms(S=stft, frame_length=N_FFT),
            ],
            axis=-2,
        )
        feats = [logmel, mfcc, chroma, contrast, scalars]
        out = np.concatenate([np.concatenate([f.mean(-1), f.std(-1)], axis=-1) for f in feats], axis=-1)
        # Silence gives -inf-free but constant features; guard against NaN from 0/0 in flatness.
        return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


def _load(spec: BackboneSpec, checkpoint: str | None = None, **_) -> MelStats:
    return MelStats()


register_backbone(SPEC, _load)
