"""One inference interface for every finished run: ``Tagger``.

Tagging a library, streaming, ONNX export and the HTTP service are thin layers over this class,
so a model behaves the same wherever it runs. A Tagger takes fixed-length mono windows at its
own sample rate (cut by ``embedkit.audio.segments``, the one windowing function) and returns class
probabilities; decoding files and choosing which part of a song to listen to belong to the
callers (``embedkit.deploy.batch``), not to the model.

    >>> tagger = load_tagger("runs/<run-id>")                         # doctest: +SKIP
    >>> frames, starts, _ = segment(y, tagger.sample_rate, tagger.segment)  # doctest: +SKIP
    >>> p = tagger.predict_segments(frames)                            # doctest: +SKIP  [K, C]
    >>> tagger.labels[tagger.track_probabilities(p).argmax()]          # doctest: +SKIP

Three kinds, one contract:

- ``HeadTagger`` ("head"): the run's backbone (``.backbone``) embeds each window, the fitted
  head bundle (``.bundle``) turns embeddings into probabilities; exactly the extraction path
  (same decode, same windows, same backbone, same weights: refused otherwise). A fused run's
  backbone is ``embedkit.backbones.fused.FusedBackbone``: windows at the highest part rate, each
  slower part's window resampled to its rate (a soxr-matched sinc filter; see that module for
  what per-window resampling costs against extraction's whole-clip resampling).
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
  The rule lives with the model (``embedkit.cnn.model.CNNModel.predict_windows``, which training's
  inference timing uses too); ``CNNTagger`` wraps it.
- ``FinetuneTagger`` ("finetune"): the fine-tuned network (``.net``, waveform -> logits), a
  wrapper of ``embedkit.cnn.finetuned.FinetunedModel.predict_windows``.

Which kind an artefact is: the run-kind registry (``register_run_kind``), which ``load_tagger``
dispatches through.

``model_id`` is the SHA-256 (32 hex digits, ``embedkit.identity.hash_file(path, "sha256")``: a
model id is stored in results databases, so it keeps the scheme it always had) of the run's model
artefact (``head.skops`` or ``model.pt``); ``model_id_of(path)`` computes it without loading
anything, so a tagging re-run with nothing to do never builds the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import SegmentConfig
from ..errors import ConfigMismatchError, ModelLoadingError
from .base import Tagger


@dataclass
class HeadTagger(Tagger):
    """Backbone embeddings + a fitted head. ``backbone``: the run's Backbone; ``bundle``: the
    HeadBundle (loaded on first access when the tagger started from the numpy form of
    ``embedkit.deploy.headcache``); ``predictor``: what ``predict_segments`` uses (that form or the
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
            from ..heads import load_bundle

            self._bundle = load_bundle(self.artefact)
        return self._bundle

    def predict_segments(self, segments: np.ndarray) -> np.ndarray:
        return self.embed_segments(segments)[0]

    def embed_segments(self, segments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The head's input (the backbone output it was fitted on) is the embedding."""
        x = self._check_windows(segments)
        if len(x) == 0:
            return np.zeros((0, len(self.labels))), np.zeros((0, int(self.spec.get("embedding_dim") or 0)))
        out = self.predictor.output
        X = self.backbone.embed(x) if out == "embedding" else self.backbone.outputs(x)[out]
        return self.predictor.predict_proba(X), np.asarray(X, dtype=np.float32)

    @property
    def vector_space(self) -> str:
        """Track vectors of a head run: the backbone output the head was fitted on."""
        return f"backbone:{self.spec.get('name')}:{self.predictor.output}"


@dataclass
class CNNTagger(Tagger):
    """Scratch CNN: a thin wrapper of ``embedkit.cnn.model.CNNModel`` (``model``), which holds the
    inference rule: per-window log-mel (``features``) -> ``normalizer`` -> ``net`` -> softmax."""

    net: Any = None
    features: Any = None  # embedkit.cnn.features.FeatureConfig
    normalizer: Any = None  # embedkit.cnn.features.Normalizer

    @property
    def model(self):
        """The ``embedkit.cnn.model.CNNModel`` of these fields (a view, built on each access)."""
        from ..cnn.model import CNNModel

        return CNNModel(
            net=self.net,
            labels=self.labels,
            features=self.features,
            audio=self.audio,
            normalizer=self.normalizer,
            segment_s=self.segment.segment_s,
            meta=self.meta,
        )

    @property
    def inside_frames(self) -> tuple[int, int]:
        """[first, end) of the centred-STFT frames of a window whose STFT window lies inside it."""
        return _inside_frames(self.window_samples, self.features)

    def logmel(self, segments: np.ndarray) -> np.ndarray:
        """Windows [K, L] -> normalised log-mel float32 [K, n_mels, T] (the net's input), T the
        frames inside the window (see the module doc; 427 for 5 s at 44.1 kHz / hop 512)."""
        return self.model.logmel(self._check_windows(segments))

    def predict_segments(self, segments: np.ndarray) -> np.ndarray:
        # the front end in fp32 on the host, whatever the precision; the net on the tagger's device
        return self.model.predict_windows(self._check_windows(segments), self.device, self.precision)

    def embed_segments(self, segments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The embedding: the pooled output of the last convolution block (``net.embed``)."""
        return self.model.embed_windows(self._check_windows(segments), self.device, self.precision)

    def torch_module(self):
        if self.calibration is not None and not getattr(self.calibration, "is_identity", False):
            return None  # calibration applies to the track mean, not to each window
        return self.model.torch_module()

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
    """A fine-tuned backbone + linear layer: a thin wrapper of
    ``embedkit.cnn.finetuned.FinetunedModel`` (``model``); ``net`` maps waveform windows to logits."""

    net: Any = None

    @property
    def model(self):
        """The ``embedkit.cnn.finetuned.FinetunedModel`` of these fields (a view, built on each access)."""
        from ..cnn.finetuned import FinetunedModel

        return FinetunedModel(
            net=self.net,
            labels=self.labels,
            sample_rate=self.sample_rate,
            audio=self.audio,
            segment_s=self.segment.segment_s,
            meta=self.meta,
        )

    def predict_segments(self, segments: np.ndarray) -> np.ndarray:
        return self.model.predict_windows(self._check_windows(segments), self.device, self.precision)

    def embed_segments(self, segments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The embedding: the fine-tuned backbone's output (the linear layer's input)."""
        return self.model.embed_windows(self._check_windows(segments), self.device, self.precision)

    def torch_module(self):
        if self.calibration is not None and not getattr(self.calibration, "is_identity", False):
            return None  # calibration applies to the track mean, not to each window
        return self.model.torch_module()

    @classmethod
    def from_model(cls, model, model_id: str = "", run_dir: Path | None = None) -> "FinetuneTagger":
        """Wrap an ``embedkit.cnn.finetuned.FinetunedModel``."""
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


# The inference rules live with the models (``embedkit.cnn.model``, ``embedkit.cnn.finetuned``);
# these names stay for the callers of this module (``embedkit.deploy.onnx_export``).


def cnn_front_module(t: CNNTagger):
    """torch module: windows [B, L] -> normalised log-mel of the frames inside each window
    [B, M, T], the torch form of ``CNNTagger.logmel`` (``embedkit.cnn.model.CNNModel.front_module``)."""
    return t.model.front_module()


def _inside_frames(n_samples: int, features) -> tuple[int, int]:
    from ..cnn.model import inside_frames

    return inside_frames(n_samples, features)


def _net_probabilities(net, inputs: np.ndarray, n_classes: int, device="cpu", precision: str = "fp32") -> np.ndarray:
    """``embedkit.cnn.model.net_probabilities``: a torch classifier's softmax, float64 [K, C]."""
    from ..cnn.model import net_probabilities

    return net_probabilities(net, inputs, n_classes, device, precision)


def probability_module(front, net):
    """torch module: windows [B, L] -> ``net(front(windows))`` softmaxed to probabilities [B, C]
    (``front`` None: the identity); ``embedkit.cnn.model.probability_module``."""
    from ..cnn.model import probability_module

    return probability_module(front, net)


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
    from ..identity import LEGACY, fingerprint

    return fingerprint(resolve_artefact(path), scheme=LEGACY)  # model ids are SHA-256 (see the module docstring)


# Run kinds: how each kind of artefact becomes a Tagger (as backbones register, ``embedkit.backbones``)


@dataclass(frozen=True)
class RunKind:
    """A kind of finished run ``load_tagger`` can load.

    name: the kind (``Tagger.kind``; for model files, the ``kind`` they record).
    load: ``load(artefact, checkpoint, model_id) -> Tagger``, on the CPU, without calibration.
    suffixes: artefact suffixes (lower case) that are this kind outright; a kind without any is
        chosen by the ``kind`` a ``.pt`` model file records (``embedkit.cnn.model.read_model_file``).
    self_contained: the artefact carries everything and runs without torch (an ONNX export):
        its loader gets model_id None and its Tagger is returned as loaded: no device, precision,
        run directory or calibration applied, and nothing imports torch.
    """

    name: str
    load: Callable[..., Tagger]
    suffixes: tuple[str, ...] = ()
    self_contained: bool = False


_RUN_KINDS: dict[str, RunKind] = {}


def register_run_kind(name: str, *, suffixes: tuple[str, ...] = (), self_contained: bool = False):
    """Decorator: register ``load(artefact, checkpoint, model_id) -> Tagger`` as run kind ``name``
    (see ``RunKind``). Loaders import what they need inside, so registering costs nothing."""

    def register(load: Callable[..., Tagger]) -> Callable[..., Tagger]:
        if name in _RUN_KINDS:
            raise ValueError(f"run kind {name!r} registered twice")
        _RUN_KINDS[name] = RunKind(name, load, tuple(s.lower() for s in suffixes), self_contained)
        return load

    return register


def run_kinds() -> list[RunKind]:
    """The registered run kinds, by name."""
    return [_RUN_KINDS[k] for k in sorted(_RUN_KINDS)]


def _known_kinds() -> str:
    return ", ".join(f"{k.name} ({'/'.join(k.suffixes) or 'model file'})" for k in run_kinds())


def _kind_by_suffix(artefact: Path) -> RunKind | None:
    suffix = artefact.suffix.lower()
    return next((k for k in run_kinds() if suffix in k.suffixes), None)


def run_kind_of(artefact: Path) -> RunKind:
    """The run kind of a model artefact: by its suffix, else by the kind its model file records.
    ModelLoadingError (one line listing the known kinds) for a kind nobody registered."""
    by_suffix = _kind_by_suffix(artefact)
    if by_suffix is not None:
        return by_suffix
    from ..cnn.model import read_model_file

    kind = read_model_file(artefact).get("kind")
    found = _RUN_KINDS.get(kind) if isinstance(kind, str) else None
    if found is None or found.suffixes:
        raise ModelLoadingError(f"{artefact}: unknown model kind {kind!r}; known kinds: {_known_kinds()}")
    return found


def load_tagger(
    path, checkpoint: str | None = None, device: str | None = "cpu", precision: str = "fp32", allow_tf32: bool = False
) -> Tagger:
    """A Tagger for a finished run directory, a head bundle (``.skops``), a CNN / fine-tune
    model file (``.pt``) or a model exported by ``embedkit export`` (``.onnx``: an
    ``embedkit.deploy.onnx_runtime.OnnxTagger``, which imports no torch). The loader comes from
    the run-kind registry (``register_run_kind``): by the artefact's suffix, else by the kind a
    ``.pt`` model file records (``run_kind_of``).

    checkpoint: backbone weights for head runs on backbones whose weights are not packaged
    (PANNs, AST), as ``embedkit extract --checkpoint``. device: "cpu" | "auto" | "cuda[:N]" |
    "mps" (``embedkit.device.resolve``): the backbone / network is loaded on the CPU
    (``map_location="cpu"``) and moved there; numpy heads and calibration stay on the CPU.
    precision: fp32 | fp16 | bf16 autocast inference (opt-in). Raises ModelLoadingError
    (unusable artefact), ConfigMismatchError (the backbone here is not the one the run
    recorded) or DeviceError (the device cannot be used here), one line each.
    """
    artefact = resolve_artefact(path)
    kind = _kind_by_suffix(artefact)
    if kind is not None and kind.self_contained:  # an exported model: onnxruntime on the CPU, no torch (device ignored)
        return kind.load(artefact, checkpoint, None)
    from ..device import check_precision, resolve

    dev = resolve(device, allow_tf32)  # an unusable device fails before the model is loaded
    precision = check_precision(precision, dev)
    model_id = model_id_of(artefact)
    run_dir = artefact.parent if (artefact.parent / "metrics.json").exists() else None
    t = (kind or run_kind_of(artefact)).load(artefact, checkpoint, model_id)
    t.run_dir = run_dir
    if run_dir is not None:  # the run's calibration and default decisions (embedkit.calibration)
        from ..calibration import load_calibration

        t.calibration = load_calibration(run_dir, t.labels)
    t.meta.setdefault("artefact", str(artefact))
    if run_dir is not None:
        t.meta.setdefault("run_id", run_dir.name)
    return t.to(dev, precision)


@register_run_kind("head", suffixes=(".skops",))
def _load_head(artefact: Path, checkpoint: str | None, model_id: str) -> HeadTagger:
    from ..backbones import load_backbone
    from ..config import PreprocessConfig
    from . import headcache

    info = headcache.load(model_id)  # numpy form of this very file: no sklearn / skops import
    bundle = None
    if info is None:
        from ..heads import load_bundle

        bundle = info = load_bundle(artefact)
        fast = headcache.build(bundle)
        if fast is not None and headcache.verified(fast, bundle, fast.arrays["scale_mean"].shape[0]):
            headcache.save(fast, model_id)
    name = info.spec.get("name")
    if not name:
        raise ModelLoadingError(f"{artefact}: the bundle records no backbone name")
    prep = PreprocessConfig.from_dict(info.preprocess or {})
    if info.spec.get("family") == "fused":  # every part, windows resampled per part (backbones.fused)
        from ..backbones.fused import load_fused

        bb = load_fused(name, prep.segments.segment_s, checkpoint)
    else:
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


@register_run_kind("cnn")
def _load_cnn(artefact: Path, checkpoint: str | None, model_id: str) -> CNNTagger:
    from ..cnn.model import load_model

    t = CNNTagger.from_model(load_model(artefact), model_id)
    _check_cnn_contract(t, artefact)
    return t


@register_run_kind("finetune")
def _load_finetune(artefact: Path, checkpoint: str | None, model_id: str) -> FinetuneTagger:
    from ..cnn.finetuned import load_finetuned  # the model file alone: not the training task

    t = FinetuneTagger.from_model(load_finetuned(artefact), model_id)
    _check_cnn_contract(t, artefact)
    return t


@register_run_kind("onnx", suffixes=(".onnx",), self_contained=True)
def _load_onnx(artefact: Path, checkpoint: str | None, model_id: None) -> Tagger:
    from .onnx_runtime import OnnxTagger  # onnxruntime, never torch

    return OnnxTagger.load(artefact)


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
