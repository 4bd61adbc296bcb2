"""Backbone contract: a spec (known without loading anything) and a loaded model.

A backbone maps a batch of fixed-length mono segments at ``spec.sample_rate`` to one embedding
per segment. Torch-based backbones also expose ``torch_module()`` (waveform -> embedding) so the
fine-tuning trainer can train them end to end.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class BackboneSpec:
    """Everything a user or an artefact needs to know about a backbone.

    name: registry name (e.g. "musicnn-msd").
    family: implementation family ("musicnn", "panns", "ast", "melstats", "tiny").
    sample_rate: input rate in Hz; segments are resampled to it from the canonical decode.
    embedding_dim: size D of the per-segment embedding.
    segment_s: default segment length the model was designed for (extraction may override).
    frontend: front-end parameters (n_fft, hop, n_mels, ...), informational and hashed.
    weights: human description of the weights source (package data, file, hub id, none).
    weights_sha256: SHA-256 of the canonical weights file when known (None: computed at load
        or not applicable).
    license: licence of the weights.
    outputs: extra per-segment outputs besides the embedding (e.g. ("taggram",)).
    pretrained: the weights were learned on a large corpus (False: hand-crafted features or
        random test weights); run records and the report read it instead of knowing names.
    """

    name: str
    family: str
    sample_rate: int
    embedding_dim: int
    segment_s: float = 5.0
    frontend: dict[str, Any] = field(default_factory=dict)
    weights: str = "none"
    weights_sha256: str | None = None
    license: str = "n/a"
    description: str = ""
    outputs: tuple[str, ...] = ()
    requires: str = ""  # pip command for optional dependencies, shown by `embedkit models`
    pretrained: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["outputs"] = list(self.outputs)
        return d


class Backbone(ABC):
    """A loaded backbone. Subclasses set ``spec`` and ``weights_id`` and implement ``embed``."""

    spec: BackboneSpec
    #: identifies the exact weights (SHA-256 prefix of the checkpoint, or "none"); part of store keys.
    weights_id: str = "none"

    @abstractmethod
    def embed(self, segments: np.ndarray) -> np.ndarray:
        """segments float32 [B, L] at spec.sample_rate -> embeddings float32 [B, D]."""

    def outputs(self, segments: np.ndarray) -> dict[str, np.ndarray]:
        """Embedding plus the extra outputs named in spec.outputs (e.g. a taggram)."""
        return {"embedding": self.embed(segments)}

    def output_labels(self, name: str) -> list[str]:
        """Names of the columns of an extra output (e.g. tag or AudioSet class names)."""
        raise KeyError(name)

    def torch_module(self):
        """A torch.nn.Module mapping waveform [B, L] -> embedding [B, D], or None if not torch."""
        return None

    #: where ``embed`` runs (a torch.device for torch backbones after ``to``; "cpu" otherwise).
    device: Any = "cpu"
    #: inference precision, "fp32" (default) | "fp16" | "bf16" (autocast, see embedkit.device);
    #: set it with ``to(device, precision=...)``. Backbones without torch ignore it.
    precision: str = "fp32"

    def to(self, device, precision: str | None = None) -> "Backbone":
        """Run on ``device`` (a torch.device or name from ``embedkit.device.resolve``), at
        ``precision`` when given (fp32 | fp16 | bf16); returns self. Backbones without a torch
        module (melstats) always run on the CPU in float32."""
        module = self.torch_module()
        if module is not None:
            import torch

            from ..device import check_precision

            dev = torch.device(device)
            if precision is not None:
                self.precision = check_precision(precision, dev)
            self.device = dev
            module.to(self.device)
        return self

    def _autocast(self):
        """The autocast context of ``precision`` on ``device`` (a no-op for fp32)."""
        from ..device import autocast

        return autocast(self.device, self.precision)

    def _input(self, y: np.ndarray):
        """float32 numpy [B, L] -> a tensor on ``device`` (pinned, non-blocking copy on CUDA, so
        the copy overlaps the host's next decode)."""
        import torch

        t = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
        dev = torch.device(self.device)
        if dev.type == "cpu":
            return t
        if dev.type == "cuda":
            t = t.pin_memory()
        return t.to(dev, non_blocking=True)
