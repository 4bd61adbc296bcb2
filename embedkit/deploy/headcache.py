"""A numpy-only inference form of head bundles, cached by model id: start-up without sklearn.

Loading a ``head.skops`` bundle imports scikit-learn and skops (skops pulls in sklearn's torch
array-API shim): ~3.8 s of CPU on a 2-core laptop, more than the rest of ``embedkit tag`` on
a 30 s file. The fitted LR / MLP pipelines are a few numpy arrays (scaler, optional PCA,
linear layers), so after the first load the tagger writes them to
``<cache>/<model_id>.npz`` (``EMBEDKIT_TAGGER_CACHE``, default ``~/.cache/embedkit/taggers``)
and later starts read that instead. The key is the SHA-256 of the bundle file, so the cache
cannot go stale; the form is only written after it reproduced the bundle's probabilities
(``TOLERANCE``) on test inputs. LightGBM heads (and anything unrecognised) keep the bundle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 1
#: max |p_fast - p_bundle| accepted when the form is built (float32 vs sklearn's op order)
TOLERANCE = 1e-5


def cache_dir() -> Path:
    return Path(os.environ.get("EMBEDKIT_TAGGER_CACHE") or Path.home() / ".cache" / "embedkit" / "taggers")


class FastHead:
    """Predicts like ``HeadBundle.predict_proba`` from plain arrays; carries the bundle's meta
    (labels, spec, preprocess, weights_id, output, head, run_id)."""

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]):
        self.arrays, self.meta = arrays, meta
        for k in ("labels", "spec", "preprocess", "weights_id", "output", "head", "run_id"):
            setattr(self, k, meta.get(k))

    def predict_proba(self, X) -> np.ndarray:
        a = self.arrays
        X = np.array(X, dtype=np.float32, order="C")  # a copy: transformed in place below
        dim = a["scale_mean"].shape[0]
        if X.ndim != 2 or X.shape[1] != dim:
            from ..errors import ConfigMismatchError

            raise ConfigMismatchError(
                f"embeddings have shape {X.shape}; the head expects {dim} dimensions ({self.spec.get('name')})"
            )
        X -= a["scale_mean"]  # StandardScaler.transform's in-place float32 steps
        X /= a["scale_scale"]
        if "pca_components" in a:
            X = X - a["pca_mean"]
            X = X @ a["pca_components"].T
            if "pca_whiten" in a:
                X /= a["pca_whiten"]
            X = X.astype(np.float32, copy=False)
        h = X
        n = int(a["n_layers"])
        for i in range(n):
            h = h @ a[f"W{i}"] + a[f"b{i}"]
            if i < n - 1:
                np.maximum(h, 0, out=h)
        z = h.astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        cols = a["columns"]
        out = np.zeros((len(X), len(self.labels)), dtype=np.float64)
        out[:, cols >= 0] = z[:, cols[cols >= 0]]
        return out


def load(model_id: str) -> FastHead | None:
    """The cached form for ``model_id``, or None."""
    p = cache_dir() / f"{model_id}.npz"
    if not p.is_file():
        return None
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "meta"}
            meta = json.loads(str(z["meta"]))
    except Exception:  # unreadable / foreign file: the bundle is the truth
        return None
    if meta.get("format") != FORMAT or meta.get("model_id") != model_id:
        return None
    return FastHead(arrays, meta)


def build(bundle) -> FastHead | None:
    """The numpy form of a loaded HeadBundle, or None when its pipeline is not LR / MLP on a
    scaler (+ PCA)."""
    model = bundle.model
    steps = dict(getattr(model, "named_steps", {}))
    scale, pca, head = steps.get("scale"), steps.get("pca"), steps.get("head")
    if scale is None or head is None or set(steps) - {"scale", "pca", "head"}:
        return None
    arrays: dict[str, np.ndarray] = {}
    if not (getattr(scale, "with_mean", True) and getattr(scale, "with_std", True)):
        return None
    arrays["scale_mean"] = np.asarray(scale.mean_)
    arrays["scale_scale"] = np.asarray(scale.scale_)
    if pca is not None:
        arrays["pca_mean"] = np.asarray(pca.mean_)
        arrays["pca_components"] = np.asarray(pca.components_)
        if getattr(pca, "whiten", False):
            arrays["pca_whiten"] = np.sqrt(np.asarray(pca.explained_variance_))
    name = type(head).__name__
    if name == "Float32LogisticRegression":
        arrays["W0"], arrays["b0"] = np.asarray(head.coef_).T.copy(), np.asarray(head.intercept_)
        arrays["n_layers"] = np.array(1)
    elif name == "TorchMLP":
        for i, (W, b) in enumerate(zip(head.coefs_, head.intercepts_)):
            arrays[f"W{i}"], arrays[f"b{i}"] = np.asarray(W), np.asarray(b)
        arrays["n_layers"] = np.array(len(head.coefs_))
    else:
        return None
    arrays["columns"] = np.asarray(bundle._columns(), dtype=np.int64)
    meta = {k: getattr(bundle, k) for k in ("labels", "spec", "preprocess", "weights_id", "output", "head", "run_id")}
    return FastHead(arrays, meta)


def verified(fast: FastHead, bundle, dim: int, seed: int = 0) -> bool:
    """Does ``fast`` reproduce ``bundle`` on random and constant inputs?"""
    rng = np.random.default_rng(seed)
    X = np.concatenate([rng.standard_normal((16, dim)) * 3, np.zeros((1, dim)), np.ones((1, dim))]).astype(np.float32)
    try:
        return bool(np.max(np.abs(fast.predict_proba(X) - bundle.predict_proba(X))) <= TOLERANCE)
    except Exception:
        return False


def save(fast: FastHead, model_id: str) -> Path | None:
    """Write the form atomically under ``cache_dir()``; None when the folder is not writable."""
    from ..io import atomic_write

    meta = json.dumps({**fast.meta, "format": FORMAT, "model_id": model_id}, default=str)
    try:
        return atomic_write(
            cache_dir() / f"{model_id}.npz", lambda fh: np.savez(fh, meta=np.array(meta), **fast.arrays)
        )
    except OSError:
        return None
