"""Architecture records: rebuild a backbone's torch module from a model file alone.

A fine-tuned model file stores every weight of its backbone, so the original checkpoint is not
needed to use it, only the architecture (as whisper stores its model dims beside the weights).
``describe(spec, module)`` returns that record (JSON-plain); ``rebuild(record)`` builds the
module with placeholder weights for ``load_state_dict`` to replace.

- panns: the architecture key ("cnn14" / "cnn10"); the front end's fixed STFT / mel matrices
  are recomputed (``panns.canonical_frontend``) and are in the state dict anyway.
- ast: the transformers ``ASTConfig`` (after any position-embedding resize, so ``max_length``
  is the fine-tuned one) and the feature extractor's settings.
- tiny, musicnn: rebuilt from the registry; their weights ship with embedkit / the musicnn
  wheel, so nothing outside the installed packages is needed.
"""

from __future__ import annotations

from typing import Any

from ..errors import ModelLoadingError, first_line

FORMAT = 1


def describe(spec, module) -> dict[str, Any]:
    """The architecture record of ``module`` (a backbone's ``torch_module()``)."""
    family = spec["family"] if isinstance(spec, dict) else spec.family
    name = spec["name"] if isinstance(spec, dict) else spec.name
    if family == "panns":
        return {"format": FORMAT, "family": "panns", "arch": module.arch.key}
    if family == "ast":
        fe = getattr(module, "feature_extractor", None)
        if fe is None:
            raise ModelLoadingError(f"{name}: the AST module does not carry its feature extractor settings")
        return {
            "format": FORMAT,
            "family": "ast",
            "config": _plain(module.ast.config.to_dict()),
            "classifier": module.head is not None,
            "feature_extractor": _plain(fe.to_dict()),
        }
    return {"format": FORMAT, "family": "registry", "name": name}


def rebuild(record: dict[str, Any], where: str = "model file"):
    """A torch module with the recorded architecture (weights to be loaded over it)."""
    family = record.get("family")
    if record.get("format", 0) > FORMAT:
        raise ModelLoadingError(
            f"{where}: architecture record format {record['format']} is newer than this embedkit understands ({FORMAT})"
        )
    if family == "panns":
        from .panns import ARCHS, build_module

        if record.get("arch") not in ARCHS:
            raise ModelLoadingError(f"{where}: unknown PANNs architecture {record.get('arch')!r}")
        return build_module(record["arch"])
    if family == "ast":
        return _rebuild_ast(record, where)
    if family == "registry":
        from . import load_backbone

        module = load_backbone(record["name"]).torch_module()
        if module is None:
            raise ModelLoadingError(f"{where}: backbone {record['name']!r} no longer provides a torch module")
        return module
    raise ModelLoadingError(f"{where}: unknown architecture family {family!r}")


def _rebuild_ast(record: dict[str, Any], where: str):
    import warnings

    from ..errors import require
    from .ast import REQUIRES, _waveform_module

    require("transformers", REQUIRES, "fine-tuned AST models")
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification, ASTModel

    try:
        cfg = ASTConfig.from_dict(record["config"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the 128-band Kaldi filterbank's empty band (see ast.py)
            fe = ASTFeatureExtractor.from_dict(record["feature_extractor"])
    except Exception as exc:
        raise ModelLoadingError(
            f"{where}: unusable AST architecture record ({first_line(exc, with_type=True)})"
        ) from None
    if record.get("classifier"):
        model = ASTForAudioClassification(cfg)
        base, head = model.audio_spectrogram_transformer, model.classifier
    else:
        base, head = ASTModel(cfg), None
    return _waveform_module(base.eval(), head, fe)


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    import json

    import numpy as np

    def default(o):
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, (np.integer, np.floating)):
            return o.item()
        return str(o)

    return json.loads(json.dumps(d, default=default))
