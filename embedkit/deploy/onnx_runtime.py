"""Run an exported embedkit model with onnxruntime alone: no torch, no scikit-learn.

``read_metadata(path)`` returns the contract written into the file by ``embedkit export``
(labels, sample rate, window and hop, clip policy, preprocessing hash, calibration, thresholds,
versions, source run); ``OnnxTagger.load(path)`` is a :class:`~embedkit.deploy.tagger.Tagger` like any
other, so batch tagging, streaming and the HTTP service run on it unchanged.

    >>> from embedkit.deploy.onnx_runtime import OnnxTagger, read_metadata     # doctest: +SKIP
    >>> read_metadata("model.onnx")["labels"]                      # doctest: +SKIP
    >>> t = OnnxTagger.load("model.onnx")                          # doctest: +SKIP
    >>> t.track_probabilities(t.predict_segments(windows))         # doctest: +SKIP

This module imports numpy, onnxruntime (inside functions) and embedkit's torch-free modules
(tagger, config, errors); tests/test_export.py proves it runs with ``import torch`` blocked.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..calibration import EPS
from ..config import AudioConfig, SegmentConfig, from_dict
from ..errors import EmbedkitError, ModelLoadingError, first_line
from .base import Tagger

FORMAT = "embedkit-onnx/1"
INPUT_NAME = "waveform"
#: calibrated probabilities per window, and the head's own (uncalibrated) probabilities
OUTPUT_NAMES = ("probabilities", "uncalibrated")
#: the window embeddings [B, D] the not-music detector reads (graphs of runs with a detector)
EMBEDDING_NAME = "embedding"
#: probabilities are floored here before the log of temperature scaling (float32-safe)
LOG_FLOOR = EPS  # the same floor as embedkit.calibration
RUNTIME_INSTALL = "pip install onnxruntime"
#: windows per onnxruntime call: bounds the activation memory of long files, and smaller calls
#: were faster per window (musicnn + lr, 16 windows sent in calls of 2 / 4 / 16 windows: 10.1 /
#: 10.5 / 11.2 CPU ms a window, 2 threads, load ~7; smaller intermediate maps, as torch chunks its
#: Toeplitz GEMM)
MAX_BATCH = 4


def calibration_params(calibration, error=EmbedkitError) -> dict[str, Any] | None:
    """A Tagger's calibration object -> {"method": "temperature", "temperature": T} or None.

    Accepts None, an ``embedkit.calibration.Calibration`` (method "none" or T = 1: the identity,
    None here), or any object with a ``temperature`` attribute or a ``to_dict()`` holding one;
    anything else raises ``error`` (only temperature scaling is a graph op here).
    """
    if calibration is None:
        return None
    d: dict[str, Any] = {}
    if hasattr(calibration, "to_dict"):
        d = dict(calibration.to_dict() or {})
    if getattr(calibration, "method", d.get("method")) == "none":
        return None
    t = getattr(calibration, "temperature", d.get("temperature"))
    if t is None:
        raise error(
            f"calibration {type(calibration).__name__} has no temperature: only temperature scaling can be exported"
        )
    t = float(t)
    if not np.isfinite(t) or t <= 0:
        raise error(f"calibration temperature must be a positive number, got {t}")
    return None if t == 1.0 else {"method": "temperature", "temperature": t}


def decision_rule(calibration) -> dict[str, Any] | None:
    """The default decision rule of a calibration (``embedkit.calibration.DecisionRule``: the
    threshold below which a track is "uncertain", multi-genre settings) as a dict, or None."""
    from dataclasses import asdict, is_dataclass

    rule = getattr(calibration, "rule", None)
    if rule is None:
        return None
    return asdict(rule) if is_dataclass(rule) else dict(rule)


def calibration_from_metadata(meta: dict[str, Any]):
    """The ``embedkit.calibration.Calibration`` an exported model carries (its temperature and
    default decision rule), or None when the file records neither: the same object a run
    directory's ``calibration.json`` loads into, so both runtimes decide alike."""
    from ..calibration import Calibration, DecisionRule, NotMusicDetector

    cal = meta.get("calibration")
    rule = meta.get("thresholds") if isinstance(meta.get("thresholds"), dict) else None
    detector = NotMusicDetector.from_dict(meta["not_music"]) if meta.get("not_music") else None
    if not (cal or rule):
        return None
    if cal and rule is None:  # exported by an embedkit that did not record the rule
        import warnings

        from ..errors import EmbedkitWarning

        warnings.warn(
            EmbedkitWarning(
                "this model file records a calibration but no decision rule: threshold 0 (every track gets its top"
                " genre) unless --threshold is given; export the run again to carry its rule"
            ),
            stacklevel=2,
        )
    t = float((cal or {}).get("temperature", 1.0))
    return Calibration(
        labels=[str(x) for x in meta["labels"]],
        temperature=t,
        method="temperature" if cal else "none",
        rule=DecisionRule.from_dict(rule),
        detector=detector,
    )


