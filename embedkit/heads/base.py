"""What the heads share: float32 input validation, label encoding, the grouped early-stopping
split, thread heuristics and the numpy predict path of the LR and MLP heads."""

from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted


def _as_float32(X) -> np.ndarray:
    """2-D float32 C-contiguous view of X (no copy when it already is one)."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"expected a 2-D array [n_segments, dim], got shape {X.shape}")
    return np.ascontiguousarray(X, dtype=np.float32)


def _validate(est, X, y=None, reset: bool = True):
    """scikit-learn's input validation (shapes, finiteness, n_features_in_, sparse refusal)
    converting to float32 C order - a no-op, not a copy, for a float32 embedding matrix."""
    try:
        from sklearn.utils.validation import validate_data
    except ImportError:  # scikit-learn < 1.6
        validate_data = type(est)._validate_data
    kw = {"dtype": np.float32, "order": "C", "accept_sparse": False}
    if not reset:
        return validate_data(est, X, reset=False, **kw)
    X, y = validate_data(est, X, y, **kw)
    return X, y


def _encode(y) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.utils.multiclass import check_classification_targets

    check_classification_targets(y)
    classes, yi = np.unique(np.asarray(y), return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"need at least two classes to fit a classifier; got {len(classes)} class")
    return classes, yi.astype(np.int64)


def holdout_indices(
    y: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, val) for early stopping. With ``groups`` (track or artist ids) no
    group is on both sides, so the validation score is not inflated by sibling segments."""
    from sklearn.model_selection import GroupShuffleSplit, StratifiedShuffleSplit

    n = len(y)
    idx = np.arange(n)
    if fraction <= 0:
        return idx, idx[:0]
    if groups is not None and len(np.unique(groups)) >= 4:
        a, b = next(GroupShuffleSplit(1, test_size=fraction, random_state=seed).split(idx, y, groups))
        return np.sort(a), np.sort(b)
    try:
        a, b = next(StratifiedShuffleSplit(1, test_size=fraction, random_state=seed).split(idx, y))
    except ValueError:  # a class too small to stratify: plain random split
        rng = np.random.default_rng(seed)
        perm = rng.permutation(n)
        cut = max(1, int(round(n * fraction)))
        a, b = perm[cut:], perm[:cut]
    return np.sort(a), np.sort(b)


def n_cpus() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


#: rows x dims below which one thread beats several: on small matrices thread synchronisation
#: dominates (measured on gtzan_mini, 480 x 218, loaded 2-core machine: LightGBM 76 s with 2
#: threads vs 1.1 s with 1; the MLP 17.8 s vs 4.0 s)
SMALL_PROBLEM = 2_000_000


def auto_threads(n: int, d: int, requested: int | None = None) -> int:
    return int(requested) if requested else (1 if n * d < SMALL_PROBLEM else n_cpus())


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


class _NumpyClassifier(ClassifierMixin, BaseEstimator):
    """predict / predict_proba from ``_logits`` (numpy) for the LR and MLP heads."""

    def predict_proba(self, X) -> np.ndarray:
        """X [N, D] -> class probabilities [N, C] (columns in ``classes_`` order)."""
        return _softmax(self._logits(X).astype(np.float64))

    def predict(self, X) -> np.ndarray:
        idx = self._logits(X).argmax(axis=1)  # first: raises NotFittedError before classes_ is read
        return self.classes_[idx]

    def _check_X(self, X) -> np.ndarray:
        check_is_fitted(self, "classes_")
        return _validate(self, X, reset=False)


def _torch_view(X: np.ndarray):
    import torch

    with warnings.catch_warnings():  # read-only inputs (memory maps) are fine: we never write
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(X)
