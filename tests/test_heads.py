"""Heads as scikit-learn estimators, their memory behaviour, and head bundles."""

import tracemalloc
import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from embedkit.config import PreprocessConfig, SegmentConfig
from embedkit.errors import ConfigMismatchError, EmbedkitError, ModelLoadingError
from embedkit.heads import (
    HEADS,
    BlockScaler,
    Float32LogisticRegression,
    HeadBundle,
    LGBMHead,
    TorchMLP,
    default_pca,
    holdout_indices,
    load_bundle,
    make_head,
    n_params,
    save_bundle,
)

FAST = {"lr": {}, "lgbm": {"n_estimators": 40}, "mlp": {"max_epochs": 15}}


def blobs(rng, n_tracks=60, seg=4, dim=16, n_classes=3, sep=2.0):
    """Segment embeddings with track structure: (X float32, y str, track ids)."""
    means = rng.standard_normal((n_classes, dim)) * sep
    yt = np.arange(n_tracks) % n_classes
    tracks = np.repeat(np.arange(n_tracks), seg)
    X = means[yt[tracks]] + 0.7 * rng.standard_normal((n_tracks, dim))[tracks] + rng.standard_normal((len(tracks), dim))
    labels = np.array(["blues", "jazz", "rock", "pop", "metal"])[:n_classes]
    return X.astype(np.float32), labels[yt[tracks]], np.array([f"t{t:03d}" for t in tracks])


@pytest.mark.parametrize(
    "est",
    [Float32LogisticRegression(), TorchMLP(max_epochs=5), LGBMHead(n_estimators=20), BlockScaler()],
    ids=lambda e: type(e).__name__,
)
@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_heads_pass_sklearn_estimator_checks(est):
    from sklearn.utils.estimator_checks import check_estimator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(est, on_fail=None)
    failed = [f"{r['check_name']}: {str(r['exception'])[:200]}" for r in results if r["status"] == "failed"]
    assert len(results) > 40 and not failed, failed


@pytest.mark.parametrize("head", HEADS)
def test_pipeline_fit_predict_clone(head, rng):
    X, y, g = blobs(rng)
    model = make_head(head, FAST[head])
    assert model.fit(X, y, head__groups=g) is model
    assert list(model.classes_) == ["blues", "jazz", "rock"]
    P = model.predict_proba(X)
    assert P.shape == (len(X), 3) and np.allclose(P.sum(axis=1), 1)
    assert (model.predict(X) == y).mean() > 0.8
    twin = clone(model)
    assert twin.get_params()["head"].get_params() == model.get_params()["head"].get_params()
    assert not hasattr(twin.named_steps["head"], "classes_")


def test_lr_matches_sklearn_logistic_regression(rng):
    X = rng.standard_normal((1500, 20)).astype(np.float32)
    y = (X @ rng.standard_normal((20, 4)) + 2 * rng.standard_normal((1500, 4))).argmax(axis=1)
    for C in (0.05, 1.0):
        ours = Float32LogisticRegression(C=C, tol=1e-6, max_iter=1000).fit(X, y)
        ref = LogisticRegression(C=C, tol=1e-8, max_iter=5000).fit(X.astype(np.float64), y)
        assert ours.converged_
        np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=5e-4)
        # the threaded row-chunk evaluation gives the same model as one thread
        two = Float32LogisticRegression(C=C, tol=1e-6, max_iter=1000, n_jobs=2).fit(X, y)
        np.testing.assert_allclose(two.predict_proba(X), ours.predict_proba(X), atol=5e-4)


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_fit_makes_no_float64_copy_of_the_embeddings(rng):
    X = rng.standard_normal((12000, 256)).astype(np.float32)  # 12 MB
    y = rng.integers(0, 4, len(X))
    # scikit-learn's scaler allocates X - mean in float64 (2x X); ours streams in blocks
    assert _peak_bytes(lambda: StandardScaler().fit(X)) > 1.5 * X.nbytes
    # its temporaries scale with the block (1024 rows here), not with X
    assert _peak_bytes(lambda: BlockScaler(block_rows=1024).fit(X)) < 3 * 1024 * 256 * 8 < 0.6 * X.nbytes
    assert _peak_bytes(lambda: Float32LogisticRegression(max_iter=5).fit(X, y)) < 0.3 * X.nbytes
    # the whole lr pipeline: one float32 standardised copy, nothing more
    assert _peak_bytes(lambda: make_head("lr", {"max_iter": 5}).fit(X, y)) < 1.3 * X.nbytes


