"""Fused backbones: ``musicnn-msd+musicnn-mtt+melstats``, the concatenation of registered
backbones' embeddings of the same window.

Alignment: a common segment grid. Every part's store cuts window k of a track at
[k * hop_s, k * hop_s + segment_s) seconds of the same clip (one ``PreprocessConfig`` for all
parts; ``embedkit.fusion`` refuses stores whose preprocessing differs), so segment k of one
part and segment k of another hear the same 5 s. Why not track-level pooling: every door
(tag, stream, serve, ONNX) is a function of one window (``embedkit.deploy.base.Tagger``), a
stream decides per window, and the head trains on 6 rows per track instead of 1; with a common
grid the fused head is an ordinary head on wider windows.

Sample rates: the fused backbone takes windows at the highest of its parts' rates (nothing is
lost) and resamples each window to the rate of every slower part with :class:`SincResampler`
(a fixed windowed-sinc polyphase filter: one strided conv1d, so the torch tagger and the ONNX
graph compute the same thing). Training read each part's stored embeddings, which the extractor
computed from the whole clip resampled by soxr; per-window resampling differs from that only in
the filter (and at the window edges, where the filter sees zeros instead of the neighbouring
audio). ``bench/bench_fused.py`` measures what this costs in track probabilities on gtzan_mini.
"""

from __future__ import annotations

import math
from math import gcd
from typing import Any

import numpy as np

from ..errors import BackboneError
from .base import Backbone, BackboneSpec

SEPARATOR = "+"
FAMILY = "fused"
#: the per-window resampler: torchaudio's sinc_interp_hann filter design, with the cut-off
#: (ROLLOFF x the lower Nyquist) and length (LOWPASS_WIDTH zero crossings each side) chosen to
#: match soxr HQ, the resampler of extraction. Grid on gtzan_mini clips and noise, 22.05 -> 16
#: kHz, window interiors (bench/bench_fused.py): max |sinc - soxr| / max |soxr| 0.28 % (metal),
#: 0.02 % (classical), 1.0 % (noise) at 0.955 / 64; torchaudio's default 0.99 / 6 and 0.99 / 16
#: pass more of the 7.5-8 kHz band that soxr removes (2.9-13 %), and musicnn's log-mel top bands
#: magnify it (its embeddings 15 % off on average, 35 % at worst, 30 gtzan tracks).
LOWPASS_WIDTH = 64
ROLLOFF = 0.955


def is_fused(name: str | None) -> bool:
    return bool(name) and SEPARATOR in str(name)


def parse_parts(name: str) -> list[str]:
    """``"a+b+c"`` -> ["a", "b", "c"], each a registered backbone (BackboneError otherwise, one
    line naming the valid ones); at least two different parts."""
    from . import get_spec

    parts = [p.strip() for p in str(name).split(SEPARATOR)]
    if len(parts) < 2 or any(not p for p in parts):
        raise BackboneError(f"fused backbone {name!r}: join two or more backbone names with '+'")
    dup = sorted({p for p in parts if parts.count(p) > 1})
    if dup:
        raise BackboneError(f"fused backbone {name!r} names {', '.join(dup)} twice")
    for p in parts:
        get_spec(p)
    return parts


def fused_spec(part_specs: list[dict[str, Any]], part_weights: list[str]) -> BackboneSpec:
    """The spec of a fusion of parts (their spec dicts, in order, and weights ids): sample rate
    the highest part rate, embedding the concatenation; the parts' contracts travel in
    ``frontend`` (hashed and checked like any front end)."""
    names = [s["name"] for s in part_specs]
    rate = max(int(s["sample_rate"]) for s in part_specs)
    keys = ("name", "family", "sample_rate", "embedding_dim", "frontend", "weights_sha256")
    parts = [{**{k: s.get(k) for k in keys}, "weights_id": w} for s, w in zip(part_specs, part_weights)]
    resampler = {"method": "sinc_interp_hann", "lowpass_width": LOWPASS_WIDTH, "rolloff": ROLLOFF}
    return BackboneSpec(
        name=SEPARATOR.join(names),
        family=FAMILY,
        sample_rate=rate,
        embedding_dim=int(sum(int(s["embedding_dim"]) for s in part_specs)),
        segment_s=float(part_specs[0].get("segment_s") or 5.0),
        frontend={"parts": parts, "resampler": resampler},
        weights=" + ".join(str(s.get("weights") or "none") for s in part_specs),
        license=" + ".join(str(s.get("license") or "n/a") for s in part_specs),
        description="concatenated embeddings of " + ", ".join(names),
        outputs=(),
        pretrained=any(bool(s.get("pretrained", True)) for s in part_specs),
    )


def fused_weights_id(part_weights: list[str]) -> str:
    return SEPARATOR.join(str(w) for w in part_weights)


def part_dims(spec: dict[str, Any]) -> list[int]:
    """Embedding sizes of the parts of a fused spec dict, in order."""
    return [int(p["embedding_dim"]) for p in spec["frontend"]["parts"]]


# ---------------------------------------------------------------------------------------------
# per-window resampling


