"""Light classifier heads on cached segment embeddings, and the head bundle they ship in.

Three heads, each a scikit-learn estimator (hyper-parameters in ``__init__``, ``fit`` returns
self, ``classes_``, ``predict_proba``), so ``Pipeline``, ``clone`` and model selection just work:

- ``lr``   :class:`Float32LogisticRegression` - multinomial L2 logistic regression with
  scikit-learn's objective and ``C``, solved by scipy's L-BFGS-B on float32 X in place.
  Why not ``sklearn.linear_model.LogisticRegression``: it converts X to float64 (a copy twice
  the size of the float32 embedding matrix) and is several times slower at FMA-small scale
  (bench/bench_heads.py measures both in the same run).
- ``lgbm`` :class:`LGBMHead` - LightGBM with early stopping on a held-out part of the training
  tracks; by default on a PCA projection when the embedding is wide (trees on 2048 raw
  dimensions cost an order of magnitude more, for no accuracy: bench/bench_heads.py).
- ``mlp``  :class:`TorchMLP` - one hidden layer, AdamW, early stopping with best-epoch restore
  on a held-out part of the training *tracks*.

:func:`make_head` wraps a head in ``Pipeline([scale, (pca), head])``: normalisation (and PCA)
statistics come from whatever ``fit`` sees, which the trainer (:mod:`embedkit.fit`) restricts to
the training tracks. Fitted state is plain numpy (and, for LightGBM, the model text), so
``predict_proba`` needs neither torch nor a live booster, and the bundle stays safe to load.

Head bundle (``head.skops``) and trust model
-------------------------------------------
One skops file holding ``{"format", "meta" (JSON text), "model" (the fitted Pipeline)}``.
skops never unpickles: it rebuilds only the types it is told to trust. :func:`load_bundle`
first lists the file's types (``skops.io.get_untrusted_types``) and refuses the file unless
every one is in :data:`TRUSTED_TYPES` (our heads and scaler; scikit-learn's Pipeline/PCA and
numpy arrays are in skops' default trusted set). Our heads' state is numpy arrays, numbers and
strings; nothing in it is executed (LightGBM parses its own model text). A bundle is therefore as safe to load as a JSON file,
provided embedkit itself is trusted. The meta records the backbone spec, preprocessing,
weights id, labels, library versions, scores and the training tracks; loading with another
backbone / weights / preprocessing raises :class:`~embedkit.errors.ConfigMismatchError`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from .errors import ConfigMismatchError, EmbedkitError, ModelLoadingError

HEADS = ("lr", "lgbm", "mlp")
BUNDLE_FORMAT = "embedkit-head-bundle"
BUNDLE_VERSION = 1
BUNDLE_FILE = "head.skops"


# ---------------------------------------------------------------------------------------------
# helpers


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


def holdout_indices(y: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
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


# ---------------------------------------------------------------------------------------------
# scaler


class BlockScaler(StandardScaler):
    """``StandardScaler`` whose ``fit`` streams over row blocks with ``partial_fit``.

    Why: ``StandardScaler.fit`` computes the variance from ``X - mean`` in float64, a temporary
    twice the size of a float32 embedding matrix (630 MB at 38,400 x 2048). ``partial_fit``
    over blocks runs the same maintained incremental algorithm with a bounded temporary.
    Statistics equal StandardScaler's to float rounding; ``transform`` is StandardScaler's.
    """

    def __init__(self, *, copy: bool = True, with_mean: bool = True, with_std: bool = True, block_rows: int = 4096):
        super().__init__(copy=copy, with_mean=with_mean, with_std=with_std)
        self.block_rows = block_rows

    def fit(self, X, y=None, sample_weight=None):
        from scipy.sparse import issparse

        if sample_weight is not None or issparse(X):
            return super().fit(X, y, sample_weight)
        X = np.asarray(X)
        self._reset()
        for a in range(0, max(len(X), 1), self.block_rows):
            self.partial_fit(X[a : a + self.block_rows])
        return self


# ---------------------------------------------------------------------------------------------
# heads


class Float32LogisticRegression(_NumpyClassifier):
    """Multinomial logistic regression with L2 penalty, fitted in float32 without copying X.

    Objective (scikit-learn's, so ``C`` means the same): mean cross-entropy + ||W||^2 / (2 C n);
    the intercept is not penalised. Solver: scipy's L-BFGS-B, as in scikit-learn, with its
    defaults (``max_iter`` 100, stop when the largest gradient entry is below ``tol``).
    Why not scikit-learn's estimator: it converts X to float64, a copy twice the size of the
    float32 embedding matrix, and each loss/gradient evaluation then reads twice the bytes;
    here one evaluation reads float32 X once (the cost of an evaluation is reading X), and
    the loss and gradient are accumulated in float64. (torch's L-BFGS was tried too: its strong-Wolfe
    line search spent ~4 evaluations per iteration here against scipy's ~1.)
    For two classes the softmax parametrisation penalises both weight vectors, which equals
    scikit-learn's binary model at ``2 C``.

    Fitted: ``classes_``, ``coef_`` [C, D], ``intercept_`` [C], ``n_iter_``, ``converged_``.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 100, tol: float = 1e-4, n_jobs: int | None = None):
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.n_jobs = n_jobs

    def fit(self, X, y, groups=None):
        from scipy.optimize import minimize

        X, y = _validate(self, X, y)
        self.classes_, yi = _encode(y)
        n, d = X.shape
        k = len(self.classes_)
        lam = 1.0 / (self.C * n)
        threads = auto_threads(n, d, self.n_jobs)
        # Row chunks, one per thread, each walked in blocks that fit in L2 so that X @ W and
        # X.T @ E read each block from memory once (the evaluation is memory-bound: ~30 %
        # faster than two whole-matrix products here). BLAS runs single-threaded inside: our
        # own threads avoid OpenMP spin-waiting, which cost up to 12x on a loaded machine.
        block = max(64, (1 << 20) // (4 * d))  # ~1 MB of X per block
        cuts = np.linspace(0, n, threads + 1).astype(int)
        chunks = list(zip(cuts[:-1], cuts[1:]))

        def part(a: int, z: int, W: np.ndarray, b: np.ndarray):
            gW = np.zeros((d, k))
            gb = np.zeros(k)
            loss = 0.0
            for i in range(a, z, block):
                Xb, yb = X[i : min(i + block, z)], yi[i : min(i + block, z)]
                r = np.arange(len(yb))
                Z = Xb @ W
                Z += b
                Z -= Z.max(axis=1, keepdims=True)
                E = np.exp(Z)
                s = E.sum(axis=1)
                loss += float(np.log(s).sum(dtype=np.float64) - Z[r, yb].sum(dtype=np.float64))
                E /= s[:, None]
                E[r, yb] -= 1.0  # softmax - onehot = d loss / d logits
                gW += Xb.T @ E
                gb += E.sum(axis=0, dtype=np.float64)
            return loss, gW, gb

        def loss_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
            W64 = w[: d * k].reshape(d, k)
            W, b = W64.astype(np.float32), w[d * k :].astype(np.float32)
            parts = list(pool.map(lambda c: part(*c, W, b), chunks)) if pool else [part(0, n, W, b)]
            loss = sum(p[0] for p in parts) / n + 0.5 * lam * float((W64 * W64).sum())
            gW = sum(p[1] for p in parts) / n + lam * W64
            gb = sum(p[2] for p in parts) / n
            return loss, np.concatenate([gW.ravel(), gb])

        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        pool = ThreadPoolExecutor(threads) if threads > 1 else None
        try:
            with threadpool_limits(1, user_api="blas"):
                res = minimize(loss_grad, np.zeros(d * k + k), jac=True, method="L-BFGS-B", options={"maxiter": self.max_iter, "gtol": self.tol})
        finally:
            if pool:
                pool.shutdown()
        self.coef_ = res.x[: d * k].reshape(d, k).T.astype(np.float32)
        self.intercept_ = res.x[d * k :].astype(np.float32)
        self.n_iter_ = int(res.nit)
        self.converged_ = bool(res.success)
        return self

    def _logits(self, X) -> np.ndarray:
        X = self._check_X(X)
        return X @ self.coef_.T + self.intercept_

    @property
    def n_params_(self) -> int:
        return int(self.coef_.size + self.intercept_.size)


class TorchMLP(_NumpyClassifier):
    """Small MLP (Linear-ReLU-Dropout blocks) trained with AdamW and early stopping.

    ``fit(X, y, groups=None)``: ``val_fraction`` of the rows - whole groups when ``groups``
    (track ids) are given - is held out; training stops after ``patience`` epochs without a
    lower validation loss and the best epoch's weights are kept. Fitted: ``classes_``,
    ``coefs_`` (list of [in, out]), ``intercepts_``, ``n_epochs_``, ``best_epoch_``,
    ``loss_curve_`` / ``val_loss_curve_`` / ``val_accuracy_curve_`` per epoch.
    """

    def __init__(self, hidden: tuple[int, ...] = (256,), dropout: float = 0.2, lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 256, max_epochs: int = 60, patience: int = 3, val_fraction: float = 0.1, n_jobs: int | None = None, random_state: int = 0):
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.val_fraction = val_fraction
        self.n_jobs = n_jobs
        self.random_state = random_state

    def fit(self, X, y, groups=None):
        X, y = _validate(self, X, y)
        with _torch_threads(auto_threads(*X.shape, self.n_jobs)):
            return self._fit(X, y, groups)

    def _fit(self, X, y, groups):
        import torch
        import torch.nn.functional as F
        from torch import nn

        self.classes_, yi = _encode(y)
        n, d = X.shape
        tr, va = holdout_indices(yi, None if groups is None else np.asarray(groups), self.val_fraction, self.random_state)
        with torch.random.fork_rng(devices=[]):  # seeded init and shuffling, global RNG untouched
            torch.manual_seed(self.random_state)
            sizes = [d, *map(int, self.hidden)]
            layers: list[nn.Module] = []
            for a, b in zip(sizes[:-1], sizes[1:]):
                layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(self.dropout)]
            layers.append(nn.Linear(sizes[-1], len(self.classes_)))
            net = nn.Sequential(*layers)
            opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            Xt, yt = _torch_view(X), torch.from_numpy(yi)
            tr_t, va_t = torch.from_numpy(tr), torch.from_numpy(va)
            best, best_state, bad = np.inf, None, 0
            self.loss_curve_, self.val_loss_curve_, self.val_accuracy_curve_ = [], [], []
            self.best_epoch_ = 0
            for epoch in range(self.max_epochs):
                net.train()
                perm = tr_t[torch.randperm(len(tr_t))]
                total = 0.0
                for i in range(0, len(perm), self.batch_size):
                    rows = perm[i : i + self.batch_size]
                    loss = F.cross_entropy(net(Xt[rows]), yt[rows])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.detach().item() * len(rows)
                self.loss_curve_.append(total / max(len(perm), 1))
                if len(va_t) == 0:
                    continue
                net.eval()
                with torch.inference_mode():
                    logits = torch.cat([net(Xt[va_t[i : i + 8192]]) for i in range(0, len(va_t), 8192)])
                    vloss = float(F.cross_entropy(logits, yt[va_t]))
                    vacc = float((logits.argmax(1) == yt[va_t]).float().mean())
                self.val_loss_curve_.append(vloss)
                self.val_accuracy_curve_.append(vacc)
                if vloss < best - 1e-4:
                    best, bad, self.best_epoch_ = vloss, 0, epoch
                    best_state = copy.deepcopy(net.state_dict())
                else:
                    bad += 1
                    if bad >= self.patience:
                        break
            if best_state is not None:
                net.load_state_dict(best_state)
        self.n_epochs_ = len(self.loss_curve_)
        linears = [m for m in net if isinstance(m, nn.Linear)]
        self.coefs_ = [m.weight.detach().numpy().T.copy() for m in linears]
        self.intercepts_ = [m.bias.detach().numpy().copy() for m in linears]
        return self

    def _logits(self, X) -> np.ndarray:
        h = self._check_X(X)
        for i, (W, b) in enumerate(zip(self.coefs_, self.intercepts_)):
            h = h @ W + b
            if i < len(self.coefs_) - 1:
                np.maximum(h, 0, out=h)  # ReLU; dropout is the identity at inference
        return h

    @property
    def n_params_(self) -> int:
        return int(sum(w.size + b.size for w, b in zip(self.coefs_, self.intercepts_)))


class LGBMHead(ClassifierMixin, BaseEstimator):
    """LightGBM multiclass booster with early stopping on held-out training groups.

    The fitted state is the booster's model text (``model_str_``), ``classes_`` and
    ``best_iteration_``; the live booster is rebuilt from the text when the estimator is
    unpickled / loaded, so it serialises without pickle.
    """

    def __init__(self, n_estimators: int = 300, learning_rate: float = 0.1, num_leaves: int = 15, min_child_samples: int = 10, subsample: float = 0.8, colsample_bytree: float = 0.5, reg_lambda: float = 1.0, max_bin: int = 63, early_stopping_rounds: int = 20, val_fraction: float = 0.1, n_jobs: int | None = None, random_state: int = 0):
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.reg_lambda = reg_lambda
        self.max_bin = max_bin
        self.early_stopping_rounds = early_stopping_rounds
        self.val_fraction = val_fraction
        self.n_jobs = n_jobs
        self.random_state = random_state

    def fit(self, X, y, groups=None):
        import lightgbm as lgb

        X, y = _validate(self, X, y)
        self.classes_, yi = _encode(y)
        stop = self.early_stopping_rounds and self.val_fraction > 0
        tr, va = holdout_indices(yi, None if groups is None else np.asarray(groups), self.val_fraction if stop else 0.0, self.random_state)
        if stop and (len(va) == 0 or len(np.unique(yi[tr])) < len(self.classes_)):
            tr, va, stop = np.arange(len(yi)), np.arange(0), False
        params = {
            "objective": "multiclass", "num_class": len(self.classes_), "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves, "min_data_in_leaf": self.min_child_samples, "bagging_fraction": self.subsample,
            "bagging_freq": 1 if self.subsample < 1 else 0, "feature_fraction": self.colsample_bytree, "lambda_l2": self.reg_lambda,
            "max_bin": self.max_bin, "num_threads": auto_threads(*X.shape, self.n_jobs), "seed": self.random_state, "verbose": -1,
        }  # fmt: skip
        # X[tr] copies; skip it when every row trains (no early stopping).
        dtrain = lgb.Dataset(X if len(tr) == len(yi) else X[tr], label=yi[tr], free_raw_data=True)
        kw: dict[str, Any] = {}
        if stop:
            dval = lgb.Dataset(X[va], label=yi[va], reference=dtrain)
            kw = {"valid_sets": [dval], "callbacks": [lgb.early_stopping(self.early_stopping_rounds, verbose=False)]}
        booster = lgb.train(params, dtrain, num_boost_round=self.n_estimators, **kw)
        self.best_iteration_ = int(booster.best_iteration or booster.current_iteration())
        self.model_str_ = booster.model_to_string(num_iteration=self.best_iteration_)
        self._booster = lgb.Booster(model_str=self.model_str_)
        return self

    def __getstate__(self):
        state = super().__getstate__().copy()
        state.pop("_booster", None)  # live C++ handle; rebuilt from model_str_
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if "model_str_" in state:
            import lightgbm as lgb

            self._booster = lgb.Booster(model_str=self.model_str_)

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self, "model_str_")
        X = _validate(self, X, reset=False)
        p = self._booster.predict(X, num_threads=auto_threads(*X.shape, self.n_jobs))
        return np.asarray(p, dtype=np.float64).reshape(len(X), len(self.classes_))

    def predict(self, X) -> np.ndarray:
        idx = self.predict_proba(X).argmax(axis=1)  # first: raises NotFittedError before classes_ is read
        return self.classes_[idx]

    @property
    def n_leaves_(self) -> int:
        return int(sum(t["num_leaves"] for t in self._booster.dump_model()["tree_info"]))


