"""`embedkit fit` / `fit_head`: split invariants, vote aggregation, run artefacts, bundles on
stores, and every bad input through the CLI."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from embedkit.backbones import get_spec
from embedkit.cli import app
from embedkit.config import PreprocessConfig, SegmentConfig
from embedkit.errors import ConfigMismatchError, DatasetError, StoreError
from embedkit.evaluate import aggregate
from embedkit.fit import fit_head, predict_store
from embedkit.heads import load_bundle
from embedkit.store import Store

from conftest import GTZAN, needs_shared

runner = CliRunner()

METRIC_FIELDS = [
    "run_id",
    "kind",
    "name",
    "backbone",
    "head",
    "protocol",
    "dataset",
    "labels",
    "track_accuracy",
    "track_accuracy_vote",
    "track_accuracy_mean_prob",
    "segment_accuracy",
    "per_class",
    "confusion",
    "misclassified",
    "folds",
    "train_seconds",
    "inference_ms_per_track",
    "model_bytes",
    "n_params",
    "spec",
    "preprocess",
    "config",
    "versions",
    "created",
]


def write_store(
    cache,
    tracks,
    dim=32,
    seed=0,
    backbone="tiny-test",
    prep=PreprocessConfig(),
    weights_id="test",
    nan_track=None,
    shift=None,
    transform=None,
) -> Store:
    """A store written directly: ``tracks`` rows (track_id, label[, split][, group][, n]);
    embeddings = class mean + track offset + noise (learnable, not separable)."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    spec = get_spec(backbone)
    t = pd.DataFrame(tracks)
    labels = sorted(t["label"].unique())
    means = {l: rng.standard_normal(dim) * 1.5 for l in labels}
    rows, X = [], []
    for r in t.itertuples():
        n = getattr(r, "n", 3)
        off = rng.standard_normal(dim) * 0.5 + (shift.get(r.track_id, 0) if shift else 0)
        for s in range(n):
            rows.append(
                {
                    "track_id": r.track_id,
                    "path": f"/data/{r.label}/{r.track_id}.wav",
                    "label": r.label,
                    "split": getattr(r, "split", None),
                    "group": getattr(r, "group", None),
                    "segment": s,
                    "start_s": 5.0 * s,
                    "end_s": 5.0 * s + 5,
                }
            )
            X.append(means[r.label] + off + rng.standard_normal(dim))
    X = np.asarray(X, dtype=np.float32)
    if transform is not None:
        X = transform(pd.DataFrame(rows), X)
    if nan_track is not None:
        X[[i for i, r in enumerate(rows) if r["track_id"] == nan_track][0], 3] = np.nan
    st = Store.create(cache, spec, weights_id, prep)
    cols = {k: pa.array([r[k] for r in rows], pa.string()) for k in ("track_id", "path", "label", "split", "group")}
    cols["fingerprint"] = pa.array(
        [f"b3-fp-{r['track_id']}" for r in rows], pa.string()
    )  # stands in for the content hash (identity.SCHEME)
    cols["segment"] = pa.array([r["segment"] for r in rows], pa.int32())
    cols["start_s"] = pa.array([r["start_s"] for r in rows], pa.float64())
    cols["end_s"] = pa.array([r["end_s"] for r in rows], pa.float64())
    cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1), pa.float32()), dim)
    st.write_shard("segments", pa.table(cols), "0000")
    ds = pd.DataFrame(rows).drop_duplicates("track_id")[["track_id", "path", "label", "split", "group"]]
    ds = ds.assign(fingerprint="b3-fp-" + ds.track_id, real_path=ds.path, size=0, mtime_ns=0, inode=0)
    st.record_dataset(ds, "/data")  # what extract records: the dataset `fit` without DATA uses
    return st


def tracks_table(n_per_class=6, classes=("blues", "jazz", "rock"), **extra):
    return [
        {"track_id": f"{c}.{i:03d}", "label": c, **{k: f(c, i) for k, f in extra.items()}}
        for c in classes
        for i in range(n_per_class)
    ]


def invoke(*args):
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, res.output


