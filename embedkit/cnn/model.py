"""The scratch CNN and its model file.

Default network (0.65 G multiply-adds per 5 s crop of 128 x 431): 4 blocks of 3x3 conv
(32 -> 64 -> 128 -> 128 filters), 2x2 max pooling, batch norm, ReLU; global average pooling,
dropout 0.5, one dense layer. The model file stores the config dataclass beside the weights
(nanoGPT / whisper style) so ``load_model(path)`` rebuilds the network from the file alone.

Block order: ``conv-pool-bn-relu`` (default) pools before batch norm and ReLU. Max pooling
commutes with ReLU, and with BN whenever BN's scale is positive, so at inference this is the
textbook conv-BN-ReLU-pool up to BN's statistics being taken after pooling; BN and ReLU then
touch 4x fewer elements, which made the training step ~1.7x faster on 2 CPU cores (they are
memory-bound and cost as much as the convolutions at full resolution). ``conv-bn-relu-pool``
is available for the textbook order.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, ModelLoadingError, first_line

FORMAT = "embedkit-cnn"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CNNConfig:
    n_classes: int
    n_mels: int = 128
    channels: tuple[int, ...] = (32, 64, 128, 128)
    kernel: int = 3
    pool: tuple[int, int] = (2, 2)  # (mel, time)
    block_order: str = "conv-pool-bn-relu"
    dropout: float = 0.5
    channels_last: bool = True  # NHWC: the layout oneDNN's CPU convolutions run fastest in

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"], d["pool"] = list(self.channels), list(self.pool)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CNNConfig":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["channels"], d["pool"] = tuple(d.get("channels", cls.channels)), tuple(d.get("pool", cls.pool))
        return cls(**d)


def build_cnn(cfg: CNNConfig):
    """torch module: normalised log-mel [B, n_mels, T] (or [B, 1, n_mels, T]) -> logits [B, C]."""
    import torch
    from torch import nn

    if cfg.block_order not in ("conv-pool-bn-relu", "conv-bn-relu-pool"):
        raise ConfigError(
            f"block_order must be conv-pool-bn-relu or conv-bn-relu-pool, got {cfg.block_order!r}", field="block_order"
        )
    if not cfg.channels:
        raise ConfigError("channels needs at least one positive filter count", field="channels")
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"dropout must be in [0, 1), got {cfg.dropout:g}", field="dropout")

    def block(cin: int, cout: int) -> list:
        conv = nn.Conv2d(cin, cout, cfg.kernel, padding=cfg.kernel // 2, bias=False)  # BN has the bias
        pool = nn.MaxPool2d(cfg.pool, ceil_mode=True)  # ceil: odd sizes keep their last row
        bn, act = nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        return [conv, pool, bn, act] if cfg.block_order == "conv-pool-bn-relu" else [conv, bn, act, pool]

    class GenreCNN(nn.Module):
        def __init__(self):
            super().__init__()
            layers, cin = [], 1
            for cout in cfg.channels:
                layers += block(cin, cout)
                cin = cout
            self.features = nn.Sequential(*layers)
            self.dropout = nn.Dropout(cfg.dropout)
            self.classifier = nn.Linear(cin, cfg.n_classes)

        def embed(self, x):
            """[B, M, T] -> [B, channels[-1]] (global average over mel and time)."""
            if x.dim() == 3:
                x = x.unsqueeze(1)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.features(x).mean(dim=(2, 3))

        def forward(self, x):
            return self.classifier(self.dropout(self.embed(x)))

    net = GenreCNN()
    return net.to(memory_format=torch.channels_last) if cfg.channels_last else net


def count_macs(model, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds of one forward pass (conv + linear layers) for an input [1, M, T]."""
    import torch
    from torch import nn

    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
            total += out.numel() * k
        elif isinstance(mod, nn.Linear):
            total += out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(torch.zeros(input_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def n_params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# ---------------------------------------------------------------------------------------------
# Model file


def save_model(path: str | os.PathLike, payload: dict[str, Any]) -> int:
    """Atomic torch.save of a model payload (state dict + configs); returns the file size.

    Only tensors, numbers, strings, lists and dicts go in, so ``torch.load(weights_only=True)``
    (no pickle code execution) reads it back."""
    import torch

    from ..io import atomic_write

    path = atomic_write(
        path, lambda fh: torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **payload}, fh)
    )
    return path.stat().st_size


