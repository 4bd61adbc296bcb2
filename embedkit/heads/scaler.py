"""``BlockScaler``: scikit-learn's StandardScaler with a bounded-memory ``fit``."""

from __future__ import annotations

import numpy as np
from sklearn.preprocessing import StandardScaler


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