# ---------------------------------------------------------------------------------------------
# factory and search space

#: default hyper-parameters per head (what `embedkit fit` uses without --search)
DEFAULTS: dict[str, dict[str, Any]] = {
    # 50 L-BFGS iterations: on wide embeddings the later ones mostly fit noise and cost as much
    # as the first (bench, 38,400 x 2048: segment accuracy 0.747 after 50, 0.738 after 100,
    # 0.733 converged); on gtzan_mini (melstats, musicnn-msd) 50, 100 and 1000 give the same
    # CV accuracy. --search tunes C on validation tracks.
    "lr": {"C": 1.0, "max_iter": 50},
    "lgbm": {"n_estimators": 300, "learning_rate": 0.1, "num_leaves": 15},
    "mlp": {"hidden": (256,), "dropout": 0.2, "weight_decay": 1e-4},
}

#: small grids for --search (scored on the validation tracks of the training part only)
SEARCH_SPACE: dict[str, list[dict[str, Any]]] = {
    "lr": [{"C": c} for c in (0.01, 0.1, 1.0, 10.0)],
    "lgbm": [{"num_leaves": l, "learning_rate": r} for l, r in ((7, 0.1), (15, 0.1), (31, 0.1), (15, 0.05))],
    "mlp": [{"hidden": h, "weight_decay": w} for h in ((128,), (512,)) for w in (1e-4, 1e-2)],
}

