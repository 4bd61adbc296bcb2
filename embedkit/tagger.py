"""One inference interface for every finished run: ``Tagger``.

Tagging a library, streaming, ONNX export and the HTTP service are thin layers over this class,
so a model behaves the same wherever it runs. A Tagger takes fixed-length mono windows at its
own sample rate (cut by ``embedkit.segments``, the one windowing function) and returns class
probabilities; decoding files and choosing which part of a song to listen to belong to the
callers (``embedkit.tag``), not to the model.

    >>> tagger = load_tagger("runs/<run-id>")                         # doctest: +SKIP
    >>> frames, starts, _ = segment(y, tagger.sample_rate, tagger.segment)  # doctest: +SKIP
    >>> p = tagger.predict_segments(frames)                            # doctest: +SKIP  [K, C]
    >>> tagger.labels[tagger.track_probabilities(p).argmax()]          # doctest: +SKIP
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import AudioConfig, SegmentConfig


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

    @property
    def window_samples(self) -> int:
        """Samples in one window: round(segment_s * sample_rate), as embedkit.segments cuts them."""
        return int(round(self.segment.segment_s * self.sample_rate))

    def calibrate(self, probabilities: np.ndarray) -> np.ndarray:
        """Probabilities [..., C] -> calibrated probabilities [..., C] (identity without calibration)."""
        p = np.asarray(probabilities, dtype=np.float64)
        return p if self.calibration is None else np.asarray(self.calibration.apply(p), dtype=np.float64)

    @abstractmethod
    def predict_segments(self, segments: np.ndarray) -> np.ndarray:
        """Windows float32 [K, window_samples] (mono, at ``sample_rate``) -> uncalibrated
        probabilities float64 [K, len(labels)], rows summing to 1. K may be 0."""

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
