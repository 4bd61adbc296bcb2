"""The heads by name: defaults, the --search grid and ``make_head`` (scaler, PCA, head)."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .lgbm import LGBMHead
from .linear import Float32LogisticRegression
from .mlp import TorchMLP
from .scaler import BlockScaler

HEADS = ("lr", "lgbm", "mlp")

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
    (Heads on fused embeddings: ``heads.fused.fusion_pipeline``, which builds on this.)
    """
    from sklearn.decomposition import PCA
    from sklearn.pipeline import Pipeline

    if head not in _CLASSES:
        raise ConfigError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}", field="head")
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
    from ..io import plain

    out: dict[str, Any] = {"head": {k: plain(v) for k, v in model.named_steps["head"].get_params().items()}}
    scale = model.named_steps.get("scale")
    if hasattr(scale, "part_weights_"):  # a fused concat head: the weight of each part's block
        out["part_weights"] = [float(w) for w in scale.part_weights_]
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
