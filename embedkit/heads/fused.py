"""Heads on fused embeddings (``embedkit.backbones.fused``): the columns of X are the parts'
embeddings side by side, ``dims`` long each.

- ``concat``: one head on the concatenation after :class:`PartScaler` (each column standardised
  on the training rows, then each part's block multiplied by its weight). Per-column
  standardisation already puts every part on one scale; the weight decides how much of the
  L2-penalised head's budget a part gets: with "equal", every part's block carries the same
  total variance whatever its width (a 218-d hand-crafted part does not outweigh a 200-d one by
  its number of columns alone). For an L2 head, scaling a block by w equals dividing that
  block's penalty by w**2.
- ``stack``: :class:`StackedHead`, one head per part, and a multinomial logistic regression on
  the parts' log-probabilities, trained on the parts' out-of-fold probabilities (inner folds by
  track, so a part head never scores the segments it was fitted on); at predict time the part
  heads refitted on every training row feed it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from .factory import default_pca, make_head, n_params
from .scaler import BlockScaler

FUSIONS = ("concat", "stack")
WEIGHTINGS = ("equal", "none")
#: probability floor before the log in the stacker's features (and in its ONNX form)
LOG_FLOOR = 1e-6


def part_slices(dims) -> list[slice]:
    ends = np.cumsum([int(d) for d in dims])
    return [slice(int(e - d), int(e)) for e, d in zip(ends, dims)]


def part_weights(dims, weighting="equal") -> np.ndarray:
    """One weight per part: "equal" -> sqrt(D / (P * d_i)) (every block's total variance D / P
    after standardisation: the same as without weights when the parts are equally wide),
    "none" -> 1, or the given numbers."""
    dims = np.asarray([int(d) for d in dims], dtype=np.float64)
    if isinstance(weighting, str):
        if weighting == "none":
            return np.ones(len(dims))
        if weighting == "equal":
            return np.sqrt(dims.sum() / (len(dims) * dims))
        raise ValueError(f"unknown weighting {weighting!r}; use one of {', '.join(WEIGHTINGS)} or numbers")
    w = np.asarray(weighting, dtype=np.float64)
    if w.shape != dims.shape or not np.all(w > 0):
        raise ValueError(f"need {len(dims)} positive part weights, got {list(weighting)}")
    return w


class PartScaler(BlockScaler):
    """Standardise every column, then multiply each part's block by its weight
    (``part_weights(dims, weighting)``). The weight is folded into ``scale_`` after ``fit``, so
    ``transform`` is StandardScaler's and every consumer of a scaler's ``mean_`` / ``scale_``
    (the numpy tagger cache, the ONNX export) handles it unchanged."""

    def __init__(self, *, dims=(), weighting="equal", copy: bool = True, block_rows: int = 4096):
        super().__init__(copy=copy, block_rows=block_rows)
        self.dims = dims
        self.weighting = weighting

    def fit(self, X, y=None, sample_weight=None):
        super().fit(X, y, sample_weight)
        if sum(int(d) for d in self.dims) != self.n_features_in_:
            raise ValueError(f"part sizes {list(self.dims)} do not add up to {self.n_features_in_} columns")
        w = np.concatenate([np.full(int(d), wi) for d, wi in zip(self.dims, part_weights(self.dims, self.weighting))])
        self.part_weights_ = part_weights(self.dims, self.weighting)
        self.scale_ = self.scale_ / w
        return self


class StackedHead(ClassifierMixin, BaseEstimator):
    """One ``head`` per part (``make_head(head, params)`` on the part's columns), a multinomial
    logistic regression (``C``) over their out-of-fold log-probabilities.

    Fit with ``fit(X, y, groups=track_ids)``: the inner ``inner_folds`` folds keep every track's
    segments on one side. Fitted: ``classes_``, ``parts_`` (part pipelines fitted on all rows),
    ``meta_`` (the Float32LogisticRegression)."""

    def __init__(
        self, dims=(), head: str = "lr", params=None, C: float = 1.0, inner_folds: int = 5, random_state: int = 0
    ):
        self.dims = dims
        self.head = head
        self.params = params
        self.C = C
        self.inner_folds = inner_folds
        self.random_state = random_state

    def _part(self, d: int):
        return make_head(self.head, self.params, default_pca(self.head, d), self.random_state)

    def _features(self, models, X) -> np.ndarray:
        cols = []
        for m, s in zip(models, part_slices(self.dims)):
            cols.append(np.log(np.clip(self._aligned(m, m.predict_proba(X[:, s])), LOG_FLOOR, None)))
        return np.concatenate(cols, axis=1).astype(np.float32)

    def _aligned(self, model, P) -> np.ndarray:
        """Columns of a part's P (its classes_) put in ``classes_`` order; absent classes 0."""
        out = np.zeros((len(P), len(self.classes_)))
        idx = np.searchsorted(self.classes_, np.asarray(model.classes_))
        out[:, idx] = P
        return out

    def fit(self, X, y, groups=None):
        from sklearn.model_selection import GroupKFold, StratifiedKFold

        from .linear import Float32LogisticRegression

        X = np.ascontiguousarray(X, dtype=np.float32)
        y = np.asarray(y)
        if sum(int(d) for d in self.dims) != X.shape[1]:
            raise ValueError(f"part sizes {list(self.dims)} do not add up to {X.shape[1]} columns")
        self.classes_ = np.unique(y)
        n_groups = len(np.unique(groups)) if groups is not None else 0
        k = max(2, min(int(self.inner_folds), n_groups or len(y)))
        if groups is not None and n_groups >= 2:
            splits = list(GroupKFold(k).split(X, y, groups))
        else:
            splits = list(StratifiedKFold(k, shuffle=True, random_state=self.random_state).split(X, y))
        oof = np.zeros((len(y), len(self.dims) * len(self.classes_)), dtype=np.float32)
        gr = None if groups is None else np.asarray(groups)
        for tr, te in splits:
            models = [
                self._fit_part(X[tr][:, s], y[tr], None if gr is None else gr[tr]) for s in part_slices(self.dims)
            ]
            oof[te] = self._features(models, X[te])
        self.meta_ = Float32LogisticRegression(C=self.C, max_iter=200).fit(oof, y)
        self.parts_ = [self._fit_part(X[:, s], y, gr) for s in part_slices(self.dims)]
        return self

    def _fit_part(self, X, y, groups):
        return self._part(X.shape[1]).fit(X, y, head__groups=groups)

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self, "meta_")
        X = np.ascontiguousarray(X, dtype=np.float32)
        P = self.meta_.predict_proba(self._features(self.parts_, X))
        out = np.zeros((len(X), len(self.classes_)))
        out[:, np.searchsorted(self.classes_, self.meta_.classes_)] = P
        return out

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    @property
    def n_params_(self) -> int:
        counts = [n_params(m) for m in self.parts_]
        if any(c is None for c in counts):
            raise AttributeError("n_params_: a part head is a tree ensemble")
        return int(sum(counts) + self.meta_.n_params_)


def fusion_pipeline(head: str, params: dict[str, Any] | None, pca: int | None, seed: int, fusion: dict[str, Any]):
    """The pipeline of a fused head: ``fusion`` = {"fusion": "concat" | "stack", "dims": [...],
    "weighting": "equal" | "none" | [w...]} (``embedkit.fusion.FusionConfig.head_fusion``)."""
    from sklearn.pipeline import Pipeline

    dims = tuple(int(d) for d in fusion["dims"])
    kind = fusion.get("fusion", "concat")
    if kind == "concat":
        model = make_head(head, params, pca, seed)
        w = fusion.get("weighting", "equal")
        model.steps[0] = ("scale", PartScaler(dims=dims, weighting=w if isinstance(w, str) else tuple(w)))
        return model
    if kind == "stack":
        stack = StackedHead(dims=dims, head=head, params=dict(params or {}) or None, random_state=seed)
        return Pipeline([("scale", BlockScaler()), ("head", stack)])
    raise ValueError(f"unknown fusion {kind!r}; use one of {', '.join(FUSIONS)}")
