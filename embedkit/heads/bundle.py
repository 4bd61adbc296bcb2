"""Head bundle (``head.skops``) and trust model.

One skops file holding ``{"format", "meta" (JSON text), "model" (the fitted Pipeline)}``.
skops never unpickles: it rebuilds only the types it is told to trust. :func:`load_bundle`
first lists the file's types (``skops.io.get_untrusted_types``) and refuses the file unless
every one is in :data:`TRUSTED_TYPES` (our heads and scaler; scikit-learn's Pipeline/PCA and
numpy arrays are in skops' default trusted set). Our heads' state is numpy arrays, numbers and
strings; nothing in it is executed (LightGBM parses its own model text). A bundle is therefore
as safe to load as a JSON file, provided embedkit itself is trusted. The meta records the
backbone spec, preprocessing, weights id, labels, library versions, scores and the training
tracks; loading with another backbone / weights / preprocessing raises
:class:`~embedkit.errors.ConfigMismatchError` (through ``runs.check_match``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigMismatchError, ModelLoadingError, first_line
from ..io import jsonable, plain
from .base import _as_float32

BUNDLE_FORMAT = "embedkit-head-bundle"
BUNDLE_VERSION = 1
BUNDLE_FILE = "head.skops"

#: every type a bundle may contain; anything else in a file is refused before it is built
#: (beyond skops' default trusted set: scikit-learn estimators, numpy arrays/scalars, builtins)
TRUSTED_TYPES = [
    "embedkit.heads.scaler.BlockScaler",
    "embedkit.heads.lgbm.LGBMHead",
    "embedkit.heads.linear.Float32LogisticRegression",
    "embedkit.heads.mlp.TorchMLP",
    "embedkit.heads.fused.PartScaler",
    "embedkit.heads.fused.StackedHead",
    # the same classes as bundles of embedkit 0.1.0 (one heads.py) name them
    "embedkit.heads.BlockScaler",
    "embedkit.heads.LGBMHead",
    "embedkit.heads.Float32LogisticRegression",
    "embedkit.heads.TorchMLP",
]


@dataclass
class HeadBundle:
    """A fitted head and everything needed to use it safely on new embeddings.

    model: fitted Pipeline (input [N, D] float32 segment embeddings of ``spec``).
    labels: class names; ``predict_proba`` columns follow this order.
    spec / preprocess / weights_id: the backbone spec, preprocessing config and weights that
        produced the training embeddings; new embeddings must come from the same.
    """

    model: Any
    labels: list[str]
    head: str
    spec: dict[str, Any]
    preprocess: dict[str, Any]
    weights_id: str
    output: str = "embedding"
    config: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)
    trained_on: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    run_id: str = ""
    path: str | None = None

    def _columns(self) -> np.ndarray:
        classes = [str(c) for c in self.model.classes_]
        return np.array([classes.index(l) if l in classes else -1 for l in self.labels])

    def predict_proba(self, X) -> np.ndarray:
        """Segment embeddings [N, D] -> probabilities [N, len(labels)] in ``labels`` order
        (a label the head never saw in training gets probability 0)."""
        X = _as_float32(X)
        dim = int(self.spec.get("embedding_dim", X.shape[1])) if self.output == "embedding" else X.shape[1]
        if X.shape[1] != dim:
            raise ConfigMismatchError(
                f"embeddings have {X.shape[1]} dimensions; the head expects {dim} ({self.spec.get('name')})"
            )
        p = self.model.predict_proba(X)
        cols = self._columns()
        out = np.zeros((len(X), len(self.labels)), dtype=np.float64)
        out[:, cols >= 0] = p[:, cols[cols >= 0]]
        return out

    def predict(self, X) -> np.ndarray:
        return np.asarray(self.labels)[self.predict_proba(X).argmax(axis=1)]

    def predict_tracks(self, segment_track_ids, X):
        """Per-track predictions: DataFrame(track_id, pred (mean probability), pred_vote,
        confidence, p_<label>...) sorted by track id."""
        import pandas as pd

        from ..evaluate import aggregate

        ids, mean, vote = aggregate(np.asarray(segment_track_ids), self.predict_proba(X))
        labels = np.asarray(self.labels)
        df = pd.DataFrame(
            {
                "track_id": ids,
                "pred": labels[mean.argmax(axis=1)],
                "pred_vote": labels[vote],
                "confidence": mean.max(axis=1),
            }
        )
        for i, l in enumerate(self.labels):
            df[f"p_{l}"] = mean[:, i]
        return df

    def meta(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("model")
        d.pop("path")
        return d


def save_bundle(path: str | os.PathLike, bundle: HeadBundle) -> int:
    """Write ``bundle`` atomically to ``path`` (a .skops file); returns its size in bytes."""
    import skops.io as sio

    from ..io import atomic_write_bytes

    meta = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, **bundle.meta()}
    data = sio.dumps({"format": BUNDLE_FORMAT, "meta": json.dumps(meta, default=jsonable), "model": bundle.model})
    atomic_write_bytes(path, data)
    return len(data)


_SPEC_KEYS = ("name", "family", "sample_rate", "embedding_dim", "frontend", "weights_sha256", "outputs")


def _as_dict(obj) -> dict[str, Any]:
    if obj is None or isinstance(obj, dict):
        return obj
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return asdict(obj)


def load_bundle(
    path: str | os.PathLike, expect_spec=None, expect_preprocess=None, expect_weights_id: str | None = None
) -> HeadBundle:
    """Load a head bundle (a ``head.skops`` file or the run directory holding one).

    expect_spec (BackboneSpec or dict), expect_preprocess (PreprocessConfig or dict),
    expect_weights_id: the embeddings you will feed; a mismatch raises ConfigMismatchError
    naming the differing field. A file that is not a bundle, or holds types outside
    TRUSTED_TYPES, raises ModelLoadingError before anything in it is built.
    """
    import skops.io as sio

    p = Path(path)
    if p.is_dir():
        p = p / BUNDLE_FILE
    if not p.is_file():
        raise ModelLoadingError(f"{p}: no head bundle there")
    data = p.read_bytes()
    try:
        untrusted = sio.get_untrusted_types(data=data)
    except Exception as exc:
        raise ModelLoadingError(f"{p}: not a head bundle (unreadable skops file: {type(exc).__name__})") from None
    extra = sorted(set(untrusted) - set(TRUSTED_TYPES))
    if extra:
        raise ModelLoadingError(
            f"{p}: refusing to load; it contains types embedkit does not trust: {', '.join(extra[:5])}"
        )
    try:
        obj = sio.loads(data, trusted=[t for t in untrusted])
    except Exception as exc:
        raise ModelLoadingError(f"{p}: cannot load head bundle ({first_line(exc, with_type=True)})") from None
    if not isinstance(obj, dict) or obj.get("format") != BUNDLE_FORMAT:
        raise ModelLoadingError(f"{p}: not an embedkit head bundle")
    meta = json.loads(obj["meta"])
    if meta.get("version", 0) > BUNDLE_VERSION:
        raise ModelLoadingError(
            f"{p}: bundle version {meta['version']} is newer than this embedkit understands ({BUNDLE_VERSION})"
        )
    names = {f for f in HeadBundle.__dataclass_fields__} - {"model", "path"}
    bundle = HeadBundle(model=obj["model"], path=str(p), **{k: v for k, v in meta.items() if k in names})
    from ..runs import check_match, diff

    spec = _as_dict(expect_spec)
    if spec is not None:
        d = diff({k: bundle.spec.get(k) for k in _SPEC_KEYS}, {k: spec.get(k) for k in _SPEC_KEYS}, _SPEC_KEYS)
        if d:
            key, a, b = d[0]
            key = key.split(".")[0]
            a, b = plain(bundle.spec.get(key)), plain(spec.get(key))
            raise ConfigMismatchError(
                f"{p}: head was trained on {bundle.spec.get('name')} embeddings ({key}={a!r}), not {spec.get('name')} ({key}={b!r})"
            )
    if expect_weights_id is not None and expect_weights_id != bundle.weights_id:
        raise ConfigMismatchError(
            f"{p}: head was trained on {bundle.spec.get('name')} weights {bundle.weights_id}, these embeddings come from weights {expect_weights_id}"
        )
    prep = _as_dict(expect_preprocess)
    if prep is not None:
        check_match(
            p, "head was trained with other preprocessing", bundle.preprocess, prep, labels=("trained", "given")
        )
    return bundle