def read_torch_file(path: str | os.PathLike, unreadable: str, error=ModelLoadingError, hint: str = ""):
    """``torch.load`` (weights only: nothing in the file is executed) of a file embedkit wrote,
    or one line: "<path>: <unreadable> (<exception type>)<hint>"."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise error(f"{path}: {unreadable} ({type(exc).__name__}){hint}") from None


def read_model_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ModelLoadingError(f"{path}: model file not found")
    d = read_torch_file(path, "not a readable embedkit model file")
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ModelLoadingError(f"{path}: not an embedkit CNN / fine-tune model file")
    return d


# ---------------------------------------------------------------------------------------------
# Inference: one rule per model kind, here with the model (``embedkit.deploy.tagger`` wraps it)


def check_windows(windows: np.ndarray, n_samples: int, sample_rate: int) -> np.ndarray:
    """Windows as contiguous float32 [K, n_samples], or ValueError naming the expected shape."""
    x = np.ascontiguousarray(windows, dtype=np.float32)
    if x.ndim != 2 or (len(x) and x.shape[1] != n_samples):
        raise ValueError(f"expected windows [K, {n_samples}] at {sample_rate} Hz, got shape {x.shape}")
    return x


def file_windows(path: str | os.PathLike, sample_rate: int, audio, segment_s: float) -> np.ndarray:
    """The windows of ``path`` as a run's evaluation saw them: decoded with the clip policy
    ``audio`` at ``sample_rate``, then cut into non-overlapping ``segment_s`` windows
    (``embedkit.audio.segments.segment``). float32 [K >= 1, L]; AudioError naming the file
    otherwise (shorter than one window included)."""
    from ..audio.decoding import load
    from ..audio.segments import segment
    from ..config import SegmentConfig
    from ..errors import AudioError

    y = load(path, sample_rate, audio, min_duration_s=segment_s, notes=[])
    frames, _, _ = segment(y, sample_rate, SegmentConfig(segment_s, segment_s))
    if len(frames) == 0:
        raise AudioError(path, f"shorter than one {segment_s:g} s window")
    return frames


def net_probabilities(net, inputs: np.ndarray, n_classes: int, device=None, precision: str = "fp32") -> np.ndarray:
    """A torch classifier's softmax over a batch of numpy inputs, float64 [K, C] (K may be 0).
    The inputs go to ``device`` (None: where the net's parameters are; pinned, non-blocking on
    CUDA), the net runs in eval mode under ``precision``'s autocast, the probabilities come back
    to the host in float64 (MPS has no float64; fp16 / bf16 logits are widened first)."""
    if len(inputs) == 0:
        return np.zeros((0, n_classes))
    import torch

    from ..device import autocast

    if device is None:
        device = next(iter(net.parameters()), torch.empty(0)).device
    dev = torch.device(device)
    x = torch.from_numpy(np.ascontiguousarray(inputs))
    if dev.type != "cpu":
        x = (x.pin_memory() if dev.type == "cuda" else x).to(dev, non_blocking=True)
    net.eval()
    with torch.inference_mode(), autocast(dev, precision):
        return torch.softmax(net(x).detach().float().cpu().double(), dim=1).numpy()


def net_embeddings(net, embed, classify, inputs: np.ndarray, n_classes: int, device=None, precision: str = "fp32"):
    """(softmax(classify(embed(x))) float64 [K, C], embed(x) float32 [K, D]) in one forward in
    eval mode (dropout off: the probabilities are ``net_probabilities``'s); (zeros [0, C], None)
    for no inputs. embed / classify: the network's two halves (``embed_windows``)."""
    if len(inputs) == 0:
        return np.zeros((0, n_classes)), None
    import torch

    from ..device import autocast

    dev = torch.device(device if device is not None else next(iter(net.parameters())).device)
    x = torch.from_numpy(np.ascontiguousarray(inputs)).to(dev)
    net.eval()
    with torch.inference_mode(), autocast(dev, precision):
        e = embed(x)
        logits = classify(e)
    return torch.softmax(logits.detach().float().cpu().double(), dim=1).numpy(), e.detach().float().cpu().numpy()


def probability_module(front, net):
    """torch module: windows [B, L] -> ``net(front(windows))`` softmaxed to probabilities [B, C]
    (``front`` None: the identity)."""
    from torch import nn

    class Probabilities(nn.Module):
        def __init__(self):
            super().__init__()
            self.front = front if front is not None else nn.Identity()
            self.net = net

        def forward(self, y):
            return self.net(self.front(y)).softmax(dim=1)

    return Probabilities().eval()


def inside_frames(n_samples: int, features) -> tuple[int, int]:
    """[first, end) of the centred-STFT frames (``features``: n_fft, hop_length) of an
    ``n_samples`` window whose STFT window lies entirely inside it: ceil(n_fft / 2 / hop) ..
    floor((n_samples - n_fft / 2) / hop) (2 .. 429 of 431 for 5 s at 44.1 kHz, n_fft 2048, hop 512)."""
    half, hop = features.n_fft // 2, features.hop_length
    return -(-half // hop), (n_samples - half) // hop + 1


@dataclass
class CNNModel:
    """A trained scratch CNN with everything needed to classify a file.

    Inference rule (``predict_windows``): a window's log-mel is computed from that window's
    samples alone, keeping only the frames whose STFT window lies entirely inside it
    (``inside_frames``), then normalised and fed to the net. Training evaluated crops of the
    whole clip's log-mel, whose every frame saw real audio; a centred STFT of the window alone
    would add 2 zero-padded frames at each edge, which no training crop contains (keeping them
    halved held-out accuracy of a small gtzan_mini CNN; dropping them left the top genre
    unchanged on 18 of 20 tracks: see ``embedkit.deploy.tagger``). Per-window is what a stream
    or a song excerpt can compute, so it is the inference rule everywhere.

    ``predict_windows(windows [K, L])`` -> probabilities [K, C];
    ``predict_proba_file(path)`` -> (segment probabilities [K, C], track mean probability [C]).
    """

    net: Any
    labels: list[str]
    features: Any  # FeatureConfig
    audio: Any  # AudioConfig
    normalizer: Any  # Normalizer
    segment_s: float = 5.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def sample_rate(self) -> int:
        return int(self.features.sample_rate)

    @property
    def window_samples(self) -> int:
        """Samples in one window: round(segment_s * sample_rate), as embedkit.audio.segments cuts them."""
        return int(round(self.segment_s * self.sample_rate))

    @property
    def inside_frames(self) -> tuple[int, int]:
        """[first, end) of the centred-STFT frames of a window whose STFT window lies inside it."""
        return inside_frames(self.window_samples, self.features)

    def segments_logmel(self, spec: np.ndarray) -> np.ndarray:
        """Clip spectrogram [M, T] -> fixed segment spectrograms [K, M, n] (see data.segment_starts)."""
        from .data import segment_starts

        starts, n = segment_starts(spec.shape[-1], self.features.hop_length, self.features.sample_rate, self.segment_s)
        return np.stack([spec[:, s : s + n] for s in starts])

    def logmel(self, windows: np.ndarray) -> np.ndarray:
        """Windows [K, L] -> normalised log-mel float32 [K, n_mels, T] (the net's input), T the
        frames inside the window (427 for 5 s at 44.1 kHz / hop 512). Computed in fp32 on the host."""
        import torch

        from .features import logmel

        x = check_windows(windows, self.window_samples, self.sample_rate)
        a, b = self.inside_frames
        with torch.inference_mode():
            return self.normalizer(torch.from_numpy(np.ascontiguousarray(logmel(x, self.features)[..., a:b]))).numpy()

    def predict_windows(self, windows: np.ndarray, device=None, precision: str = "fp32") -> np.ndarray:
        """Windows float32 [K, window_samples] (mono, at ``sample_rate``) -> probabilities float64
        [K, len(labels)], rows summing to 1 (K may be 0). The front end runs in fp32 on the host
        whatever the precision; the net on ``device`` (None: where it is) under ``precision``."""
        x = check_windows(windows, self.window_samples, self.sample_rate)
        return net_probabilities(self.net, self.logmel(x) if len(x) else x, len(self.labels), device, precision)

    def embed_windows(self, windows: np.ndarray, device=None, precision: str = "fp32"):
        """Windows [K, L] -> (probabilities [K, C] as ``predict_windows``, the embedding the
        not-music detector reads [K, D]: the pooled output of the last convolution block)."""
        x = check_windows(windows, self.window_samples, self.sample_rate)
        inputs = self.logmel(x) if len(x) else x
        return net_embeddings(
            self.net, self.net.embed, self.net.classifier, inputs, len(self.labels), device, precision
        )

    def front_module(self):
        """torch module: windows [B, L] -> normalised log-mel of the frames inside each window
        [B, M, T], the torch form of ``logmel`` (what the export runs)."""
        from torch import nn

        from .features import logmel_module

        features, normalizer = self.features, self.normalizer

        class Front(nn.Module):
            def __init__(self):
                super().__init__()
                self.logmel = logmel_module(features)
                self.normalize = normalizer.module()

            def forward(self, y):
                a, b = inside_frames(y.shape[-1], features)
                return self.normalize(self.logmel(y)[..., a:b])

        return Front()

    def torch_module(self):
        """torch module: windows [B, L] -> probabilities [B, C], the torch form of ``predict_windows``."""
        return probability_module(self.front_module(), self.net)

    def predict_proba_file(self, path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
        """``predict_windows`` on the file's windows as the run's evaluation saw them
        (``file_windows``): (segment probabilities [K, C], their mean [C])."""
        p = self.predict_windows(file_windows(path, self.sample_rate, self.audio, self.segment_s))
        return p, p.mean(axis=0)


def load_model(path: str | os.PathLike) -> CNNModel:
    """Rebuild a scratch CNN from its model file alone."""
    from ..config import AudioConfig, from_dict
    from .features import FeatureConfig, Normalizer

    d = read_model_file(path)
    if d.get("kind") != "cnn":
        raise ModelLoadingError(
            f"{path}: a {d.get('kind')!r} model; load fine-tuned models with embedkit.cnn.finetuned.load_finetuned"
        )
    cfg = CNNConfig.from_dict(d["model_config"])
    net = build_cnn(cfg)
    try:
        net.load_state_dict(d["state_dict"])
    except RuntimeError as exc:
        raise ModelLoadingError(f"{path}: weights do not fit the stored architecture ({first_line(exc)})") from None
    net.eval()
    return CNNModel(
        net=net,
        labels=list(d["labels"]),
        features=from_dict(FeatureConfig, d["features"]),
        audio=from_dict(AudioConfig, d["audio"]),
        normalizer=Normalizer.from_dict(d["normalizer"]),
        segment_s=float(d.get("segment_s", 5.0)),
        meta={k: d[k] for k in ("train_config", "augment", "versions", "fold") if k in d},
    )
