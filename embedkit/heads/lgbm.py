"""``lgbm``: a LightGBM booster with early stopping on held-out training groups."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from .base import _encode, _validate, auto_threads, holdout_indices


class LGBMHead(ClassifierMixin, BaseEstimator):
    """LightGBM multiclass booster with early stopping on held-out training groups.

    The fitted state is the booster's model text (``model_str_``), ``classes_`` and
    ``best_iteration_``; the live booster is rebuilt from the text when the estimator is
    unpickled / loaded, so it serialises without pickle.
    """

    def __init__(
        self,
        n_estimators: int = 300,
        learning_rate: float = 0.1,
        num_leaves: int = 15,
        min_child_samples: int = 10,
        subsample: float = 0.8,
        colsample_bytree: float = 0.5,
        reg_lambda: float = 1.0,
        max_bin: int = 63,
        early_stopping_rounds: int = 20,
        val_fraction: float = 0.1,
        n_jobs: int | None = None,
        random_state: int = 0,
    ):
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
        tr, va = holdout_indices(
            yi, None if groups is None else np.asarray(groups), self.val_fraction if stop else 0.0, self.random_state
        )
        if stop and (len(va) == 0 or len(np.unique(yi[tr])) < len(self.classes_)):
            tr, va, stop = np.arange(len(yi)), np.arange(0), False
        params = {
            "objective": "multiclass",
            "num_class": len(self.classes_),
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_child_samples,
            "bagging_fraction": self.subsample,
            "bagging_freq": 1 if self.subsample < 1 else 0,
            "feature_fraction": self.colsample_bytree,
            "lambda_l2": self.reg_lambda,
            "max_bin": self.max_bin,
            "num_threads": auto_threads(*X.shape, self.n_jobs),
            "seed": self.random_state,
            "verbose": -1,
        }
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