def assert_clean_failure(code, out, runs: Path, pattern: str):
    assert code != 0
    lines = [l for l in out.strip().splitlines() if l.strip()]
    assert lines[-1].startswith("error:") and pattern in lines[-1], out
    assert "Traceback" not in out
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())


@pytest.fixture(scope="module")
def tiny_cache(tiny_store):
    """The synthetic dataset (4 classes x 5 clips) extracted with the tiny-test backbone (conftest's
    tiny_store, shared with the export and serve tests' run)."""
    return tiny_store


# ---------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_cli_fit_writes_a_complete_run(tiny_cache, synth_dataset, tmp_path):
    runs = tmp_path / "runs"
    code, out = invoke("fit", "--backbone", "tiny-test", "--head", "lr", "--cache", tiny_cache, "--runs", runs)
    assert code == 0, out
    (run,) = list(runs.iterdir())
    m = json.loads((run / "metrics.json").read_text())
    missing = [f for f in METRIC_FIELDS if f not in m]
    assert not missing
    assert m["kind"] == "head" and m["name"] == "tiny-test+lr" and m["backbone"] == "tiny-test" and m["head"] == "lr"
    assert m["protocol"]["type"] == "holdout" and m["protocol"]["test_size"] == 0.2
    assert m["labels"] == ["chime", "drone", "noise", "pulse"]
    assert m["dataset"]["n_tracks"] == 20 and m["dataset"]["synthetic"] is True
    assert m["spec"]["name"] == "tiny-test" and m["preprocess"]["segments"]["segment_s"] == 5.0
    assert m["model_bytes"] == (run / "head.skops").stat().st_size
    assert m["n_params"] == 4 * 32 + 4 + 2 * 32
    assert m["train_seconds"] > 0 and m["inference_ms_per_track"] > 0
    timing = json.loads((Path(m["store"]) / "extract_timing.json").read_text())  # written by extract()
    assert timing["tracks"] == 20 and m["extract_ms_per_track"] == pytest.approx(1000 * timing["seconds"] / 20)
    assert m["config"]["head"]["C"] == 1.0 and m["config"]["pca"] is None
    assert np.array(m["confusion"]).sum() == 4  # 20 % of 20 tracks, stratified
    assert set(m["per_class"]["drone"]) == {"precision", "recall", "f1", "support"}
    assert f"{m['track_accuracy']:.3f}" in out
    # the bundle predicts from the file alone, like the scores it was evaluated with
    b = load_bundle(run)
    st = Store(Path(m["store"]))
    seg, X = st.read()
    test_ids = set(pd.read_csv(run / "predictions.csv")["track_id"])
    assert not test_ids & set(b.trained_on["track_ids"])
    keep = seg["track_id"].isin(test_ids).to_numpy()
    df = b.predict_tracks(seg["track_id"][keep].to_numpy(), X[keep])
    assert (df["pred"] == df["track_id"].str.split("/").str[0]).mean() == pytest.approx(m["track_accuracy_mean_prob"])


@pytest.mark.parametrize("head", ["lr", "lgbm", "mlp"])
@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_cv_every_head_per_fold_figures(head, tmp_path):
    st = write_store(tmp_path / "cache", tracks_table(n_per_class=6))
    res = fit_head(
        "tiny-test",
        head,
        cache=tmp_path / "cache",
        runs=tmp_path / "runs",
        cv=3,
        params={"n_estimators": 50} if head == "lgbm" else None,
    )
    m = res.metrics
    assert [f["fold"] for f in m["folds"]] == ["fold0", "fold1", "fold2"]
    assert sum(f["n_test_tracks"] for f in m["folds"]) == 18
    for key in ("track_accuracy_vote", "track_accuracy_mean_prob", "segment_accuracy"):
        assert m[key] == pytest.approx(np.mean([f[key] for f in m["folds"]]))
        assert m[key + "_std"] == pytest.approx(np.std([f[key] for f in m["folds"]]))
    assert m["track_accuracy"] > 0.7  # learnable data
    assert m["train_seconds"] == pytest.approx(sum(f["train_seconds"] for f in m["folds"]))
    assert res.bundle.trained_on["n_tracks"] == 18  # refitted on every track after CV
    assert m["store"] == str(st.root)
    if head == "lgbm":
        assert m["n_params"] is None and m["n_leaves"] > 0
    else:
        assert m["n_params"] > 0


