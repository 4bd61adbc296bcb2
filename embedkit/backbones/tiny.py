"""`tiny-test`: a seeded random-weight CNN (16 kHz, 32-d). Lets the whole CLI and fine-tuning
(and, by design, the deployment stage's export) run in tests in seconds; its weights are rebuilt
bit-identically from the seed. `tiny-test-b` (22.05 kHz, 16-d, seed 1): a second one at another
rate, so fused backbones (``tiny-test+tiny-test-b``: two torch fronts, one resampled) run through
every door, ONNX export included, in tests."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np

from .base import Backbone, BackboneSpec
from .registry import register_backbone

SPEC = BackboneSpec(
    name="tiny-test",
    family="tiny",
    sample_rate=16000,
    embedding_dim=32,
    segment_s=5.0,
    frontend={"n_fft": 512, "hop_length": 256, "n_mels": 32, "log": "log1p(1e4*S)"},
    weights="random (seed 0), for tests",
    license="MIT",
    description="tiny random CNN for tests and smoke runs; embeddings carry no musical meaning",
    pretrained=False,
)

SPEC_B = replace(
    SPEC,
    name="tiny-test-b",
    sample_rate=22050,
    embedding_dim=16,
    weights="random (seed 1), for tests",
    description="a second tiny random CNN at 22.05 kHz (fused-backbone tests); no musical meaning",
)


def build_module(seed: int = 0, sample_rate: int = 16000, dim: int = 32):
    import torch
    from torch import nn

    from ..audio.melspec import MelSpectrogram

    class TinyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.mel = MelSpectrogram(sample_rate, 512, 256, 32)
            self.features = nn.Sequential(
                nn.Conv2d(1, 8, 3, padding=1),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(8, dim, 3, padding=1),
                nn.BatchNorm2d(dim),
                nn.ReLU(),
            )

        def forward(self, y):
            x = torch.log1p(1e4 * self.mel(y)).unsqueeze(1)
            return self.features(x).mean(dim=(2, 3))

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    net = TinyNet().eval()
    torch.random.set_rng_state(gen_state)
    return net


class Tiny(Backbone):
    spec = SPEC

    def __init__(self, spec: BackboneSpec = SPEC, seed: int = 0):
        import torch

        self.spec = spec
        self.module = build_module(seed, spec.sample_rate, spec.embedding_dim)
        h = hashlib.sha256()
        for k, v in self.module.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().numpy().tobytes())
        self.weights_id = h.hexdigest()[:12]
        self._torch = torch

    def embed(self, segments: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode(), self._autocast():
            out = self.module(self._input(segments))
        return out.float().cpu().numpy().astype(np.float32)

    def torch_module(self):
        return self.module


def _load(spec: BackboneSpec, checkpoint: str | None = None, **_) -> Tiny:
    return Tiny()


def _load_b(spec: BackboneSpec, checkpoint: str | None = None, **_) -> Tiny:
    return Tiny(SPEC_B, seed=1)


register_backbone(SPEC, _load)
register_backbone(SPEC_B, _load_b)
