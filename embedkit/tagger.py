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

Three kinds, one contract:

- ``HeadTagger`` ("head"): the run's backbone (``.backbone``) embeds each window, the fitted
  head bundle (``.bundle``) turns embeddings into probabilities; exactly the extraction path
  (same decode, same windows, same backbone, same weights: refused otherwise).
- ``CNNTagger`` ("cnn"): the scratch CNN (``.net``) on the normalised (``.normalizer``) log-mel
  (``.features``) of each window. Rule: a window's log-mel is computed from that window's
  samples alone, keeping only the frames whose STFT window lies entirely inside it (frames
  ceil(n_fft / 2 / hop) .. floor((L - n_fft / 2) / hop) of a centred STFT: 427 of 431 for 5 s
  at 44.1 kHz, n_fft 2048, hop 512). Training evaluated crops of the whole clip's log-mel, whose
  every frame saw real audio; a centred STFT of the window alone would add 2 zero-padded frames
  at each edge, which no training crop contains. On gtzan_mini (a small 8-epoch CNN, 20
  held-out tracks) keeping them moved track probabilities by up to 0.095 (mean of per-track
  max 0.072) and halved held-out accuracy (0.50 -> 0.25); dropping them: up to 0.017 (mean
  0.012), the same top genre on 18 of 20 tracks, accuracy 0.45. The frames left differ from the crop's by under half a hop of
  alignment. Per-window is what a stream or a song excerpt can compute, so it is the inference
  rule; tests/test_tagger.py bounds the difference against the run's held-out predictions.
- ``FinetuneTagger`` ("finetune"): the fine-tuned network (``.net``, waveform -> logits).