# ---------------------------------------------------------------------------------------------
# split invariants


class Spy:
    """Stands in for a head pipeline; records which tracks each fit / predict saw. Column 0 of X
    carries the track's number, so the record comes from the rows actually passed."""

    log: list = []

    def __init__(self, *a, **k):
        self.named_steps = {}

    def fit(self, X, y, head__groups=None):
        self.classes_ = np.unique(y)
        Spy.log.append(("fit", set(X[:, 0].astype(int)), set(np.asarray(head__groups))))
        return self

    def predict_proba(self, X):
        Spy.log.append(("predict", set(X[:, 0].astype(int)), len(X)))
        return np.full((len(X), len(self.classes_)), 1 / len(self.classes_))


def _spy_store(tmp_path, tracks):
    num = {t: i for i, t in enumerate(sorted(r["track_id"] for r in tracks))}

    def mark(rows, X):  # column 0 := the track's number (read back by the Spy)
        X[:, 0] = rows["track_id"].map(num).to_numpy()
        return X

    st = write_store(tmp_path / "cache", tracks, transform=mark)
    seg, _ = st.read()
    return st, {i: t for t, i in num.items()}, seg


@pytest.fixture
def spy(monkeypatch):
    import embedkit.fit as fitmod

    Spy.log = []
    monkeypatch.setattr(fitmod, "make_head", lambda *a, **k: Spy())
    monkeypatch.setattr(fitmod, "head_config", lambda m: {})
    monkeypatch.setattr(fitmod, "n_params", lambda m: None)
    monkeypatch.setattr(fitmod, "save_bundle", lambda path, b: Path(path).write_bytes(b"x") or 1)
    return Spy.log


def test_cv_folds_never_share_a_track_and_cover_every_segment(spy, tmp_path):
    st, name_of, seg = _spy_store(tmp_path, tracks_table(n_per_class=5))
    fit_head(store=st.root, head="lr", runs=tmp_path / "runs", cv=5)
    fits = [e for e in spy if e[0] == "fit"]
    preds = [e for e in spy if e[0] == "predict"]
    assert len(fits) == 6 and len(preds) == 5  # 5 folds + the refit on everything
    seen_test = []
    for (_, tr, _), (_, te, n_rows) in zip(fits[:5], preds):
        assert not tr & te
        assert n_rows == seg["track_id"].isin({name_of[i] for i in te}).sum()  # all segments of each test track
        seen_test += sorted(te)
    assert sorted(seen_test) == list(range(15))  # every track tested exactly once
    assert fits[5][1] == set(range(15))


def test_groups_never_straddle_train_and_test(spy, tmp_path):
    # 6 artists per class, 2 tracks each: an artist's tracks must stay together
    tracks = tracks_table(n_per_class=12, group=lambda c, i: f"{c}-artist{i // 2}")
    st, name_of, seg = _spy_store(tmp_path, tracks)
    group_of = dict(zip(seg["track_id"], seg["group"]))
    res = fit_head(store=st.root, head="lr", runs=tmp_path / "runs", cv=3)
    assert res.metrics["protocol"]["grouped"] is True
    fits = [e for e in spy if e[0] == "fit"]
    preds = [e for e in spy if e[0] == "predict"]
    for (_, tr, groups), (_, te, _) in zip(fits, preds):
        assert not {group_of[name_of[i]] for i in tr} & {group_of[name_of[i]] for i in te}
        assert groups <= {group_of[name_of[i]] for i in tr}  # early stopping holds out artists


def test_search_sees_only_the_training_part(spy, tmp_path):
    st, name_of, _ = _spy_store(tmp_path, tracks_table(n_per_class=10))
    fit_head(store=st.root, head="lr", runs=tmp_path / "runs", protocol="holdout", search=True)
    fits = [e[1] for e in spy if e[0] == "fit"]
    preds = [e[1] for e in spy if e[0] == "predict"]
    test = preds[-1]
    assert len(fits) == 4 + 1 and len(preds) == 4 + 1  # 4 grid points on val, then train -> test
    for f, p in zip(fits[:4], preds[:4]):
        assert not f & test and not p & test and not f & p  # fit on train-minus-val, score val
    assert fits[4] == fits[0] | preds[0] and not fits[4] & test


