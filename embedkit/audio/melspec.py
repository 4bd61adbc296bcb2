"""Log-mel front end in torch, numerically matching librosa.

Written by hand (not torchaudio, which is incompatible with the pinned torch): a centred STFT
(`torch.stft`, Hann window) followed by librosa's mel filterbank, so a model trained on these
features sees the same numbers as ``librosa.feature.melspectrogram``. The filterbank is
``mel_filters``, librosa's ``filters.mel`` algorithm in numpy: importing librosa.filters pulls in
scipy.signal (~3 s of imports on a 2-core laptop), which every model start-up paid for a matrix
that takes a millisecond to compute (tests/test_tag.py checks equality with librosa).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def _hz_to_mel(f: np.ndarray, htk: bool) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + f / 700.0)
    f_sp, min_log_hz = 200.0 / 3, 1000.0  # Slaney: linear below 1 kHz, logarithmic above
    mels = f / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_hz / f_sp + np.log(np.maximum(f, min_log_hz) / min_log_hz) / logstep, mels)


def _mel_to_hz(m: np.ndarray, htk: bool) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    if htk:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filters(
    sr: int,
    n_fft: int,
    n_mels: int,
    fmin: float = 0.0,
    fmax: float | None = None,
    htk: bool = False,
    norm: str | None = "slaney",
) -> np.ndarray:
    """Mel filterbank float32 [n_mels, 1 + n_fft // 2]: ``librosa.filters.mel`` (same steps,
    same float64 intermediates, float32 result), without importing librosa / scipy.signal."""
    fmax = float(sr) / 2 if fmax is None else fmax
    weights = np.zeros((int(n_mels), 1 + n_fft // 2), dtype=np.float32)
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(fmin, htk), _hz_to_mel(fmax, htk), int(n_mels) + 2), htk)
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    for i in range(int(n_mels)):
        weights[i] = np.maximum(0, np.minimum(-ramps[i] / fdiff[i], ramps[i + 2] / fdiff[i + 1]))
    if norm == "slaney":
        weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, np.newaxis]
    elif norm is not None:
        raise ValueError(f"unsupported mel norm {norm!r} (slaney or None)")
    return weights


class MelSpectrogram(nn.Module):
    """waveform [B, N] -> mel power spectrogram [B, n_mels, T] (T = 1 + N // hop when centred).

    Parameters mirror librosa.feature.melspectrogram (Slaney mel scale and norm by default).
    The filterbank and window are buffers, so they travel with state dicts and exports.
    """

    def __init__(
        self,
        sample_rate: int,
        n_fft: int,
        hop_length: int,
        n_mels: int,
        f_min: float = 0.0,
        f_max: float | None = None,
        power: float = 2.0,
        center: bool = True,
        pad_mode: str = "constant",
        htk: bool = False,
        norm: str | None = "slaney",
    ):
        super().__init__()
        self.n_fft, self.hop_length, self.power, self.center, self.pad_mode = n_fft, hop_length, power, center, pad_mode
        fb = mel_filters(sample_rate, n_fft, n_mels, f_min, f_max, htk=htk, norm=norm)
        self.register_buffer("mel_fb", torch.from_numpy(fb), persistent=False)  # [n_mels, 1 + n_fft//2]
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True), persistent=False)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(
            y,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            window=self.window,
            center=self.center,
            pad_mode=self.pad_mode,
            return_complex=True,
        )
        mag = spec.abs()
        if self.power != 1.0:
            mag = mag.pow(self.power)
        return torch.matmul(self.mel_fb, mag)


def power_to_db(
    s: torch.Tensor, amin: float = 1e-10, top_db: float | None = 80.0, ref_max: bool = True
) -> torch.Tensor:
    """10*log10(S / ref) like librosa.power_to_db; ref = max per example when ref_max."""
    db = 10.0 * torch.log10(torch.clamp(s, min=amin))
    if ref_max:
        ref = torch.amax(s, dim=tuple(range(1, s.dim())), keepdim=True).clamp(min=amin)
        db = db - 10.0 * torch.log10(ref)
    if top_db is not None:
        peak = torch.amax(db, dim=tuple(range(1, s.dim())), keepdim=True)
        db = torch.maximum(db, peak - top_db)
    return db
