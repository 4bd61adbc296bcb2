"""Log-mel front end in torch, numerically matching librosa.

Written by hand (not torchaudio, which is incompatible with the pinned torch): a centred STFT
(`torch.stft`, Hann window) followed by librosa's own mel filterbank, so a model trained on
these features sees the same numbers as ``librosa.feature.melspectrogram``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


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
        import librosa

        self.n_fft, self.hop_length, self.power, self.center, self.pad_mode = n_fft, hop_length, power, center, pad_mode
        fb = librosa.filters.mel(
            sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=f_min, fmax=f_max, htk=htk, norm=norm, dtype=np.float32
        )
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


def power_to_db(s: torch.Tensor, amin: float = 1e-10, top_db: float | None = 80.0, ref_max: bool = True) -> torch.Tensor:
    """10*log10(S / ref) like librosa.power_to_db; ref = max per example when ref_max."""
    db = 10.0 * torch.log10(torch.clamp(s, min=amin))
    if ref_max:
        ref = torch.amax(s, dim=tuple(range(1, s.dim())), keepdim=True).clamp(min=amin)
        db = db - 10.0 * torch.log10(ref)
    if top_db is not None:
        peak = torch.amax(db, dim=tuple(range(1, s.dim())), keepdim=True)
        db = torch.maximum(db, peak - top_db)
    return db