def test_normalisation_is_fitted_on_the_training_tracks_only(tmp_path):
    tracks = tracks_table(n_per_class=5)
    shift = {t["track_id"]: 50.0 for t in tracks[::2]}  # a big offset on half the tracks
    st = write_store(tmp_path / "cache", tracks, shift=shift)
    res = fit_head(store=st.root, head="lr", runs=tmp_path / "runs", protocol="holdout")
    seg, X = st.read()
    trained = seg["track_id"].isin(res.bundle.trained_on["track_ids"]).to_numpy()
    assert 0 < trained.sum() < len(seg)
    scaler = res.bundle.model.named_steps["scale"]
    np.testing.assert_allclose(scaler.mean_, X[trained].mean(axis=0), rtol=1e-5, atol=1e-4)
    assert np.abs(scaler.mean_ - X.mean(axis=0)).max() > 1e-3  # and not on all tracks


def test_seed_makes_splits_reproducible(tmp_path):
    st = write_store(tmp_path / "cache", tracks_table(n_per_class=10))
    a = fit_head(store=st.root, head="mlp", runs=tmp_path / "runs", seed=3)
    b = fit_head(store=st.root, head="mlp", runs=tmp_path / "runs", seed=3)
    c = fit_head(store=st.root, head="mlp", runs=tmp_path / "runs", seed=4)
    pa_, pb, pc = (pd.read_csv(r.run_dir / "predictions.csv") for r in (a, b, c))
    pd.testing.assert_frame_equal(pa_, pb)
    assert set(pa_["track_id"]) != set(pc["track_id"])
    assert a.metrics["folds"][0]["track_accuracy_mean_prob"] == b.metrics["folds"][0]["track_accuracy_mean_prob"]


# ---------------------------------------------------------------------------------------------
# aggregation


def test_vote_and_mean_probability_disagree_as_they_should():
    ids = np.array(["a", "a", "a", "b", "b"])
    P = np.array([[0.95, 0.05], [0.4, 0.6], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8]])
    uniq, mean, vote = aggregate(ids, P)
    assert list(uniq) == ["a", "b"]
    assert mean.argmax(1).tolist() == [0, 1]  # a: mean [0.583, 0.417]
    assert vote.tolist() == [1, 1]  # a: two segments of three say class 1
    # b: a 1-1 vote tie goes to the higher mean probability (class 1)


def test_metrics_agree_with_the_per_track_predictions(tmp_path):
    st = write_store(tmp_path / "cache", tracks_table(n_per_class=8), seed=5)
    res = fit_head(store=st.root, head="lr", runs=tmp_path / "runs", cv=4, params={"C": 0.01})
    p = pd.read_csv(res.run_dir / "predictions.csv")
    for f in res.metrics["folds"]:
        part = p[p["fold"] == f["fold"]]
        assert f["track_accuracy_vote"] == pytest.approx((part["pred_vote"] == part["true"]).mean())
        assert f["track_accuracy_mean_prob"] == pytest.approx((part["pred_mean"] == part["true"]).mean())
    conf = np.array(res.metrics["confusion"])
    assert np.trace(conf) == (p["pred_mean"] == p["true"]).sum() and conf.sum() == 24


# ---------------------------------------------------------------------------------------------
# protocols, restriction, extraction cost


def test_dataset_split_is_used_when_present(tmp_path):
    split = lambda c, i: "test" if i < 2 else "val" if i == 2 else "train"  # noqa: E731
    st = write_store(tmp_path / "cache", tracks_table(n_per_class=8, split=split))
    (st.root / "extract_timing.json").write_text(json.dumps({"seconds": 12.0, "tracks": 24}))
    res = fit_head(store=st.root, head="lr", runs=tmp_path / "runs")
    assert res.metrics["protocol"]["type"] == "split"
    assert res.metrics["folds"][0]["n_test_tracks"] == 6 and res.bundle.trained_on["n_tracks"] == 18  # train + val
    assert res.metrics["extract_ms_per_track"] == pytest.approx(500.0)
    res = fit_head(store=st.root, head="lr", runs=tmp_path / "runs", protocol="holdout")
    assert res.metrics["protocol"]["type"] == "holdout"