def test_block_scaler_equals_standard_scaler(rng):
    X = (rng.standard_normal((10001, 7)) * [1, 10, 100, 0.1, 5, 1e3, 1] + 50).astype(np.float32)
    a, b = BlockScaler(block_rows=1000).fit(X), StandardScaler().fit(X)
    np.testing.assert_allclose(a.mean_, b.mean_, rtol=1e-6)
    np.testing.assert_allclose(a.scale_, b.scale_, rtol=1e-5)
    assert a.n_samples_seen_ == b.n_samples_seen_ == 10001
    assert a.transform(X).dtype == np.float32


def test_holdout_indices_keep_groups_whole(rng):
    y = np.repeat(np.arange(30) % 3, 5)
    groups = np.repeat(np.arange(30), 5)
    tr, va = holdout_indices(y, groups, 0.2, seed=0)
    assert len(va) and not set(groups[tr]) & set(groups[va])
    assert sorted(np.concatenate([tr, va])) == list(range(len(y)))


@pytest.mark.slow
def test_mlp_learns_what_a_linear_head_cannot(rng):
    X = rng.uniform(-1, 1, (3000, 2)).astype(np.float32)
    y = np.where(X[:, 0] * X[:, 1] > 0, "a", "b")  # XOR: no linear separation
    lin = make_head("lr").fit(X, y)
    mlp = make_head("mlp", {"hidden": (64,), "max_epochs": 200, "patience": 10, "lr": 3e-3}).fit(X, y)
    assert (lin.predict(X) == y).mean() < 0.7
    assert (mlp.predict(X) == y).mean() > 0.93
    h = mlp.named_steps["head"]
    assert h.n_epochs_ == len(h.loss_curve_) and 0 <= h.best_epoch_ < h.n_epochs_


def test_mlp_early_stopping_restores_the_best_epoch(rng):
    X, y, g = blobs(rng, n_tracks=80, dim=64, sep=0.4)  # small noisy set: overfits quickly
    h = TorchMLP(hidden=(256,), max_epochs=100, patience=3, lr=1e-2).fit(X, y, groups=g)
    assert h.n_epochs_ < 100 and h.n_epochs_ == h.best_epoch_ + 1 + 3
    assert min(h.val_loss_curve_) == h.val_loss_curve_[h.best_epoch_]


def test_lgbm_early_stopping_and_model_text(rng):
    X, y, g = blobs(rng, n_tracks=80, dim=8, sep=0.6)
    h = LGBMHead(n_estimators=400, learning_rate=0.3).fit(X, y, groups=g)
    assert 1 <= h.best_iteration_ < 400
    assert "Tree=0" in h.model_str_ and "_booster" not in h.__getstate__()
    import copy

    np.testing.assert_array_equal(copy.deepcopy(h).predict_proba(X), h.predict_proba(X))


def test_pca_and_param_counts(rng):
    X, y, g = blobs(rng, dim=40)
    m = make_head("lr", pca=8).fit(X, y)
    assert m.named_steps["pca"].n_components_ == 8 and m.named_steps["pca"].whiten
    assert n_params(m) == 8 * 3 + 3 + 8 * 40 + 2 * 40
    assert n_params(make_head("lgbm", FAST["lgbm"]).fit(X, y)) is None
    assert default_pca("lgbm", 2048) == 128 and default_pca("lgbm", 200) is None and default_pca("lr", 2048) is None
    with pytest.raises(EmbedkitError, match="unknown head"):
        make_head("svm")


# ---------------------------------------------------------------------------------------------
# bundles

SPEC = {
    "name": "tiny-test",
    "family": "tiny",
    "sample_rate": 16000,
    "embedding_dim": 16,
    "frontend": {"n_mels": 32},
    "weights_sha256": None,
    "outputs": [],
}


def _bundle(model, labels) -> HeadBundle:
    return HeadBundle(
        model=model,
        labels=labels,
        head="lr",
        spec=SPEC,
        preprocess=PreprocessConfig().to_dict(),
        weights_id="abc123",
        scores={"track_accuracy": 0.9},
        trained_on={"track_ids": ["t001"]},
    )