``model_id`` is the SHA-256 (32 hex digits, ``embedkit.identity.hash_file(path, "sha256")``: a
model id is stored in results databases, so it keeps the scheme it always had) of the run's model
artefact (``head.skops`` or ``model.pt``); ``model_id_of(path)`` computes it without loading
anything, so a tagging re-run with nothing to do never builds the model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import AudioConfig, SegmentConfig
from .errors import ConfigMismatchError, ModelLoadingError


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
    #: cached as numpy (``embedkit.headcache``) and calibration always run on the CPU.
    device: Any = "cpu"
    precision: str = "fp32"
    #: False for taggers that run without torch (``embedkit.runtime.OnnxTagger``: onnxruntime
    #: on the CPU): ``to`` leaves them where they are and nothing imports torch for them.
    torch_backed = True  # a plain class attribute (no annotation): not a dataclass field

    def to(self, device, precision: str | None = None) -> "Tagger":
        """Run the network on ``device`` (name or torch.device, see ``embedkit.device``) at
        ``precision`` (fp32 | fp16 | bf16, None: unchanged); returns self."""
        if not self.torch_backed:
            return self
        import torch

        from .device import check_precision

        dev = torch.device(device)
        if precision is not None:
            self.precision = check_precision(precision, dev)
        self.device = dev
        self._move(dev)
        return self

    def single_threaded(self):
        """Context in which this tagger's forwards run on the calling thread only (the CPU
        lanes of ``embedkit.lanes``: one lane per core, no intra-op team)."""
        from .lanes import torch_single_threaded

        return torch_single_threaded()

    def _move(self, dev) -> None:
        net = getattr(self, "net", None)
        if net is not None:
            net.to(dev)

    def _autocast(self):
        from .device import autocast

        return autocast(self.device, self.precision)

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

    def clip_windows(self, path, notes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The windows of ``path`` exactly as the run's evaluation saw them: the clip policy
        (``audio``), this sample rate, then ``segment``. Returns (windows [K, L] float32,
        start_s [K]). Raises AudioError naming the file (shorter than one window included)."""
        from . import audio
        from .errors import AudioError
        from .segments import segment

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


def _softmax_rows(logits) -> np.ndarray:
    import torch

    # float64 on the host (MPS has no float64; fp16/bf16 logits are widened first)
    return torch.softmax(logits.detach().float().cpu().double(), dim=1).numpy()


@dataclass
class HeadTagger(Tagger):
    """Backbone embeddings + a fitted head. ``backbone``: the run's Backbone; ``bundle``: the
    HeadBundle (loaded on first access when the tagger started from the numpy form of
    ``embedkit.headcache``); ``predictor``: what ``predict_segments`` uses (that form or the
    bundle). ``meta["output"]`` names the backbone output the head was fitted on."""

    backbone: Any = None  # embedkit.backbones.base.Backbone
    predictor: Any = None  # HeadBundle or headcache.FastHead: predict_proba [N, D] -> [N, C]
    artefact: Path | None = None
    _bundle: Any = field(default=None, repr=False)

    def to(self, device, precision: str | None = None) -> "HeadTagger":
        """The backbone moves to ``device``; the head stays on the CPU (numpy / scikit-learn)."""
        import torch

        super().to(device, precision)
        self.backbone.to(self.device, self.precision)
        # a backbone without torch (melstats) stays on the CPU in fp32: say where it really runs
        self.device, self.precision = torch.device(self.backbone.device), self.backbone.precision
        return self

    def _move(self, dev) -> None:
        pass  # the backbone moves in ``to`` (with its precision)

    @property
    def bundle(self):
        """The run's ``embedkit.heads.HeadBundle``."""
        if self._bundle is None:
            from .heads import load_bundle

            self._bundle = load_bundle(self.artefact)
        return self._bundle

    def predict_segments(self, segments: np.ndarray) -> np.ndarray:
        x = self._check_windows(segments)
        if len(x) == 0:
            return np.zeros((0, len(self.labels)))
        out = self.predictor.output
        X = self.backbone.embed(x) if out == "embedding" else self.backbone.outputs(x)[out]
        return self.predictor.predict_proba(X)


@dataclass
class CNNTagger(Tagger):
    """Scratch CNN: per-window log-mel (``features``) -> ``normalizer`` -> ``net`` -> softmax."""

    net: Any = None
    features: Any = None  # embedkit.cnn.features.FeatureConfig
    normalizer: Any = None  # embedkit.cnn.features.Normalizer

    @property
    def inside_frames(self) -> tuple[int, int]:
        """[first, end) of the centred-STFT frames of a window whose STFT window lies inside it."""
        return _inside_frames(self.window_samples, self.features)

    def logmel(self, segments: np.ndarray) -> np.ndarray:
        """Windows [K, L] -> normalised log-mel float32 [K, n_mels, T] (the net's input), T the
        frames inside the window (see the module doc; 427 for 5 s at 44.1 kHz / hop 512)."""
        import torch

        from .cnn.features import logmel

        x = self._check_windows(segments)
        a, b = self.inside_frames
        with torch.inference_mode():
            return self.normalizer(torch.from_numpy(np.ascontiguousarray(logmel(x, self.features)[..., a:b]))).numpy()

    def predict_segments(self, segments: np.ndarray) -> np.ndarray:
        x = self._check_windows(segments)
        # the front end in fp32 on the host, whatever the precision; the net on the tagger's device
        return _net_probabilities(
            self.net, self.logmel(x) if len(x) else x, len(self.labels), self.device, self.precision
        )

    def torch_module(self):
        if self.calibration is not None and not getattr(self.calibration, "is_identity", False):
            return None  # calibration applies to the track mean, not to each window
        return probability_module(cnn_front_module(self), self.net)

    @classmethod
    def from_model(cls, model, model_id: str = "", run_dir: Path | None = None) -> "CNNTagger":
        """Wrap an ``embedkit.cnn.model.CNNModel``."""
        from dataclasses import asdict

        seg = SegmentConfig(model.segment_s, model.segment_s)  # training evaluated non-overlapping windows
        return cls(
            kind="cnn",
            labels=list(model.labels),
            sample_rate=int(model.features.sample_rate),
            segment=seg,
            audio=model.audio,
            model_id=model_id,
            run_dir=run_dir,
            spec={"features": asdict(model.features), "normalizer": model.normalizer.mode},
            meta=dict(model.meta),
            net=model.net,
            features=model.features,
            normalizer=model.normalizer,
        )


@dataclass
class FinetuneTagger(Tagger):
    """A fine-tuned backbone + linear layer: ``net`` maps waveform windows to logits."""

    net: Any = None

    def predict_segments(self, segments: np.ndarray) -> np.ndarray:
        return _net_probabilities(
            self.net, self._check_windows(segments), len(self.labels), self.device, self.precision
        )

    def torch_module(self):
        if self.calibration is not None and not getattr(self.calibration, "is_identity", False):
            return None  # calibration applies to the track mean, not to each window
        return probability_module(None, self.net)

    @classmethod
    def from_model(cls, model, model_id: str = "", run_dir: Path | None = None) -> "FinetuneTagger":
        """Wrap an ``embedkit.cnn.finetune.FinetunedModel``."""
        seg = SegmentConfig(model.segment_s, model.segment_s)
        return cls(
            kind="finetune",
            labels=list(model.labels),
            sample_rate=int(model.sample_rate),
            segment=seg,
            audio=model.audio,
            model_id=model_id,
            run_dir=run_dir,
            spec=dict(model.meta.get("spec") or {}),
            meta=dict(model.meta),
            net=model.net,
        )


def cnn_front_module(t: CNNTagger):
    """torch module: windows [B, L] -> normalised log-mel of the frames inside each window
    [B, M, T], the torch form of ``CNNTagger.logmel`` (used by ``torch_module`` and the export)."""
    from torch import nn

    from .cnn.features import logmel_module

    class Front(nn.Module):
        def __init__(self):
            super().__init__()
            self.logmel = logmel_module(t.features)
            self.normalize = t.normalizer.module()

        def forward(self, y):
            a, b = _inside_frames(y.shape[-1], t.features)
            return self.normalize(self.logmel(y)[..., a:b])

    return Front()


def _inside_frames(n_samples: int, features) -> tuple[int, int]:
    half, hop = features.n_fft // 2, features.hop_length
    return -(-half // hop), (n_samples - half) // hop + 1


def _net_probabilities(net, inputs: np.ndarray, n_classes: int, device="cpu", precision: str = "fp32") -> np.ndarray:
    """A torch classifier's softmax over a batch of numpy inputs, float64 [K, C] (K may be 0).
    The inputs go to ``device`` (the net's; pinned, non-blocking on CUDA), the net runs under
    ``precision``'s autocast, the probabilities come back to the host."""
    if len(inputs) == 0:
        return np.zeros((0, n_classes))
    import torch

    from .device import autocast

    dev = torch.device(device)
    x = torch.from_numpy(np.ascontiguousarray(inputs))
    if dev.type != "cpu":
        x = (x.pin_memory() if dev.type == "cuda" else x).to(dev, non_blocking=True)
    net.eval()
    with torch.inference_mode(), autocast(dev, precision):
        return _softmax_rows(net(x))


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


# ---------------------------------------------------------------------------------------------
# Loading


HEAD_FILE = "head.skops"
MODEL_FILE = "model.pt"


def resolve_artefact(path) -> Path:
    """The model artefact behind ``path``: a run directory (finished: metrics.json names the
    artefact), a ``head.skops`` bundle or a ``.pt`` model file. Reads no model."""
    import json

    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise ModelLoadingError(f"{p}: no such run directory or model file")
    metrics = p / "metrics.json"
    if metrics.is_file():
        try:
            m = json.loads(metrics.read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadingError(f"{metrics}: unreadable ({type(exc).__name__})") from None
        name = m.get("bundle") or m.get("model_file") or (HEAD_FILE if m.get("kind") == "head" else MODEL_FILE)
        if not (p / name).is_file():
            raise ModelLoadingError(f"{p}: metrics.json names {name}, which is missing")
        return p / name
    if (p / "run.json").exists():
        raise ModelLoadingError(f"{p}: the run has not finished (no metrics.json); resume it before tagging with it")
    for name in (HEAD_FILE, MODEL_FILE):
        if (p / name).is_file():
            return p / name
    raise ModelLoadingError(f"{p}: not a run directory (no metrics.json, {HEAD_FILE} or {MODEL_FILE})")


def model_id_of(path) -> str:
    """``Tagger.model_id`` of the run / model file at ``path``, without loading the model."""
    from .identity import LEGACY, fingerprint

    return fingerprint(resolve_artefact(path), scheme=LEGACY)  # model ids are SHA-256 (see the module docstring)


def load_tagger(
    path, checkpoint: str | None = None, device: str | None = "cpu", precision: str = "fp32", allow_tf32: bool = False
) -> Tagger:
    """A Tagger for a finished run directory, a head bundle (``.skops``), a CNN / fine-tune
    model file (``.pt``) or a model exported by ``embedkit export`` (``.onnx``: an
    ``embedkit.runtime.OnnxTagger``, which imports no torch).

    checkpoint: backbone weights for head runs on backbones whose weights are not packaged
    (PANNs, AST), as ``embedkit extract --checkpoint``. device: "cpu" | "auto" | "cuda[:N]" |
    "mps" (``embedkit.device.resolve``): the backbone / network is loaded on the CPU
    (``map_location="cpu"``) and moved there; numpy heads and calibration stay on the CPU.
    precision: fp32 | fp16 | bf16 autocast inference (opt-in). Raises ModelLoadingError
    (unusable artefact), ConfigMismatchError (the backbone here is not the one the run
    recorded) or DeviceError (the device cannot be used here), one line each.
    """
    artefact = resolve_artefact(path)
    if artefact.suffix.lower() == ".onnx":  # an exported model: onnxruntime on the CPU, no torch (device ignored)
        from .runtime import OnnxTagger

        return OnnxTagger.load(artefact)
    from .device import check_precision, resolve

    dev = resolve(device, allow_tf32)  # an unusable device fails before the model is loaded
    precision = check_precision(precision, dev)
    model_id = model_id_of(artefact)
    run_dir = artefact.parent if (artefact.parent / "metrics.json").exists() else None
    if artefact.suffix == ".skops":
        t = _load_head(artefact, checkpoint, model_id)
    else:
        from .cnn.model import read_model_file

        kind = read_model_file(artefact).get("kind")
        if kind == "cnn":
            from .cnn.model import load_model

            t = CNNTagger.from_model(load_model(artefact), model_id)
        elif kind == "finetune":
            from .cnn.finetune import load_finetuned

            t = FinetuneTagger.from_model(load_finetuned(artefact), model_id)
        else:
            raise ModelLoadingError(f"{artefact}: unknown model kind {kind!r}")
        _check_cnn_contract(t, artefact)
    t.run_dir = run_dir
    if run_dir is not None:  # the run's calibration and default decisions (embedkit.calibration)
        from .calibration import load_calibration

        t.calibration = load_calibration(run_dir, t.labels)
    t.meta.setdefault("artefact", str(artefact))
    if run_dir is not None:
        t.meta.setdefault("run_id", run_dir.name)
    return t.to(dev, precision)


def _load_head(artefact: Path, checkpoint: str | None, model_id: str) -> HeadTagger:
    from . import headcache
    from .backbones import load_backbone
    from .config import PreprocessConfig

    info = headcache.load(model_id)  # numpy form of this very file: no sklearn / skops import
    bundle = None
    if info is None:
        from .heads import load_bundle

        bundle = info = load_bundle(artefact)
        fast = headcache.build(bundle)
        if fast is not None and headcache.verified(fast, bundle, fast.arrays["scale_mean"].shape[0]):
            headcache.save(fast, model_id)
    name = info.spec.get("name")
    if not name:
        raise ModelLoadingError(f"{artefact}: the bundle records no backbone name")
    bb = load_backbone(name, checkpoint=checkpoint)
    have = bb.spec.to_dict()
    for key in _SPEC_KEYS:
        a, b = _norm(info.spec.get(key)), _norm(have.get(key))
        if a != b:
            raise ConfigMismatchError(
                f"{artefact}: head was trained on {name} with {key}={a!r}; the backbone loaded here has {key}={b!r}"
            )
    if info.weights_id != bb.weights_id:
        raise ConfigMismatchError(
            f"{artefact}: head was trained on {name} weights {info.weights_id}; the weights loaded here are {bb.weights_id} (pass the same --checkpoint)"
        )
    if info.output != "embedding" and info.output not in bb.spec.outputs:
        raise ConfigMismatchError(
            f"{artefact}: head was trained on the {info.output!r} output, which {name} does not produce"
        )
    prep = PreprocessConfig.from_dict(info.preprocess or {})
    return HeadTagger(
        kind="head",
        labels=list(info.labels),
        sample_rate=int(bb.spec.sample_rate),
        segment=prep.segments,
        audio=prep.audio,
        model_id=model_id,
        spec=dict(info.spec),
        meta={"head": info.head, "weights_id": info.weights_id, "run_id": info.run_id, "output": info.output},
        backbone=bb,
        predictor=info,
        artefact=artefact,
        _bundle=bundle,
    )


#: backbone spec fields a head's embeddings depend on (as heads.load_bundle checks them)
_SPEC_KEYS = ("name", "family", "sample_rate", "embedding_dim", "frontend", "weights_sha256", "outputs")


def _norm(v):
    """JSON round trip so tuples / lists and int / float spellings compare equal."""
    import json

    return json.loads(json.dumps(v, sort_keys=True, default=str))


def _check_cnn_contract(t: Tagger, artefact: Path) -> None:
    if t.window_samples < 1:
        raise ModelLoadingError(
            f"{artefact}: recorded window of {t.segment.segment_s:g} s is empty at {t.sample_rate} Hz"
        )
    if isinstance(t, CNNTagger):
        a, b = t.inside_frames
        if b - a < 1:
            raise ModelLoadingError(
                f"{artefact}: a {t.segment.segment_s:g} s window is shorter than one {t.features.n_fft}-sample STFT frame"
            )
        n = t.features.n_mels
        if t.normalizer.mode == "standard" and (
            t.normalizer.mean is None or len(t.normalizer.mean) != n or len(t.normalizer.std or []) != n
        ):
            raise ModelLoadingError(f"{artefact}: normalisation statistics do not have {n} mel bands")