def _sinc_kernel(sr_in: int, sr_out: int):
    """torchaudio's ``_get_sinc_resample_kernel`` (sinc_interp_hann): [new, 1, 2 w + orig]
    float64 polyphase filters and w, for rates reduced by their gcd."""
    import torch

    g = gcd(sr_in, sr_out)
    orig, new = sr_in // g, sr_out // g
    base = min(orig, new) * ROLLOFF
    width = math.ceil(LOWPASS_WIDTH * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new + idx
    t = (t * base).clamp(-LOWPASS_WIDTH, LOWPASS_WIDTH)
    window = torch.cos(t * math.pi / LOWPASS_WIDTH / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, torch.ones_like(t), t))
    return kernel * window * (base / orig), width, orig, new


def _resampler_class():
    import torch
    from torch import nn

    class SincResampler(nn.Module):
        """windows [B, L_in] at sr_in -> [B, n_out] at sr_out: a strided conv1d with fixed
        windowed-sinc filters (zero padding outside the window), cut or zero-padded to n_out."""

        def __init__(self, sr_in: int, sr_out: int, n_out: int):
            super().__init__()
            kernel, self.width, self.orig, self.new = _sinc_kernel(sr_in, sr_out)
            self.register_buffer("kernel", kernel.to(torch.float32))
            self.n_out = int(n_out)

        def forward(self, y):
            b, n = y.shape
            x = nn.functional.pad(y, (self.width, self.width + self.orig))
            out = nn.functional.conv1d(x[:, None], self.kernel, stride=self.orig)  # [B, new, T]
            out = out.transpose(1, 2).reshape(b, -1)
            if out.shape[1] < self.n_out:
                out = nn.functional.pad(out, (0, self.n_out - out.shape[1]))
            return out[:, : self.n_out]

    return SincResampler


def resampler(sr_in: int, sr_out: int, n_out: int):
    """A :class:`SincResampler` torch module (the identity's job is the caller's: rates equal)."""
    return _resampler_class()(int(sr_in), int(sr_out), int(n_out)).eval()


# ---------------------------------------------------------------------------------------------
# the loaded fusion


class FusedBackbone(Backbone):
    """Loaded parts behind one backbone: windows [B, round(segment_s * sample_rate)] at the
    highest part rate -> concatenated part embeddings [B, sum D] (part order). ``segment_s``:
    the window length of the run (each part's window is round(segment_s * its rate))."""

    def __init__(self, parts: list[Backbone], segment_s: float):
        self.parts = list(parts)
        self.segment_s = float(segment_s)
        self.spec = fused_spec([p.spec.to_dict() for p in self.parts], [p.weights_id for p in self.parts])
        self.weights_id = fused_weights_id([p.weights_id for p in self.parts])
        self._resamplers = [
            None
            if p.spec.sample_rate == self.spec.sample_rate
            else resampler(self.spec.sample_rate, p.spec.sample_rate, round(self.segment_s * p.spec.sample_rate))
            for p in self.parts
        ]

    def part_windows(self, segments: np.ndarray) -> list[np.ndarray]:
        """The windows each part sees: float32 [B, round(segment_s * part rate)]."""
        import torch

        x = np.ascontiguousarray(segments, dtype=np.float32)
        out = []
        for r in self._resamplers:
            if r is None:
                out.append(x)
                continue
            with torch.inference_mode():
                out.append(r(torch.from_numpy(x)).numpy())
        return out

    def embed(self, segments: np.ndarray) -> np.ndarray:
        xs = self.part_windows(segments)
        return np.concatenate([p.embed(x) for p, x in zip(self.parts, xs)], axis=1).astype(np.float32)

    def to(self, device, precision: str | None = None) -> "FusedBackbone":
        for p in self.parts:
            p.to(device, precision)
        torch_parts = [p for p in self.parts if p.torch_module() is not None]
        if torch_parts:
            self.device, self.precision = torch_parts[0].device, torch_parts[0].precision
        return self

    def torch_module(self):
        """waveform [B, L] -> [B, sum D] (resamplers + each part's module), or None when a part
        has no torch module (melstats)."""
        mods = [p.torch_module() for p in self.parts]
        if any(m is None for m in mods):
            return None
        return fused_module(mods, self._resamplers)


def fused_module(modules: list, resamplers: list):
    """torch module: windows [B, L] -> concatenation of ``modules[i](resamplers[i](windows))``
    (a None resampler: the part takes the windows as they are)."""
    import torch
    from torch import nn

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.parts = nn.ModuleList(modules)
            self.resamplers = nn.ModuleList([r if r is not None else nn.Identity() for r in resamplers])

        def forward(self, y):
            return torch.cat([m(r(y)) for m, r in zip(self.parts, self.resamplers)], dim=1)

    return Fused().eval()


def load_fused(name: str, segment_s: float, checkpoint: str | None = None) -> FusedBackbone:
    """Load every part of ``name`` ("a+b") with its default weights. A ``checkpoint`` is refused:
    one file cannot name the weights of several parts."""
    from . import load_backbone

    parts = parse_parts(name)
    if checkpoint:
        raise BackboneError(
            f"fused backbone {name}: --checkpoint names one backbone's weights; parts load their defaults"
        )
    return FusedBackbone([load_backbone(p) for p in parts], segment_s)
