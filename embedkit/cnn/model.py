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

from ..errors import ConfigError, ModelLoadingError

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


@dataclass
class CNNModel:
    """A trained scratch CNN with everything needed to classify a file.

    ``predict_proba_file(path)`` -> (segment probabilities [K, C], track mean probability [C]).
    """

    net: Any
    labels: list[str]
    features: Any  # FeatureConfig
    audio: Any  # AudioConfig
    normalizer: Any  # Normalizer
    segment_s: float = 5.0
    meta: dict[str, Any] = field(default_factory=dict)

    def segments_logmel(self, spec: np.ndarray) -> np.ndarray:
        """Clip spectrogram [M, T] -> fixed segment spectrograms [K, M, n] (see data.segment_starts)."""
        from .data import segment_starts

        starts, n = segment_starts(spec.shape[-1], self.features.hop_length, self.features.sample_rate, self.segment_s)
        return np.stack([spec[:, s : s + n] for s in starts])

    def predict_proba_file(self, path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
        """The one inference path (``embedkit.tagger.CNNTagger``): per-window log-mel."""
        from ..tagger import CNNTagger

        p, _ = CNNTagger.from_model(self).predict_file(path)
        return p, p.mean(axis=0)


def load_model(path: str | os.PathLike) -> CNNModel:
    """Rebuild a scratch CNN from its model file alone."""
    from ..config import AudioConfig, from_dict
    from .features import FeatureConfig, Normalizer

    d = read_model_file(path)
    if d.get("kind") != "cnn":
        raise ModelLoadingError(
            f"{path}: a {d.get('kind')!r} model; load fine-tuned models with embedkit.cnn.finetune.load_finetuned"
        )
    cfg = CNNConfig.from_dict(d["model_config"])
    net = build_cnn(cfg)
    try:
        net.load_state_dict(d["state_dict"])
    except RuntimeError as exc:
        raise ModelLoadingError(
            f"{path}: weights do not fit the stored architecture ({str(exc).splitlines()[0]})"
        ) from None
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