_CLASSES = {"lr": Float32LogisticRegression, "lgbm": LGBMHead, "mlp": TorchMLP}


def _pca_solver() -> str:
    import sklearn

    major, minor = (int(v) for v in sklearn.__version__.split(".")[:2])
    return "covariance_eigh" if (major, minor) >= (1, 5) else "full"


def default_pca(head: str, dim: int) -> int | None:
    """PCA size used when none is asked for: LightGBM on wide embeddings only (its cost grows
    with the number of features; bench/bench_heads.py measures PCA-128 against raw 2048-d)."""
    return 128 if head == "lgbm" and dim > 256 else None


def make_head(head: str, params: dict[str, Any] | None = None, pca: int | None = None, seed: int = 0):
    """``Pipeline([("scale", BlockScaler), ("pca", PCA(pca))?, ("head", <head>)])``.

    head: "lr" | "lgbm" | "mlp". params: overrides of the head's hyper-parameters.
    pca: number of components (None / 0: no PCA). Fit the pipeline with
    ``fit(X, y, head__groups=track_ids)`` so early stopping holds out whole tracks.
    """
    from sklearn.decomposition import PCA
    from sklearn.pipeline import Pipeline

    if head not in _CLASSES:
        raise EmbedkitError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    cls = _CLASSES[head]
    kw = {**DEFAULTS[head], **(params or {})}
    if "random_state" in cls._get_param_names():
        kw["random_state"] = seed
    steps: list[tuple[str, Any]] = [("scale", BlockScaler())]
    if pca:
        # covariance_eigh: one X.T @ X product and a D x D eigendecomposition, exact, and 3-4x
        # faster than the randomized solver at 38,400 x 2048 (3.3 s vs 9-14 s, one core); it
        # neither copies nor modifies X. Whitening gives the linear/MLP heads unit-variance
        # inputs again.
        steps.append(("pca", PCA(int(pca), svd_solver=_pca_solver(), whiten=head != "lgbm", random_state=seed)))
    steps.append(("head", cls(**kw)))
    return Pipeline(steps)


