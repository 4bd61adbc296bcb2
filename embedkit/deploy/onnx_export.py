"""Export a trained model as one ONNX file that carries its own preprocessing contract.

The graph maps mono waveform windows float32 [B, window_samples] at the model's sample rate to
two outputs, ``probabilities`` (calibrated, per window) and ``uncalibrated`` [B, C], with a
dynamic batch axis: the front end (log-mel or the backbone's own features), the backbone, the
head and the calibration are all inside. A run with a not-music detector (``embedkit.calibration``)
gets a third output, ``embedding`` [B, D] (what the detector reads: the head's input for heads,
LightGBM's included, the pooled last block of the CNN, the fine-tuned backbone's output), and
the detector travels in the metadata (``not_music``). What a consumer must do before the graph (decode,
down-mix, resample to ``sample_rate``, bring the clip to the ``audio`` policy, cut windows of
``segment_s`` every ``hop_s``) is written into the file's ``metadata_props`` and read back by
:func:`embedkit.deploy.onnx_runtime.read_metadata`, so the file is all another program needs.

    >>> info = export_onnx(load_tagger("runs/<id>"), "model.onnx")   # doctest: +SKIP
    >>> from embedkit.deploy.onnx_runtime import OnnxTagger                        # doctest: +SKIP
    >>> OnnxTagger.load("model.onnx").predict_segments(windows)       # doctest: +SKIP

What exports (``tagger_module``): heads on torch backbones (musicnn, PANNs, AST, tiny-test)
with logistic-regression or MLP heads, with or without PCA (the scikit-learn pipeline is
rewritten as torch layers: parity-tested against ``predict_proba``); LightGBM heads (trees
converted by onnxmltools, joined to the torch part); the scratch CNN (log-mel front end +
normaliser + net); fine-tuned backbones. Refused with one line: melstats (librosa features,
not a graph) and calibrations other than temperature scaling.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..config import stable_hash
from ..errors import ExportError, first_line
from .onnx_runtime import (
    EMBEDDING_NAME,
    FORMAT,
    INPUT_NAME,
    LOG_FLOOR,
    OUTPUT_NAMES,
    calibration_params,
    decision_rule,
)

#: ONNX opset of the exported graphs (STFT is an ONNX op from 17 on)
OPSET = 18
EXPORT_INSTALL = "pip install 'embedkit[export]'"


# ---------------------------------------------------------------------------------------------
# scikit-learn head pipelines as torch layers


def _step_modules(model) -> list:
    """The fitted Pipeline of a head bundle -> torch modules, one per step (scaler, PCA, head)."""
    import torch
    from torch import nn

    from ..heads import Float32LogisticRegression, LGBMHead, StackedHead, TorchMLP

    def buf(a) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    class Affine(nn.Module):
        """x -> (x - shift) / scale (StandardScaler.transform on float32 input)."""

        def __init__(self, shift, scale):
            super().__init__()
            self.register_buffer("shift", buf(shift))
            self.register_buffer("scale", buf(scale))

        def forward(self, x):
            return (x - self.shift) / self.scale

    class Project(nn.Module):
        """PCA.transform: (x @ W.T - mean @ W.T) / sqrt(explained variance) when whitening."""

        def __init__(self, pca):
            super().__init__()
            W = np.asarray(pca.components_, dtype=np.float32)
            self.register_buffer("weight", buf(W))
            self.register_buffer("offset", buf(np.asarray(pca.mean_, dtype=np.float32) @ W.T))
            self.register_buffer("scale", buf(np.sqrt(pca.explained_variance_) if pca.whiten else np.ones(len(W))))

        def forward(self, x):
            return (x @ self.weight.t() - self.offset) / self.scale

    class Dense(nn.Module):
        """Linear layers (weights [in, out]) with ReLU between them, then softmax."""

        def __init__(self, coefs, intercepts):
            super().__init__()
            self.weights = nn.ParameterList([nn.Parameter(buf(w), requires_grad=False) for w in coefs])
            self.biases = nn.ParameterList([nn.Parameter(buf(b), requires_grad=False) for b in intercepts])

        def forward(self, x):
            n = len(self.weights)
            for i, (w, b) in enumerate(zip(self.weights, self.biases)):
                x = x @ w + b
                if i < n - 1:
                    x = torch.relu(x)
            return torch.softmax(x, dim=-1)

    mods = []
    for name, step in model.steps:
        if name == "scale":
            mean = step.mean_ if step.with_mean else np.zeros(step.n_features_in_)
            scale = step.scale_ if (step.with_std and step.scale_ is not None) else np.ones(step.n_features_in_)
            mods.append(Affine(mean, scale))
        elif name == "pca":
            mods.append(Project(step))
        elif isinstance(step, Float32LogisticRegression):
            mods.append(Dense([np.asarray(step.coef_).T], [step.intercept_]))
        elif isinstance(step, TorchMLP):
            mods.append(Dense(step.coefs_, step.intercepts_))
        elif isinstance(step, LGBMHead):
            mods.append(None)  # trees: converted separately (see _lgbm_onnx)
        elif isinstance(step, StackedHead):
            mods.append(_stack_module(step))
        else:
            raise ExportError(
                f"cannot export pipeline step {name!r} ({type(step).__name__}): only embedkit's scaler, PCA and lr/mlp/lgbm heads export"
            )
    return mods


def _stack_module(stack):
    """A fitted ``heads.fused.StackedHead`` -> torch module: fused embeddings [B, sum D] ->
    probabilities [B, len(classes_)], as its ``predict_proba``: each part's pipeline on its
    columns, log-probabilities floored at ``heads.fused.LOG_FLOOR``, the meta regression. A part
    head that is a tree ensemble refuses (ExportError)."""
    import torch
    from torch import nn

    from ..heads.fused import LOG_FLOOR as STACK_FLOOR
    from ..heads.fused import part_slices

    parts = []
    for m in stack.parts_:
        mods = _step_modules(m)
        if any(x is None for x in mods):
            raise ExportError("a stacked head over LightGBM part heads cannot be exported (trees are not torch layers)")
        parts.append(nn.Sequential(*mods))
    maps = [torch.from_numpy(_column_map(m.classes_, [str(c) for c in stack.classes_])) for m in stack.parts_]
    meta = _step_modules_of_head(stack.meta_)
    meta_map = torch.from_numpy(_column_map(stack.meta_.classes_, [str(c) for c in stack.classes_]))
    bounds = [(s.start, s.stop) for s in part_slices(stack.dims)]

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.parts, self.meta = nn.ModuleList(parts), meta
            for i, M in enumerate(maps):
                self.register_buffer(f"map{i}", M)
            self.register_buffer("meta_map", meta_map)

        def forward(self, x):
            logs = []
            for i, (part, (a, z)) in enumerate(zip(self.parts, bounds)):
                p = part(x[:, a:z]) @ getattr(self, f"map{i}")
                logs.append(torch.log(torch.clamp(p, min=STACK_FLOOR)))
            return self.meta(torch.cat(logs, dim=1)) @ self.meta_map

    return Stack().eval()


def _step_modules_of_head(head):
    """One fitted lr / mlp head (no pipeline around it) as its torch module."""

    class _One:
        steps = [("head", head)]

    return _step_modules(_One())[0]


def _column_map(classes, labels) -> np.ndarray:
    """[len(classes), len(labels)] 0/1 matrix putting the head's columns in ``labels`` order (a
    label the head never saw gets probability 0, as ``HeadBundle.predict_proba``)."""
    classes = [str(c) for c in classes]
    M = np.zeros((len(classes), len(labels)), dtype=np.float32)
    for j, label in enumerate(labels):
        if label in classes:
            M[classes.index(label), j] = 1.0
    return M


def head_module(bundle):
    """A fitted lr/mlp head bundle -> torch module: embeddings float32 [B, D] -> probabilities
    [B, len(bundle.labels)] (``bundle.predict_proba`` to float32 rounding). LightGBM heads raise
    ExportError here (their trees are not torch layers; ``export_onnx`` converts them)."""
    import torch
    from torch import nn

    mods = _step_modules(bundle.model)
    if any(m is None for m in mods):
        raise ExportError(
            "LightGBM heads are not torch layers; export them with export_onnx (onnxmltools converts the trees)"
        )
    cmap = torch.from_numpy(_column_map(bundle.model.classes_, bundle.labels))

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.steps = nn.Sequential(*mods)
            self.register_buffer("columns", cmap)

        def forward(self, x):
            return self.steps(x) @ self.columns

    return Head().eval()


def _features_module(bundle):
    """Scaler (+ PCA) of a LightGBM pipeline: embeddings [B, D] -> tree inputs [B, D']."""
    from torch import nn

    mods = _step_modules(bundle.model)
    return nn.Sequential(*mods[:-1]).eval()


# ---------------------------------------------------------------------------------------------
# whole models


def _backbone_module(backbone):
    """The backbone's torch module (waveform -> embedding) in a form torch.export can trace."""
    name = getattr(getattr(backbone, "spec", None), "name", type(backbone).__name__)
    family = getattr(getattr(backbone, "spec", None), "family", "")
    if family == "fused":  # one graph: each part's export form behind its resampler (backbones.fused)
        from ..backbones.fused import fused_module

        return fused_module([_backbone_module(p) for p in backbone.parts], copy.deepcopy(backbone._resamplers))
    module = backbone.torch_module()
    if module is None:
        why = "its features are computed by librosa, not a graph" if family == "melstats" else "it has no torch module"
        raise ExportError(f"backbone {name!r} cannot be exported to ONNX: {why}")
    module = copy.deepcopy(module).eval()
    if hasattr(module, "export_module"):  # musicnn: its data-dependent plan choice as torch.cond
        module = module.export_module()
    if family == "ast":  # its NumPy fbank becomes the same computation in torch ops
        from ..backbones.ast import export_module

        module = export_module(module)
    return module


class _Calibrated:
    """Factory of the final wrapper: probabilities -> (calibrated, uncalibrated)."""

    @staticmethod
    def wrap_split(embed, head, calibration: dict | None):
        """(embed, head) -> module waveform -> (calibrated, uncalibrated, embedding)."""
        from torch import nn

        inner = _Calibrated.wrap(head, calibration)

        class WithEmbedding(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed, self.inner = embed, inner

            def forward(self, waveform):
                e = self.embed(waveform)
                q, p = self.inner(e)
                return q, p, e

        return WithEmbedding().eval()

    @staticmethod
    def wrap(model, calibration: dict | None):
        import torch
        from torch import nn

        temperature = None if calibration is None else float(calibration["temperature"])

        class Wrapped(nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, waveform):
                p = self.model(waveform)
                if temperature is None:
                    return p, p
                q = torch.softmax(torch.log(torch.clamp(p, min=LOG_FLOOR)) / temperature, dim=-1)
                return q, p

        return Wrapped().eval()


def embedding_split(tagger):
    """(torch module waveform [B, L] -> the embedding [B, D] the not-music detector reads, module
    embedding -> uncalibrated probabilities [B, C]) of a tagger, or None where the graph has no
    such split (LightGBM heads, heads on other outputs, melstats)."""
    import torch
    from torch import nn

    kind = tagger.kind
    if kind == "head":
        bundle = tagger.bundle
        if getattr(bundle, "output", "embedding") != "embedding" or bundle.head == "lgbm":
            return None
        if any(m is None for m in _step_modules(bundle.model)):
            return None
        return _backbone_module(tagger.backbone), head_module(bundle)
    if kind == "cnn":
        from .tagger import cnn_front_module

        net = copy.deepcopy(tagger.net).eval()

        class Embed(nn.Module):
            def __init__(self):
                super().__init__()
                self.front, self.net = cnn_front_module(tagger), net

            def forward(self, y):
                return self.net.embed(self.front(y))

        class Classify(nn.Module):
            def __init__(self):
                super().__init__()
                self.classifier = net.classifier

            def forward(self, e):
                return torch.softmax(self.classifier(e), dim=1)

        return Embed().eval(), Classify().eval()
    if kind == "finetune":
        net = tagger_module(tagger)[0].net  # the export forms of the backbone

        class Head(nn.Module):
            def __init__(self):
                super().__init__()
                self.head = net.head

            def forward(self, e):
                return torch.softmax(self.head(e), dim=1)

        return net.backbone, Head().eval()
    return None


def tagger_module(tagger):
    """A Tagger -> (torch module waveform [B, L] -> uncalibrated probabilities [B, C] or, for
    LightGBM heads, tree-input features [B, D'], and the LightGBM head or None)."""
    from torch import nn

    kind = tagger.kind
    if kind == "head":
        bundle = tagger.bundle
        if getattr(bundle, "output", "embedding") != "embedding":
            raise ExportError(
                f"a head fitted on the backbone's {bundle.output!r} output cannot be exported (only heads on embeddings)"
            )
        if bundle.head == "lgbm" or any(m is None for m in _step_modules(bundle.model)):
            return nn.Sequential(_backbone_module(tagger.backbone), _features_module(bundle)).eval(), bundle
        return nn.Sequential(_backbone_module(tagger.backbone), head_module(bundle)).eval(), None
    if kind == "cnn":
        from .tagger import cnn_front_module, probability_module

        return probability_module(cnn_front_module(tagger), copy.deepcopy(tagger.net).eval()), None
    if kind == "finetune":
        net = copy.deepcopy(tagger.net).eval()
        if hasattr(getattr(net, "backbone", None), "export_module"):  # musicnn: one static graph
            net.backbone = net.backbone.export_module()
        if hasattr(getattr(net, "backbone", None), "feature_extractor"):  # AST: torch fbank
            from ..backbones.ast import export_module

            net.backbone = export_module(net.backbone)
        from .tagger import probability_module

        return probability_module(None, net), None
    module = tagger.torch_module()
    if module is None:
        raise ExportError(f"a {kind!r} model cannot be exported to ONNX (no torch graph)")
    return module, None


# ---------------------------------------------------------------------------------------------
# LightGBM


def _lgbm_onnx(bundle, n_features: int, calibration: dict | None):
    """ONNX graph: tree inputs 'features' [B, D'] -> probabilities / uncalibrated [B, C], the
    trees converted by onnxmltools (probabilities are LightGBM's to float32 rounding: the tree
    ensemble op sums leaf values in float32)."""
    import onnx
    from onnx import TensorProto, helper

    from ..errors import require

    require("onnxmltools", "pip install 'embedkit[export]'", "exporting LightGBM heads")
    import lightgbm as lgb
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    head = bundle.model.steps[-1][1]
    booster = lgb.Booster(model_str=head.model_str_)
    trees = convert_lightgbm(
        booster, initial_types=[("features", FloatTensorType([None, n_features]))], zipmap=False, target_opset=15
    )  # its newest
    from onnx import compose

    # every name prefixed (input 'lgbm_features'): no clash with the torch part's or ours
    trees = compose.add_prefix(trees, "lgbm_")
    prob = [o.name for o in trees.graph.output][-1]
    cmap = _column_map(head.classes_, bundle.labels)
    nodes = [helper.make_node("MatMul", [prob, "ek_columns"], ["ek_uncal"])]
    inits = [onnx.numpy_helper.from_array(cmap, "ek_columns")]
    if calibration is None:
        nodes += [
            helper.make_node("Identity", ["ek_uncal"], [OUTPUT_NAMES[1]]),
            helper.make_node("Identity", ["ek_uncal"], [OUTPUT_NAMES[0]]),
        ]
    else:
        inits += [
            onnx.numpy_helper.from_array(np.array(LOG_FLOOR, np.float32), "ek_floor"),
            onnx.numpy_helper.from_array(np.array(calibration["temperature"], np.float32), "ek_temperature"),
        ]
        nodes += [
            helper.make_node("Identity", ["ek_uncal"], [OUTPUT_NAMES[1]]),
            helper.make_node("Max", ["ek_uncal", "ek_floor"], ["ek_clamped"]),
            helper.make_node("Log", ["ek_clamped"], ["ek_log"]),
            helper.make_node("Div", ["ek_log", "ek_temperature"], ["ek_scaled"]),
            helper.make_node("Softmax", ["ek_scaled"], [OUTPUT_NAMES[0]], axis=-1),
        ]
    graph = trees.graph
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    del graph.output[:]
    C = len(bundle.labels)
    graph.output.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", C]) for n in OUTPUT_NAMES])
    return trees


# ---------------------------------------------------------------------------------------------
# metadata and the export itself


def preprocessing_contract(tagger) -> dict[str, Any]:
    """What happens to audio before the graph: rate, windows, clip policy, front-end spec."""
    from dataclasses import asdict

    return {
        "sample_rate": int(tagger.sample_rate),
        "window_samples": int(tagger.window_samples),
        "segment": asdict(tagger.segment),
        "audio": asdict(tagger.audio),
        "frontend": (tagger.spec or {}).get("frontend", {}),
    }


def build_metadata(tagger, calibration: dict | None, with_embedding: bool = False) -> dict[str, Any]:
    """The ``metadata_props`` of an exported model (values JSON-encoded in the file).
    with_embedding: the graph has the ``embedding`` output, so the not-music detector travels
    in "not_music" and the rule keeps its not-music threshold (else both are left out)."""
    from dataclasses import asdict

    from ..io import versions

    contract = preprocessing_contract(tagger)
    meta = tagger.meta or {}
    run_id = meta.get("run_id") or (Path(tagger.run_dir).name if tagger.run_dir else None)
    cal = getattr(tagger, "calibration", None)
    detector = getattr(cal, "detector", None) if with_embedding else None
    rule = decision_rule(cal) or meta.get("thresholds")
    if rule is not None and detector is None:
        rule = {**rule, "not_music": None}
    return {
        "format": FORMAT,
        "kind": tagger.kind,
        "labels": list(tagger.labels),
        "sample_rate": int(tagger.sample_rate),
        "window_samples": int(tagger.window_samples),
        "segment_s": float(tagger.segment.segment_s),
        "hop_s": float(tagger.segment.hop_s),
        "audio": asdict(tagger.audio),
        "preprocessing": contract,
        "preprocessing_hash": stable_hash(contract),
        "calibration": calibration,
        "thresholds": rule,
        "not_music": None if detector is None else detector.to_dict(),
        "embedkit_version": __version__,
        "versions": {k: v for k, v in versions().items() if k in ("embedkit", "torch", "numpy", "sklearn", "lightgbm")},
        "run_id": run_id,
        "source_model_id": tagger.model_id,
        "spec": tagger.spec or {},
        "input": INPUT_NAME,
        "outputs": list(OUTPUT_NAMES) + ([EMBEDDING_NAME] if detector is not None else []),
        "opset": OPSET,
    }


# ---------------------------------------------------------------------------------------------
# export forms: the same computation in the ops onnxruntime runs fast

#: the largest FFT size exported as a DFT matrix product (see export_forms), the size it was
#: measured at (musicnn, tiny-test); larger ones keep the ONNX STFT op, as the product's
#: arithmetic grows as n^2 against the FFT's n log n (the scratch CNN's 2048 points: ~20x)
DFT_MAX_N_FFT = 512


def _dft_mel(mel):
    """``audio.melspec.MelSpectrogram`` (power 2, hop dividing n_fft) -> a torch module with
    the same output [B, n_mels, T] computed by matrix products: frames cut by reshapes (no
    index Gather), the windowed real DFT split once into even / odd samples (radix 2: two
    [n/2 x (n/2 + 2)] products instead of one [n x n]; the twiddles folded into the odd basis),
    and |X|^2 folded into the mel filterbank: bins f and n/2 - f of the power spectrum are
    |E + W^f O|^2 and |E - W^f O|^2 for f <= n/4, so no flip is needed."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    n, hop = int(mel.n_fft), int(mel.hop_length)
    h = n // 2
    w = mel.window.detach().double().cpu().numpy()
    m = np.arange(h)[:, None]
    f = np.arange(h // 2 + 1)[None, :]
    ang = 2 * np.pi * m * f / h
    tw = 2 * np.pi * f / n  # the twiddle W^f = exp(-2 pi i f / n)
    basis_even = np.concatenate([np.cos(ang), -np.sin(ang)], 1) * w[0::2, None]
    basis_odd = np.concatenate([np.cos(ang + tw), -np.sin(ang + tw)], 1) * w[1::2, None]
    fb = mel.mel_fb.detach().double().cpu().numpy().T  # [n/2 + 1, n_mels]
    plus = fb[: h // 2 + 1]  # bins 0 .. n/4
    minus = fb[::-1][: h // 2 + 1].copy()  # bins n/2 .. n/4
    minus[-1] = 0.0  # bin n/4 is in both halves: counted once

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    class DftMel(nn.Module):
        def __init__(self):
            super().__init__()
            self.center, self.pad_mode = bool(mel.center), mel.pad_mode
            for name, a in (("even", basis_even), ("odd", basis_odd)):
                self.register_buffer(name, t(a))
            self.register_buffer("plus", t(np.concatenate([plus, plus])))  # real and imaginary rows
            self.register_buffer("minus", t(np.concatenate([minus, minus])))

        def forward(self, y):
            B = y.shape[0]
            if self.center:
                y = F.pad(y.unsqueeze(1), (n // 2, n // 2), mode=self.pad_mode).squeeze(1)
            T = 1 + (y.shape[1] - n) // hop
            r = n // hop
            need = (T + r - 1) * hop  # frame t is hops t .. t + r - 1
            y = F.pad(y, (0, need - y.shape[1])) if need > y.shape[1] else y[:, :need]
            halves = y.reshape(B, need // 2, 2)

            def frames(v):  # [B, need / 2] -> [B, T, n / 2]
                z = v.reshape(B, T + r - 1, hop // 2)
                return torch.cat([z[:, j : j + T] for j in range(r)], 2)

            a = frames(halves[:, :, 0]) @ self.even
            b = frames(halves[:, :, 1]) @ self.odd
            p, q = a + b, a - b
            return ((p * p) @ self.plus + (q * q) @ self.minus).transpose(1, 2)

    return DftMel().eval()


def export_forms(module):
    """A copy of ``module`` where each log-mel front end (``audio.melspec.MelSpectrogram``)
    whose FFT is at most DFT_MAX_N_FFT points is replaced by its matrix-product form
    (``_dft_mel``). Why: onnxruntime's STFT op took 9.5 % of musicnn's kernel time, ~20x
    torch's FFT for the same 313 512-point frames; the products take about a third of that and
    agree with torch.stft to ~2e-6 of the mel power (tests/test_export.py)."""
    from ..audio.melspec import MelSpectrogram

    def fits(m) -> bool:
        n, hop = int(m.n_fft), int(m.hop_length)
        return m.power == 2.0 and n <= DFT_MAX_N_FFT and n % hop == 0 and hop % 2 == 0

    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MelSpectrogram) and fits(child):
                setattr(parent, name, _dft_mel(child))
    return module


def _torch_export(module, window: int, opset: int):
    """torch.onnx.export (dynamo) with a dynamic batch axis -> onnx.ModelProto (of the module's
    ``export_forms``)."""
    import io
    import logging
    import warnings

    import onnx
    import torch

    module = export_forms(module)
    example = (torch.randn(2, window, generator=torch.Generator().manual_seed(0)) * 0.1,)
    batch = torch.export.Dim("batch", min=1, max=4096)
    # the exporter logs one warning per torchvision op it cannot register: noise, not a problem
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module,
                example,
                input_names=[INPUT_NAME],
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                dynamo=True,
                verbose=False,
                report=False,
            )
        except Exception as exc:
            raise ExportError(f"torch.onnx.export failed: {first_line(exc, with_type=True)}") from None
        finally:
            registration.setLevel(level)
    buf = io.BytesIO()
    program.save(buf) if hasattr(program, "save") else buf.write(program.SerializeToString())
    model = onnx.load_from_string(buf.getvalue())
    sink_initializers(model.graph)
    return model


def _subgraphs(node):
    for a in node.attribute:
        if a.HasField("g"):
            yield a.g
        yield from a.graphs


def _names_used(graph) -> set[str]:
    """Every tensor name read by the nodes of ``graph`` and of the subgraphs inside it."""
    used = set()
    for node in graph.node:
        used.update(node.input)
        for sub in _subgraphs(node):
            used |= _names_used(sub)
    return used


def sink_initializers(graph) -> None:
    """Move each initializer that only the nodes of one subgraph (an If branch: musicnn's
    pruned / full plan) read into that subgraph, recursively. Why: onnxruntime's graph
    transformers treat a subgraph's outer-scope tensors as unknown inputs, so the branch's
    constant weights got no NCHWc layout (musicnn's two timbral convolutions ran im2col + GEMM:
    1.6x the time in onnxruntime's profile) and no constant folding. Shared initializers stay
    where they are."""
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(None)  # read in this graph itself
        for sub in _subgraphs(node):
            for name in _names_used(sub):
                users.setdefault(name, []).append(sub)
    for out in graph.output:  # a graph output stays in its graph
        users.setdefault(out.name, []).append(None)
    subs = [sub for node in graph.node for sub in _subgraphs(node)]
    keep = []
    for init in list(graph.initializer):
        readers = users.get(init.name, [])
        if len(readers) == 1 and readers[0] is not None:
            target = readers[0]
            if not any(i.name == init.name for i in target.initializer):
                target.initializer.append(init)
            continue
        keep.append(init)
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
    for sub in subs:
        sink_initializers(sub)


def _rename_outputs(model, names: list[str]):
    """Give the graph's outputs our stable names (the exporter picks its own)."""
    from onnx import helper

    g = model.graph
    for out, name in zip(list(g.output), names):
        if out.name == name:
            continue
        g.node.append(helper.make_node("Identity", [out.name], [name]))
        out.name = name
    return model


def export_onnx(tagger, path: str | os.PathLike, opset: int = OPSET, check: bool = True) -> dict[str, Any]:
    """Write ``tagger`` as one ONNX model (see module docstring) to ``path`` (atomically).

    Returns {"path", "bytes", "seconds", "metadata"}. Raises ExportError naming why a model
    cannot be exported, MissingDependencyError without onnx / onnxscript.
    """
    from ..errors import require

    require("onnx", EXPORT_INSTALL, "ONNX export")
    require("onnxscript", EXPORT_INSTALL, "ONNX export")
    import onnx

    from ..io import atomic_write_bytes

    t0 = time.perf_counter()
    calibration = calibration_params(getattr(tagger, "calibration", None), error=ExportError)
    module, lgbm_bundle = tagger_module(tagger)
    window = int(tagger.window_samples)
    split = embedding_split(tagger) if getattr(tagger, "has_not_music", False) else None
    if split is not None:  # the not-music detector reads the graph's embedding output
        model = _torch_export(_Calibrated.wrap_split(*split, calibration), window, opset)
        model = _rename_outputs(model, [*OUTPUT_NAMES, EMBEDDING_NAME])
    elif lgbm_bundle is None:
        embed = False
        model = _torch_export(_Calibrated.wrap(module, calibration), window, opset)
        model = _rename_outputs(model, list(OUTPUT_NAMES))
    else:
        import torch

        with torch.no_grad():
            n_features = int(module(torch.zeros(1, window)).shape[1])
        # with a not-music detector the front also gives the backbone embedding (the head's
        # input, what the detector reads): kept as an output of the merged graph
        embed = getattr(tagger, "has_not_music", False) and lgbm_bundle.output == "embedding"
        front = _rename_outputs(
            _torch_export(_FeaturesAndEmbedding(module) if embed else module, window, opset),
            ["features", EMBEDDING_NAME] if embed else ["features"],
        )
        trees = _lgbm_onnx(lgbm_bundle, n_features, calibration)
        model = _merge(front, trees)
    with_embedding = split is not None or (lgbm_bundle is not None and embed)
    if getattr(tagger, "has_not_music", False) and not with_embedding:
        # an ONNX file that never says "not-music" would write genres the torch door does not
        raise ExportError(
            f"the not-music detector of this {tagger.kind} model cannot be exported (no embedding output)"
        )
    meta = build_metadata(tagger, calibration, with_embedding=with_embedding)
    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value, default=str)
    model.producer_name, model.producer_version = "embedkit", __version__
    model.doc_string = f"embedkit {tagger.kind} model: waveform [B, {window}] @ {tagger.sample_rate} Hz -> probabilities [B, {len(tagger.labels)}]"
    if check:
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as exc:
            raise ExportError(f"the exported graph fails onnx.checker: {first_line(exc)}") from None
    data = model.SerializeToString()
    atomic_write_bytes(path, data)
    return {"path": str(path), "bytes": len(data), "seconds": time.perf_counter() - t0, "metadata": meta}


class _FeaturesAndEmbedding:  # a torch module, built lazily (torch is imported on export only)
    def __new__(cls, module):
        from torch import nn

        class Front(nn.Module):
            """nn.Sequential(backbone, scaler/PCA) -> (tree inputs, the backbone embedding)."""

            def __init__(self):
                super().__init__()
                self.backbone, self.features = module[0], module[1]

            def forward(self, y):
                e = self.backbone(y)
                return self.features(e), e

        return Front().eval()


def _merge(front, trees):
    """Join the torch part (waveform -> 'features') and the tree graph ('lgbm_features' ->
    outputs) into one model at the torch part's opset."""
    from onnx import compose, version_converter

    def opset(m) -> int:
        return next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))

    if opset(trees) != opset(front):
        trees = version_converter.convert_version(trees, opset(front))
    front.ir_version = trees.ir_version = max(front.ir_version, trees.ir_version)
    return compose.merge_models(front, trees, io_map=[("features", "lgbm_features")])


def parity_check(tagger, path: str | os.PathLike, n: int = 3, seed: int = 0) -> float:
    """Max |onnxruntime - torch| of the probabilities of ``n`` generated windows (noise plus
    tones at the model's rate): the check ``embedkit export`` runs after writing."""
    from .onnx_runtime import OnnxTagger

    rng = np.random.default_rng(seed)
    L, sr = tagger.window_samples, tagger.sample_rate
    t = np.arange(L) / sr
    x = np.stack([0.3 * np.sin(2 * np.pi * (110 * 2**k) * t) + 0.05 * rng.standard_normal(L) for k in range(n)]).astype(
        np.float32
    )
    onnx_tagger = OnnxTagger.load(path)
    a = onnx_tagger.run(x)
    b = tagger.predict_segments(x)
    diff = float(np.abs(a["uncalibrated"] - b).max())
    if tagger.calibration is not None:
        diff = max(diff, float(np.abs(a["probabilities"] - tagger.calibrate(b)).max()))
    return diff
