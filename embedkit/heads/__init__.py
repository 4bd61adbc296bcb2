"""Light classifier heads on cached segment embeddings, and the head bundle they ship in.

Three heads, each a scikit-learn estimator (hyper-parameters in ``__init__``, ``fit`` returns
self, ``classes_``, ``predict_proba``), so ``Pipeline``, ``clone`` and model selection just work;
one estimator family per module (scikit-learn's layout):

- ``lr``   :class:`Float32LogisticRegression` (``linear.py``) - multinomial L2 logistic
  regression with scikit-learn's objective and ``C``, solved by scipy's L-BFGS-B on float32 X
  in place. Why not ``sklearn.linear_model.LogisticRegression``: it converts X to float64 (a
  copy twice the size of the float32 embedding matrix) and is several times slower at
  FMA-small scale (bench/bench_heads.py measures both in the same run).
- ``lgbm`` :class:`LGBMHead` (``lgbm.py``) - LightGBM with early stopping on a held-out part of
  the training tracks; by default on a PCA projection when the embedding is wide (trees on
  2048 raw dimensions cost an order of magnitude more, for no accuracy: bench/bench_heads.py).
- ``mlp``  :class:`TorchMLP` (``mlp.py``) - one hidden layer, AdamW, early stopping with
  best-epoch restore on a held-out part of the training *tracks*.

``scaler.py``: :class:`BlockScaler`; ``fused.py``: heads on fused backbones (per-part scaling,
stacking); ``base.py``: input validation, the early-stopping split
and thread heuristics the heads share; ``factory.py``: :func:`make_head` wraps a head in
``Pipeline([scale, (pca), head])`` (normalisation and PCA statistics come from whatever ``fit``
sees, which the trainer, :mod:`embedkit.fit`, restricts to the training tracks), with the
defaults and the search space; ``bundle.py``: the head bundle and its safe loading. Fitted state
is plain numpy (and, for LightGBM, the model text), so ``predict_proba`` needs neither torch nor
a live booster, and the bundle stays safe to load.
"""

from .base import SMALL_PROBLEM, auto_threads, holdout_indices, n_cpus
from .bundle import BUNDLE_FILE, BUNDLE_FORMAT, BUNDLE_VERSION, TRUSTED_TYPES, HeadBundle, load_bundle, save_bundle
from .factory import DEFAULTS, HEADS, SEARCH_SPACE, default_pca, head_config, make_head, n_params
from .fused import FUSIONS, PartScaler, StackedHead, fusion_pipeline
from .lgbm import LGBMHead
from .linear import Float32LogisticRegression
from .mlp import TorchMLP
from .scaler import BlockScaler

__all__ = [
    "BUNDLE_FILE",
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "DEFAULTS",
    "FUSIONS",
    "PartScaler",
    "StackedHead",
    "HEADS",
    "SEARCH_SPACE",
    "SMALL_PROBLEM",
    "TRUSTED_TYPES",
    "BlockScaler",
    "Float32LogisticRegression",
    "HeadBundle",
    "LGBMHead",
    "TorchMLP",
    "auto_threads",
    "default_pca",
    "head_config",
    "holdout_indices",
    "load_bundle",
    "make_head",
    "fusion_pipeline",
    "n_cpus",
    "n_params",
    "save_bundle",
]
