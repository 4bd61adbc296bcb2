"""``lr``: multinomial logistic regression fitted in float32 without copying X."""

from __future__ import annotations

import numpy as np

from .base import _encode, _NumpyClassifier, _validate, auto_threads


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
                res = minimize(
                    loss_grad,
                    np.zeros(d * k + k),
                    jac=True,
                    method="L-BFGS-B",
                    options={"maxiter": self.max_iter, "gtol": self.tol},
                )
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