def head_config(model) -> dict[str, Any]:
    """JSON-friendly hyper-parameters of a pipeline from :func:`make_head`."""
    out: dict[str, Any] = {"head": {k: _jsonable(v) for k, v in model.named_steps["head"].get_params().items()}}
    if "pca" in model.named_steps:
        p = model.named_steps["pca"]
        out["pca"] = {"n_components": p.n_components, "whiten": p.whiten}
    else:
        out["pca"] = None
    return out


def n_params(model) -> int | None:
    """Learned numbers of a fitted pipeline (scaler + PCA + head); None for tree ensembles."""
    h = model.named_steps["head"]
    if not hasattr(h, "n_params_"):
        return None
    total = h.n_params_ + 2 * model.named_steps["scale"].n_features_in_
    if "pca" in model.named_steps:
        total += model.named_steps["pca"].components_.size
    return int(total)


def _jsonable(v):
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    return v


# ---------------------------------------------------------------------------------------------
# bundles

#: every type a bundle may contain; anything else in a file is refused before it is built
#: (beyond skops' default trusted set: scikit-learn estimators, numpy arrays/scalars, builtins)
TRUSTED_TYPES = [
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
            raise ConfigMismatchError(f"embeddings have {X.shape[1]} dimensions; the head expects {dim} ({self.spec.get('name')})")
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

        from .evaluate import aggregate

        ids, mean, vote = aggregate(np.asarray(segment_track_ids), self.predict_proba(X))
        labels = np.asarray(self.labels)
        df = pd.DataFrame({"track_id": ids, "pred": labels[mean.argmax(axis=1)], "pred_vote": labels[vote], "confidence": mean.max(axis=1)})
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

    from .io import atomic_write_bytes

    meta = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, **bundle.meta()}
    data = sio.dumps({"format": BUNDLE_FORMAT, "meta": json.dumps(meta, default=_jsonable), "model": bundle.model})
    atomic_write_bytes(path, data)
    return len(data)