def _ort():
    from ..errors import require

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
    # "all" (onnxruntime's default, stated because it matters): its NCHWc layout pass runs
    # musicnn's timbral convolution + max-pool in the blocked layout (the whole musicnn graph:
    # 1.2x / 1.8x the CPU time per window at "extended", batch 16 / 1)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no spin-waiting between ops: on a busy machine (2 cores shared with decoding threads or
    # other jobs) spinning threads steal the cores the work needs (as OMP_WAIT_POLICY for torch)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelLoadingError(f"{path}: onnxruntime cannot load it ({first_line(exc)})") from None


@dataclass
class OnnxTagger(Tagger):
    """A Tagger backed by an exported ONNX model run with onnxruntime (no torch).

    ``predict_segments`` returns the graph's uncalibrated probabilities; ``calibrate`` applies
    the file's temperature (the graph's own ``probabilities`` output is the calibrated value per
    window). Build with :meth:`load`."""

    session: Any = None
    path: Path | None = None
    threads: int | None = None  # the session's intra-op threads (None: onnxruntime's default, one per core)
    # the one-thread session of single_threaded(), its users and the session it stands in for
    _lanes: dict = field(default_factory=lambda: {"lock": threading.Lock()}, repr=False)
    torch_backed = False  # (not a dataclass field) onnxruntime on the CPU: --device does not move it

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int | None = None) -> "OnnxTagger":
        p = Path(path)
        meta = read_metadata(p)
        sess = _session(p, threads)
        from ..identity import LEGACY, fingerprint

        return cls(
            kind=meta["kind"],
            labels=[str(x) for x in meta["labels"]],
            sample_rate=int(meta["sample_rate"]),
            segment=SegmentConfig(float(meta["segment_s"]), float(meta["hop_s"])),
            audio=from_dict(AudioConfig, meta.get("audio") or {}),
            # this file's identity, SHA-256 like every model id (the source run's is source_model_id)
            model_id=fingerprint(p, scheme=LEGACY),
            run_dir=None,
            spec=meta.get("spec") or {},
            calibration=calibration_from_metadata(meta),
            meta={**meta, "runtime": "onnxruntime", "model_path": str(p)},
            session=sess,
            path=p,
            threads=threads,
        )

    @contextlib.contextmanager
    def single_threaded(self):
        """Runs use a session with one intra-op thread while inside (the CPU lanes of
        ``embedkit.jobs``); built once, on first use. Safe to overlap from several threads."""
        if self.threads == 1 or self.path is None:
            yield
            return
        lanes = self._lanes
        with lanes["lock"]:
            if "session" not in lanes:
                lanes["session"], lanes["users"], lanes["saved"] = _session(self.path, 1), 0, None
            if lanes["users"] == 0:
                lanes["saved"], self.session = self.session, lanes["session"]
            lanes["users"] += 1
        try:
            yield
        finally:
            with lanes["lock"]:
                lanes["users"] -= 1
                if lanes["users"] == 0:
                    self.session = lanes["saved"]

    @property
    def output_names(self) -> list[str]:
        """The graph outputs read: probabilities, uncalibrated (+ embedding when exported)."""
        have = list(self.meta.get("outputs") or OUTPUT_NAMES)
        return list(OUTPUT_NAMES) + ([EMBEDDING_NAME] if EMBEDDING_NAME in have else [])

    def run(self, segments: np.ndarray) -> dict[str, np.ndarray]:
        """Windows [K, window_samples] -> {"probabilities" (calibrated), "uncalibrated"}
        float64 [K, C] (and "embedding" [K, D] float32 when the graph has it), in batches of
        MAX_BATCH windows."""
        x = self._check_windows(segments)
        C = len(self.labels)
        names = self.output_names
        outs: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for a in range(0, len(x), MAX_BATCH):
            res = self.session.run(names, {INPUT_NAME: x[a : a + MAX_BATCH]})
            for n, r in zip(names, res):
                outs[n].append(np.asarray(r, dtype=np.float32 if n == EMBEDDING_NAME else np.float64))
        return {n: (np.concatenate(v) if v else np.zeros((0, C))) for n, v in outs.items()}

    def predict_segments(self, segments: np.ndarray) -> np.ndarray:
        return self.run(segments)["uncalibrated"]

    def embed_segments(self, segments: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The graph's ``embedding`` output (None for files exported without one)."""
        out = self.run(segments)
        e = out.get(EMBEDDING_NAME)
        return out["uncalibrated"], (e if e is not None and len(out["uncalibrated"]) else None)