@pytest.mark.parametrize("head", HEADS)
def test_bundle_round_trip(head, rng, tmp_path):
    X, y, g = blobs(rng)
    model = make_head(head, FAST[head], pca=6 if head == "mlp" else None).fit(X, y, head__groups=g)
    size = save_bundle(tmp_path / "head.skops", _bundle(model, ["blues", "jazz", "rock"]))
    assert size == (tmp_path / "head.skops").stat().st_size
    b = load_bundle(tmp_path, expect_spec=SPEC, expect_preprocess=PreprocessConfig(), expect_weights_id="abc123")
    np.testing.assert_array_equal(b.predict_proba(X), model.predict_proba(X))
    assert b.scores["track_accuracy"] == 0.9 and b.weights_id == "abc123" and b.versions == {}
    df = b.predict_tracks(g, X)
    assert len(df) == 60 and (df["pred"].to_numpy() == y[::4]).mean() > 0.8


def test_bundle_labels_order_and_unseen_label(rng, tmp_path):
    X, y, g = blobs(rng)
    model = make_head("lr").fit(X, y)
    b = _bundle(model, ["rock", "blues", "metal", "jazz"])  # metal: not in the training data
    P = b.predict_proba(X)
    np.testing.assert_allclose(P[:, [1, 3, 0]], model.predict_proba(X))
    assert (P[:, 2] == 0).all()


def test_bundle_refuses_other_backbone_preprocessing_weights(rng, tmp_path):
    X, y, _ = blobs(rng)
    save_bundle(tmp_path / "head.skops", _bundle(make_head("lr").fit(X, y), ["blues", "jazz", "rock"]))
    from embedkit.backbones import get_spec

    with pytest.raises(
        ConfigMismatchError, match=r"trained on tiny-test embeddings \(name='tiny-test'\), not melstats"
    ):
        load_bundle(tmp_path / "head.skops", expect_spec=get_spec("melstats"))
    with pytest.raises(ConfigMismatchError, match="embedding_dim=16"):
        load_bundle(tmp_path / "head.skops", expect_spec={**SPEC, "embedding_dim": 32})
    with pytest.raises(ConfigMismatchError, match="segments.segment_s: trained 5.0, given 3.0"):
        load_bundle(tmp_path / "head.skops", expect_preprocess=PreprocessConfig(segments=SegmentConfig(3.0, 3.0)))
    with pytest.raises(ConfigMismatchError, match="weights abc123"):
        load_bundle(tmp_path / "head.skops", expect_weights_id="zzz")
    b = load_bundle(tmp_path / "head.skops")
    with pytest.raises(ConfigMismatchError, match="expects 16"):
        b.predict_proba(X[:, :8])


class NotTrusted:
    pass


def test_bundle_refuses_untrusted_or_foreign_files(tmp_path):
    import skops.io as sio

    (tmp_path / "evil.skops").write_bytes(
        sio.dumps({"format": "embedkit-head-bundle", "meta": "{}", "model": NotTrusted()})
    )
    with pytest.raises(ModelLoadingError, match="does not trust: .*NotTrusted"):
        load_bundle(tmp_path / "evil.skops")
    (tmp_path / "junk.skops").write_bytes(b"not a zip")
    with pytest.raises(ModelLoadingError, match="not a head bundle"):
        load_bundle(tmp_path / "junk.skops")
    (tmp_path / "other.skops").write_bytes(sio.dumps({"a": 1}))
    with pytest.raises(ModelLoadingError, match="not an embedkit head bundle"):
        load_bundle(tmp_path / "other.skops")
    with pytest.raises(ModelLoadingError, match="no head bundle"):
        load_bundle(tmp_path / "missing")


def test_a_bundle_written_by_embedkit_0_1_0_still_loads_and_predicts_the_same():
    """Bundles name their types by module; 0.1.0 had one heads.py (embedkit.heads.<Class>). The
    heads/ package re-exports those names and trusts them, so such a file loads unchanged."""
    from conftest import DATA

    b = load_bundle(DATA / "head-0.1.0-lr.skops")
    expected = np.load(DATA / "head-0.1.0-expected.npz")
    assert (
        type(b.model.named_steps["head"]) is Float32LogisticRegression
        and type(b.model.named_steps["scale"]) is BlockScaler
    )
    np.testing.assert_allclose(b.predict_proba(expected["X"]), expected["lr"], rtol=0, atol=1e-12)