_SPEC_KEYS = ("name", "family", "sample_rate", "embedding_dim", "frontend", "weights_sha256", "outputs")


def _as_dict(obj) -> dict[str, Any]:
    if obj is None or isinstance(obj, dict):
        return obj
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return asdict(obj)


def load_bundle(path: str | os.PathLike, expect_spec=None, expect_preprocess=None, expect_weights_id: str | None = None) -> HeadBundle:
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
        raise ModelLoadingError(f"{p}: refusing to load; it contains types embedkit does not trust: {', '.join(extra[:5])}")
    try:
        obj = sio.loads(data, trusted=[t for t in untrusted])
    except Exception as exc:
        raise ModelLoadingError(f"{p}: cannot load head bundle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != BUNDLE_FORMAT:
        raise ModelLoadingError(f"{p}: not an embedkit head bundle")
    meta = json.loads(obj["meta"])
    if meta.get("version", 0) > BUNDLE_VERSION:
        raise ModelLoadingError(f"{p}: bundle version {meta['version']} is newer than this embedkit understands ({BUNDLE_VERSION})")
    names = {f for f in HeadBundle.__dataclass_fields__} - {"model", "path"}
    bundle = HeadBundle(model=obj["model"], path=str(p), **{k: v for k, v in meta.items() if k in names})
    spec = _as_dict(expect_spec)
    if spec is not None:
        for key in _SPEC_KEYS:
            a, b = _norm(bundle.spec.get(key)), _norm(spec.get(key))
            if a != b:
                raise ConfigMismatchError(f"{p}: head was trained on {bundle.spec.get('name')} embeddings ({key}={a!r}), not {spec.get('name')} ({key}={b!r})")
    if expect_weights_id is not None and expect_weights_id != bundle.weights_id:
        raise ConfigMismatchError(f"{p}: head was trained on {bundle.spec.get('name')} weights {bundle.weights_id}, these embeddings come from weights {expect_weights_id}")
    prep = _as_dict(expect_preprocess)
    if prep is not None and _norm(prep) != _norm(bundle.preprocess):
        raise ConfigMismatchError(f"{p}: head was trained with other preprocessing ({'; '.join(_diffs(bundle.preprocess, prep)[:4])})")
    return bundle


def _norm(v):
    """JSON round trip so tuples/lists and int/float spellings compare equal."""
    return json.loads(json.dumps(v, sort_keys=True, default=_jsonable))


def _diffs(a, b, prefix: str = "") -> list[str]:
    """Every differing leaf of two JSON-like trees, as 'path: trained A, given B'."""
    a, b = _norm(a), _norm(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) for d in _diffs(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [f"{prefix.rstrip('.')}: trained {a!r}, given {b!r}"]
