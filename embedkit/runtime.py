"""Run an exported embedkit model with onnxruntime alone: no torch, no scikit-learn.

``read_metadata(path)`` returns the contract written into the file by ``embedkit export``
(labels, sample rate, window and hop, clip policy, preprocessing hash, calibration, thresholds,
versions, source run); ``OnnxTagger.load(path)`` is a :class:`~embedkit.tagger.Tagger` like any
other, so batch tagging, streaming and the HTTP service run on it unchanged.

    >>> from embedkit.runtime import OnnxTagger, read_metadata     # doctest: +SKIP
    >>> read_metadata("model.onnx")["labels"]                      # doctest: +SKIP
    >>> t = OnnxTagger.load("model.onnx")                          # doctest: +SKIP
    >>> t.track_probabilities(t.predict_segments(windows))         # doctest: +SKIP

This module imports numpy, onnxruntime (inside functions) and embedkit's torch-free modules
(tagger, config, errors); tests/test_export.py proves it runs with ``import torch`` blocked.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import AudioConfig, SegmentConfig, from_dict
from .errors import EmbedkitError, ModelLoadingError
from .tagger import Tagger

FORMAT = "embedkit-onnx/1"
INPUT_NAME = "waveform"
#: calibrated probabilities per window, and the head's own (uncalibrated) probabilities
OUTPUT_NAMES = ("probabilities", "uncalibrated")
#: probabilities are floored here before the log of temperature scaling (float32-safe)
LOG_FLOOR = 1e-30
RUNTIME_INSTALL = "pip install onnxruntime"
#: windows per onnxruntime call (bounds the activation memory of long files)
MAX_BATCH = 16


def calibration_params(calibration, error=EmbedkitError) -> dict[str, Any] | None:
    """A Tagger's calibration object -> {"method": "temperature", "temperature": T} or None.

    Accepts None, an object with a ``temperature`` attribute, or one whose ``to_dict()`` holds
    a temperature; anything else raises ``error`` (only temperature scaling is a graph op here).
    """
    if calibration is None:
        return None
    t = getattr(calibration, "temperature", None)
    d: dict[str, Any] = {}
    if t is None and hasattr(calibration, "to_dict"):
        d = dict(calibration.to_dict() or {})
        t = d.get("temperature")
    if t is None:
        raise error(f"calibration {type(calibration).__name__} has no temperature: only temperature scaling can be exported")
    t = float(t)
    if not np.isfinite(t) or t <= 0:
        raise error(f"calibration temperature must be a positive number, got {t}")
    out = {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}
    out.update({"method": "temperature", "temperature": t})
    return out


@dataclass
class TemperatureCalibration:
    """p -> softmax(log(max(p, LOG_FLOOR)) / T): the calibration the exported graph applies,
    in numpy (Tagger.calibrate uses it on track means)."""

    temperature: float

    def apply(self, p: np.ndarray) -> np.ndarray:
        z = np.log(np.maximum(np.asarray(p, dtype=np.float64), LOG_FLOOR)) / self.temperature
        z -= z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)

    def to_dict(self) -> dict[str, Any]:
        return {"method": "temperature", "temperature": self.temperature}


def _ort():
    from .errors import require

    return require("onnxruntime", RUNTIME_INSTALL, "running exported models")


def _parse(props: dict[str, str], path) -> dict[str, Any]:
    if "format" not in props:
        raise ModelLoadingError(f"{path}: an ONNX model without embedkit metadata (not exported by `embedkit export`)")
    try:
        meta = {k: json.loads(v) for k, v in props.items()}
    except json.JSONDecodeError as exc:
        raise ModelLoadingError(f"{path}: unreadable embedkit metadata ({exc})") from None
    if meta["format"] != FORMAT:
        raise ModelLoadingError(f"{path}: metadata format {meta['format']!r}; this embedkit reads {FORMAT!r}")
    return meta


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The embedkit contract stored in an exported model's ``metadata_props`` (JSON values
    decoded): labels, sample_rate, window_samples, segment_s, hop_s, audio (clip policy),
    preprocessing (+ _hash), calibration, thresholds, embedkit_version, versions, run_id,
    source_model_id (the run's model id), kind, spec, input, outputs, opset. Reads the file with the ``onnx`` package when
    installed (no session is built), else with onnxruntime."""
    p = Path(path)
    if not p.is_file():
        raise ModelLoadingError(f"{p}: no such model file")
    try:
        import onnx
    except ImportError:
        return _parse(dict(_session(p).get_modelmeta().custom_metadata_map), p)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:
        raise ModelLoadingError(f"{p}: not an ONNX model ({type(exc).__name__})") from None
    return _parse({e.key: e.value for e in model.metadata_props}, p)


def _session(path: Path, threads: int | None = None):
    ort = _ort()
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # no spin-waiting between ops: on a busy machine (2 cores shared with decoding threads or
    # other jobs) spinning threads steal the cores the work needs (as OMP_WAIT_POLICY for torch)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ModelLoadingError(f"{path}: onnxruntime cannot load it ({first})") from None


@dataclass
class OnnxTagger(Tagger):
    """A Tagger backed by an exported ONNX model run with onnxruntime (no torch).

    ``predict_segments`` returns the graph's uncalibrated probabilities; ``calibrate`` applies
    the file's temperature (the graph's own ``probabilities`` output is the calibrated value per
    window). Build with :meth:`load`."""

    session: Any = None
    path: Path | None = None

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int | None = None) -> "OnnxTagger":
        p = Path(path)
        meta = read_metadata(p)
        sess = _session(p, threads)
        cal = meta.get("calibration")
        from .identity import fingerprint

        return cls(
            kind=meta["kind"],
            labels=[str(x) for x in meta["labels"]],
            sample_rate=int(meta["sample_rate"]),
            segment=SegmentConfig(float(meta["segment_s"]), float(meta["hop_s"])),
            audio=from_dict(AudioConfig, meta.get("audio") or {}),
            model_id=fingerprint(p),  # this file's identity (the source run's is source_model_id)
            run_dir=None,
            spec=meta.get("spec") or {},
            calibration=None if not cal else TemperatureCalibration(float(cal["temperature"])),
            meta={**meta, "runtime": "onnxruntime", "model_path": str(p)},
            session=sess,
            path=p,
        )

    def run(self, segments: np.ndarray) -> dict[str, np.ndarray]:
        """Windows [K, window_samples] -> {"probabilities" (calibrated), "uncalibrated"}
        float64 [K, C], in batches of MAX_BATCH windows."""
        x = self._check_windows(segments)
        C = len(self.labels)
        outs: dict[str, list[np.ndarray]] = {n: [] for n in OUTPUT_NAMES}
        for a in range(0, len(x), MAX_BATCH):
            res = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x[a : a + MAX_BATCH]})
            for n, r in zip(OUTPUT_NAMES, res):
                outs[n].append(np.asarray(r, dtype=np.float64))
        return {n: (np.concatenate(v) if v else np.zeros((0, C))) for n, v in outs.items()}

    def predict_segments(self, segments: np.ndarray) -> np.ndarray:
        return self.run(segments)["uncalibrated"]
