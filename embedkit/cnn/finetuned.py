"""A fine-tuned model: its network, its inference rule and its model file.

What ``embedkit finetune`` (``embedkit.cnn.finetune``, the training task) writes and what
inference loads: ``load_finetuned(path)`` rebuilds a :class:`FinetunedModel` from the model file
alone. Inference needs nothing of the training engine, so this module does not import it
(tests/test_imports.py checks).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import AudioConfig
from ..errors import ModelLoadingError, first_line
from .model import check_windows, file_windows, net_embeddings, net_probabilities, probability_module, read_model_file


def build_finetune_net(backbone_module, embedding_dim: int, n_classes: int, dropout: float):
    """nn.Module: waveform [B, N] -> logits [B, n_classes]; ``.backbone`` and ``.head``."""
    from torch import nn

    class FinetuneNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = backbone_module
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(embedding_dim, n_classes))

        def forward(self, y):
            return self.head(self.backbone(y))

    return FinetuneNet()


@dataclass
class FinetunedModel:
    """A fine-tuned backbone + head. Inference rule: the network maps each waveform window
    (at ``sample_rate``) to logits; softmax gives its probabilities.

    ``predict_windows(windows [K, L])`` -> probabilities [K, C];
    ``predict_proba_file(path)`` -> (segment probabilities [K, C], track mean probability [C]).
    """

    net: Any
    labels: list[str]
    sample_rate: int
    audio: AudioConfig
    segment_s: float = 5.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def window_samples(self) -> int:
        """Samples in one window: round(segment_s * sample_rate), as embedkit.audio.segments cuts them."""
        return int(round(self.segment_s * self.sample_rate))

    def predict_windows(self, windows: np.ndarray, device=None, precision: str = "fp32") -> np.ndarray:
        """Windows float32 [K, window_samples] (mono, at ``sample_rate``) -> probabilities float64
        [K, len(labels)], rows summing to 1 (K may be 0). The net runs on ``device`` (None: where
        it is) under ``precision``'s autocast."""
        x = check_windows(windows, self.window_samples, self.sample_rate)
        return net_probabilities(self.net, x, len(self.labels), device, precision)

    def embed_windows(self, windows: np.ndarray, device=None, precision: str = "fp32"):
        """Windows [K, L] -> (probabilities [K, C] as ``predict_windows``, the embedding the
        not-music detector reads [K, D]: the fine-tuned backbone's output)."""
        x = check_windows(windows, self.window_samples, self.sample_rate)
        return net_embeddings(self.net, self.net.backbone, self.net.head, x, len(self.labels), device, precision)

    def torch_module(self):
        """torch module: windows [B, L] -> probabilities [B, C], the torch form of ``predict_windows``."""
        return probability_module(None, self.net)

    def predict_proba_file(self, path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
        """``predict_windows`` on the file's windows as the run's evaluation saw them
        (``embedkit.cnn.model.file_windows``): (segment probabilities [K, C], their mean [C])."""
        p = self.predict_windows(file_windows(path, self.sample_rate, self.audio, self.segment_s))
        return p, p.mean(axis=0)


def load_finetuned(path: str | os.PathLike) -> FinetunedModel:
    """Rebuild from the file alone: the architecture record stored beside the weights
    (``embedkit.backbones.architecture``) + the stored weights (all of them, backbone included),
    so PANNs / AST fine-tunes load without the original checkpoint. Files written before the
    record existed are rebuilt from the registered backbone (which then needs its weights)."""
    from ..backbones import load_backbone
    from ..backbones.architecture import rebuild
    from ..config import from_dict

    d = read_model_file(path)
    if d.get("kind") != "finetune":
        raise ModelLoadingError(
            f"{path}: a {d.get('kind')!r} model; load scratch CNNs with embedkit.cnn.model.load_model"
        )
    if "architecture" in d:
        module = rebuild(d["architecture"], str(path))
    else:
        module = load_backbone(d["backbone"]).torch_module()
        if module is None:
            raise ModelLoadingError(f"{path}: backbone {d['backbone']!r} no longer provides a torch module")
    # a copy: load_state_dict below must not write into tensors a backbone loader may share
    net = build_finetune_net(
        copy.deepcopy(module), int(d["spec"]["embedding_dim"]), len(d["labels"]), float(d["finetune"]["head_dropout"])
    )
    try:
        net.load_state_dict(d["state_dict"])
    except RuntimeError as exc:
        raise ModelLoadingError(f"{path}: weights do not fit backbone {d['backbone']!r} ({first_line(exc)})") from None
    net.eval()
    meta = {"backbone": d["backbone"], "fold": d.get("fold"), "spec": d["spec"], "weights_id": d.get("weights_id")}
    return FinetunedModel(
        net,
        list(d["labels"]),
        int(d["spec"]["sample_rate"]),
        from_dict(AudioConfig, d["audio"]),
        float(d["segment_s"]),
        meta,
    )