def test_data_argument_restricts_tracks_and_relabels(tmp_path):
    st = write_store(tmp_path / "cache", tracks_table(n_per_class=6, classes=("blues", "jazz", "rock", "pop")))
    seg, _ = st.read()
    sub = seg.drop_duplicates("track_id")
    sub = sub[sub["label"] != "pop"].copy()
    sub.attrs["source"] = "subset.csv"
    res = fit_head(store=st.root, head="lr", tracks=sub, runs=tmp_path / "runs", cv=3)
    assert res.metrics["labels"] == ["blues", "jazz", "rock"] and res.metrics["dataset"]["n_tracks"] == 18
    assert res.metrics["dataset"]["source"] == "subset.csv"


# ---------------------------------------------------------------------------------------------
# bad input: one clear line, non-zero exit, nothing written


def test_no_store_for_the_backbone(tmp_path):
    runs = tmp_path / "runs"
    code, out = invoke("fit", "--backbone", "melstats", "--cache", tmp_path / "empty", "--runs", runs)
    assert_clean_failure(code, out, runs, "no embedding store for backbone 'melstats'")


def test_store_with_one_class(tmp_path):
    write_store(tmp_path / "cache", tracks_table(n_per_class=6, classes=("blues",)))
    runs = tmp_path / "runs"
    code, out = invoke("fit", "-b", "tiny-test", "--cache", tmp_path / "cache", "--runs", runs)
    assert_clean_failure(code, out, runs, "only one class (blues)")


def test_class_with_fewer_tracks_than_folds(tmp_path):
    tracks = tracks_table(n_per_class=6) + [{"track_id": f"pop.{i}", "label": "pop"} for i in range(3)]
    write_store(tmp_path / "cache", tracks)
    runs = tmp_path / "runs"
    code, out = invoke("fit", "-b", "tiny-test", "--cv", 5, "--cache", tmp_path / "cache", "--runs", runs)
    assert_clean_failure(code, out, runs, "class 'pop' has 3 track(s), fewer than the 5")


def test_labels_only_in_test(tmp_path):
    tracks = tracks_table(n_per_class=6, split=lambda c, i: "test" if i < 2 else "train")
    tracks += [{"track_id": f"pop.{i}", "label": "pop", "split": "test"} for i in range(2)]
    write_store(tmp_path / "cache", tracks)
    runs = tmp_path / "runs"
    code, out = invoke("fit", "-b", "tiny-test", "--split", "--cache", tmp_path / "cache", "--runs", runs)
    assert_clean_failure(code, out, runs, "label(s) ['pop'] appear only in the test split")


def test_nan_embeddings(tmp_path):
    write_store(tmp_path / "cache", tracks_table(n_per_class=6), nan_track="jazz.003")
    runs = tmp_path / "runs"
    code, out = invoke("fit", "-b", "tiny-test", "--cache", tmp_path / "cache", "--runs", runs)
    assert_clean_failure(code, out, runs, "1 segment(s) of 1 track(s) have NaN/inf embeddings (first: jazz.003)")


def test_bundle_from_another_backbone_or_preprocessing(tmp_path):
    tiny = write_store(tmp_path / "cache", tracks_table(n_per_class=6))
    res = fit_head(store=tiny.root, head="lr", runs=tmp_path / "runs")
    other = write_store(
        tmp_path / "cache", tracks_table(n_per_class=6), dim=get_spec("melstats").embedding_dim, backbone="melstats"
    )
    code, out = invoke("predict", res.run_dir, "--store", other.root)
    assert (
        code != 0
        and out.strip().splitlines()[-1].startswith("error:")
        and "trained on tiny-test embeddings (name='tiny-test'), not melstats" in out
    )
    three = write_store(
        tmp_path / "cache", tracks_table(n_per_class=6), prep=PreprocessConfig(segments=SegmentConfig(3.0, 3.0))
    )
    code, out = invoke("predict", res.run_dir, "--store", three.root)
    assert (
        code != 0
        and "other preprocessing (segments.hop_s: trained 5.0, given 3.0; segments.segment_s: trained 5.0, given 3.0)"
        in out
    )
    with pytest.raises(ConfigMismatchError):
        predict_store(res.run_dir, store=three.root)
    # the right store works, and says which tracks the head was trained on
    out_csv = tmp_path / "pred.csv"
    code, out = invoke("predict", res.run_dir, "--store", tiny.root, "-o", out_csv)
    assert code == 0, out
    df = pd.read_csv(out_csv)
    assert len(df) == 18 and df["in_training"].sum() == res.bundle.trained_on["n_tracks"] == 14
    assert {"p_blues", "p_jazz", "p_rock", "pred", "pred_vote", "confidence"} <= set(df.columns)


