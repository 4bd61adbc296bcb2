"""The one inference interface every model kind implements: ``Tagger``.

A Tagger takes fixed-length mono windows at its own sample rate and returns class probabilities
(``predict_segments``); ``track_probabilities`` is the mean over windows then the calibration;
``decide`` is the one decision (``embedkit.calibration.decide``) under the model's rule or a
caller's. The kinds live in ``embedkit.deploy.tagger`` (torch-backed) and
``embedkit.deploy.onnx_runtime`` (onnxruntime, no torch); both import this module, which imports
neither torch nor any model kind.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import AudioConfig, SegmentConfig


@dataclass
class Tagger(ABC):
    """A trained model ready for inference.

    kind: "head" (backbone embeddings + a fitted head), "cnn" (scratch CNN) or "finetune".
    labels: class names, the column order of every probability array.
    sample_rate: Hz of the waveform windows ``predict_segments`` takes.
    segment: window length (``segment_s``) and the hop used in training (``hop_s``).
    audio: the clip policy of training (clip length, offset, padding): callers that tag a clip
        the way the model was evaluated use it.
    model_id: a hash of the run's model artefacts; results databases key on it.
    run_dir: the run the tagger was loaded from (None for a model file outside a run).
    spec: the backbone / feature contract recorded in the run (JSON-like dict).
    calibration: an object with ``apply(p [..., C]) -> p [..., C]`` fitted on the run's held-out
        predictions (``embedkit.calibration``), or None: then ``calibrate`` is the identity.
    meta: anything else recorded with the model (run id, versions, thresholds...).
    """

    kind: str
    labels: list[str]
    sample_rate: int
    segment: SegmentConfig
    audio: AudioConfig
    model_id: str
    run_dir: Path | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    calibration: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    #: where the network runs (a torch.device after ``to``) and at which precision; heads
    #: cached as numpy (``embedkit.deploy.headcache``) and calibration always run on the CPU.
    device: Any = "cpu"
    precision: str = "fp32"
    #: False for taggers that run without torch (``embedkit.deploy.onnx_runtime.OnnxTagger``: onnxruntime
    #: on the CPU): ``to`` leaves them where they are and nothing imports torch for them.
    torch_backed = True  # a plain class attribute (no annotation): not a dataclass field

    def to(self, device, precision: str | None = None) -> "Tagger":
        """Run the network on ``device`` (name or torch.device, see ``embedkit.device``) at
        ``precision`` (fp32 | fp16 | bf16, None: unchanged); returns self."""
        if not self.torch_backed:
            return self
        import torch

        from ..device import check_precision

        dev = torch.device(device)
        if precision is not None:
            self.precision = check_precision(precision, dev)
        self.device = dev
        self._move(dev)
        return self

    def single_threaded(self):
        """Context in which this tagger's forwards run on the calling thread only (the CPU
        lanes of ``embedkit.jobs``: one lane per core, no intra-op team)."""
        from ..jobs import torch_single_threaded

        return torch_single_threaded()

    def _move(self, dev) -> None:
        net = getattr(self, "net", None)
        if net is not None:
            net.to(dev)

    def _autocast(self):
        from ..device import autocast

        return autocast(self.device, self.precision)

    @property
    def window_samples(self) -> int:
        """Samples in one window: round(segment_s * sample_rate), as embedkit.audio.segments cuts them."""
        return int(round(self.segment.segment_s * self.sample_rate))

    def calibrate(self, probabilities: np.ndarray) -> np.ndarray:
        """Probabilities [..., C] -> calibrated probabilities [..., C] (identity without calibration)."""
        p = np.asarray(probabilities, dtype=np.float64)
        return p if self.calibration is None else np.asarray(self.calibration.apply(p), dtype=np.float64)

    @property
    def rule(self):
        """The model's default decision rule (``embedkit.calibration.rule_of`` its calibration:
        the stored rule, else threshold 0, always the top genre)."""
        from ..calibration import rule_of

        return rule_of(self.calibration)

    def decide(self, probabilities: np.ndarray, rule=None, not_music: float | None = None):
        """Calibrated track probabilities [C] (and the not-music score, None: none) ->
        ``embedkit.calibration.Decision`` under ``rule`` (default: the model's): the one decision
        every door applies."""
        from ..calibration import decide

        return decide(probabilities, self.labels, rule or self.rule, not_music)

    @abstractmethod
    def predict_segments(self, segments: np.ndarray) -> np.ndarray:
        """Windows float32 [K, window_samples] (mono, at ``sample_rate``) -> uncalibrated
        probabilities float64 [K, len(labels)], rows summing to 1. K may be 0."""

    def embed_segments(self, segments: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Windows [K, window_samples] -> (uncalibrated probabilities [K, C], the window
        embeddings [K, D] the not-music detector reads, or None when this kind exposes none).
        One forward: the probabilities are computed from those embeddings."""
        return self.predict_segments(segments), None

    @property
    def has_not_music(self) -> bool:
        """True when the model carries a not-music detector (``embedkit.calibration``)."""
        return getattr(self.calibration, "detector", None) is not None

    def score_segments(self, segments: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Windows -> (uncalibrated probabilities [K, C], not-music score per window [K] or None
        without a detector): what every door forwards; ``track_result`` takes both."""
        if not self.has_not_music:
            return self.predict_segments(segments), None
        p, _e, nm = self.score_and_embed(segments)
        return p, nm

    def score_and_embed(self, segments: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Windows -> (uncalibrated probabilities [K, C], the embeddings [K, D] or None, the
        not-music score per window [K] or None): one forward, for a caller that also keeps the
        embeddings (``embedkit tag``'s track vectors)."""
        p, e = self.embed_segments(segments)
        nm = (
            None
            if e is None or not self.has_not_music
            else self.calibration.not_music_scores(e, segments, self.sample_rate)
        )
        return p, e, nm

    @property
    def vector_space(self) -> str | None:
        """What ``embed_segments``' embeddings are, stored with each track vector
        (``embedkit.deploy.vectors``) so vectors of different spaces are never compared; None:
        this kind gives no embeddings (an ONNX export)."""
        return None if type(self).embed_segments is Tagger.embed_segments else f"{self.kind}:penultimate"

    def track_probabilities(self, segment_probabilities: np.ndarray) -> np.ndarray:
        """Segment probabilities [K, C] -> the track's calibrated probabilities [C]: the mean
        over windows (the training evaluation's mean-probability vote), then ``calibrate``."""
        p = np.asarray(segment_probabilities, dtype=np.float64)
        if p.ndim != 2 or len(p) == 0:
            raise ValueError(f"expected segment probabilities [K >= 1, C], got shape {p.shape}")
        return self.calibrate(p.mean(axis=0))

    def torch_module(self):
        """A torch module mapping windows [B, window_samples] to calibrated probabilities
        [B, C], for export; None when the model is not expressible in torch."""
        return None

    def clip_windows(self, path, notes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The windows of ``path`` exactly as the run's evaluation saw them: the clip policy
        (``audio``), this sample rate, then ``segment``. Returns (windows [K, L] float32,
        start_s [K]). Raises AudioError naming the file (shorter than one window included)."""
        from ..audio import decoding as audio
        from ..audio.segments import segment
        from ..errors import AudioError

        y = audio.load(
            path,
            self.sample_rate,
            self.audio,
            min_duration_s=self.segment.segment_s,
            notes=[] if notes is None else notes,
        )
        frames, starts, _ = segment(y, self.sample_rate, self.segment)
        if len(frames) == 0:
            raise AudioError(path, f"shorter than one {self.segment.segment_s:g} s window")
        return frames, starts

    def predict_file(self, path) -> tuple[np.ndarray, np.ndarray]:
        """(window probabilities [K, C], track probabilities [C]) of ``path`` decoded the way the
        run was evaluated (``clip_windows``)."""
        p = self.predict_segments(self.clip_windows(path)[0])
        return p, self.track_probabilities(p)

    def _check_windows(self, segments: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(segments, dtype=np.float32)
        if x.ndim != 2 or (len(x) and x.shape[1] != self.window_samples):
            raise ValueError(
                f"expected windows [K, {self.window_samples}] at {self.sample_rate} Hz, got shape {x.shape}"
            )
        return x