def test_store_of_another_backbone_is_refused(tmp_path):
    st = write_store(tmp_path / "cache", tracks_table(n_per_class=6))
    runs = tmp_path / "runs"
    code, out = invoke("fit", "-b", "melstats", "--store", st.root, "--runs", runs)
    assert_clean_failure(code, out, runs, "store holds tiny-test embeddings, not melstats")


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--head", "svm"], "unknown head 'svm'"),
        (["--cv", "5", "--split"], "choose one protocol"),
        (["--cv", "1"], "--cv needs K >= 2"),
        (["--holdout", "1.5"], "--holdout needs a fraction"),
        (["--pca", "-1"], "--pca must be >= 0"),
        (["--split"], "protocol 'split' needs a split column"),
    ],
)
def test_bad_options(tmp_path, args, pattern):
    write_store(tmp_path / "cache", tracks_table(n_per_class=6))
    runs = tmp_path / "runs"
    code, out = invoke("fit", "-b", "tiny-test", "--cache", tmp_path / "cache", "--runs", runs, *args)
    assert_clean_failure(code, out, runs, pattern)


def test_failure_while_writing_leaves_no_run(tmp_path, monkeypatch):
    import embedkit.fit as fitmod

    st = write_store(tmp_path / "cache", tracks_table(n_per_class=6))

    def broken(path, bundle):
        Path(path).write_bytes(b"half a bundle")
        raise OSError("disk full")

    monkeypatch.setattr(fitmod, "save_bundle", broken)
    with pytest.raises(OSError):
        fit_head(store=st.root, runs=tmp_path / "runs")
    assert not any((tmp_path / "runs").iterdir())


def test_store_errors_are_store_errors(tmp_path):
    with pytest.raises(StoreError, match="not an embedkit store"):
        fit_head(store=tmp_path, runs=tmp_path / "runs")
    write_store(tmp_path / "cache", tracks_table(n_per_class=6))
    tracks = pd.DataFrame(
        {"track_id": ["x"], "path": ["/elsewhere/x.wav"], "label": ["a"], "split": [None], "group": [None]}
    )
    with pytest.raises(DatasetError, match="none of the 1 tracks"):
        fit_head("tiny-test", cache=tmp_path / "cache", tracks=tracks, runs=tmp_path / "runs")


# ---------------------------------------------------------------------------------------------
# real data (small): 4 gtzan genres, 10 s of each clip, melstats, 5-fold CV


@pytest.mark.slow
@needs_shared
def test_gtzan_subset_melstats_lr_is_well_above_chance(tmp_path):
    from embedkit.config import AudioConfig
    from embedkit.datasets import load_dataset
    from embedkit.extract import extract

    tracks = load_dataset(GTZAN)
    tracks = tracks[tracks["label"].isin(["blues", "classical", "metal", "hiphop"])].reset_index(drop=True)
    tracks.attrs["source"] = str(GTZAN)
    extract(tracks, "melstats", cache=tmp_path / "cache", prep=PreprocessConfig(AudioConfig(clip_s=10.0)), workers=2)
    res = fit_head("melstats", "lr", cache=tmp_path / "cache", tracks=tracks, runs=tmp_path / "runs", cv=5)
    m = res.metrics
    assert m["dataset"]["n_tracks"] == 40 and m["dataset"]["synthetic"] is False
    assert m["track_accuracy"] > 0.6, m["track_accuracy"]  # chance: 0.25
