""" "Not music": the detector, its threshold stored with every run kind, the decision it makes, and
runs made before it existed. The decision through every door is tests/test_doors.py's."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from embedkit.calibration import (
    CALIBRATION_FILE,
    NOT_MUSIC,
    Calibration,
    DecisionRule,
    NotMusicDetector,
    decide,
    fit_not_music,
    load_calibration,
)
from embedkit.errors import CalibrationError

LABELS = ["a", "b", "c"]


def _music(rng, n=200, d=16):
    """Post-ReLU-like embeddings of "music" windows: a low-rank structure plus noise."""
    basis = rng.standard_normal((4, d))
    return np.maximum(rng.standard_normal((n, 4)) @ basis + 0.3 * rng.standard_normal((n, d)) + 1.0, 0)


def test_the_detector_scores_unlike_windows_higher_and_survives_a_round_trip(rng):
    pool = _music(rng, 250)
    train = pool[:200]
    det = NotMusicDetector.fit(train)
    near = det.score(pool[200:])  # unseen windows of the same music
    far = det.score(np.abs(rng.standard_normal((50, 16))) * 8)
    assert near.mean() < 2 and far.min() > near.max()
    again = NotMusicDetector.from_dict(json.loads(json.dumps(det.to_dict())))
    assert again == det
    np.testing.assert_allclose(again.score(train[:10]), det.score(train[:10]), rtol=1e-6)
    with pytest.raises(CalibrationError, match=r"embeddings \[K, 16\]"):
        det.score(train[:, :8])


def test_wide_embeddings_are_projected(rng):
    det = NotMusicDetector.fit(rng.standard_normal((120, 100)), max_dim=16)
    assert det.proj.shape == (100, 16) and det.precision.shape == (16, 16)
    assert NotMusicDetector.from_dict(det.to_dict()) == det
    assert det.score(rng.standard_normal((3, 100))).shape == (3,)


def test_not_music_comes_before_uncertain_and_genres():
    p = np.array([0.9, 0.05, 0.05])
    rule = DecisionRule(threshold=0.5, not_music=2.0)
    assert decide(p, LABELS, rule, 2.0).label == NOT_MUSIC  # at the threshold: not music
    d = decide(p, LABELS, rule, 2.0)
    assert d.genres == [] and d.not_music == 2.0 and d.confidence == 0.9
    assert decide(p, LABELS, rule, 1.99).label == "a"
    assert decide(np.array([0.4, 0.3, 0.3]), LABELS, rule, 3.0).label == NOT_MUSIC
    assert decide(p, LABELS, rule, None).label == "a"  # no score (a model without a detector)
    assert decide(p, LABELS, DecisionRule(), 99.0).label == "a"  # no threshold: never not-music
    assert DecisionRule.from_dict(rule.to_dict()) == rule
    with pytest.raises(CalibrationError, match="not_music must be a number"):
        DecisionRule.from_dict({"not_music": "high"})


def test_the_threshold_is_chosen_on_held_out_tracks(rng):
    feats = {f"t{i}": _music(rng, 6) for i in range(40)}
    parts = {t: f"fold{i % 4}" for i, t in enumerate(feats)}
    det, t, block = fit_not_music(feats, parts, "test")
    assert det is not None and t > 0 and block["held_out"]["n_tracks"] == 40
    assert block["held_out"]["flagged"] <= 0.05  # the 99 % quantile of held-out music scores
    none = fit_not_music(feats, {}, "test")  # nothing held out: no detector, said why
    assert none[:2] == (None, None) and "no held-out" in none[2]["why_none"]


def test_a_calibration_with_a_threshold_but_no_detector_is_refused():
    d = Calibration(labels=LABELS, method="none").to_dict()
    d["rule"]["not_music"] = 1.5
    with pytest.raises(CalibrationError, match="without its detector"):
        Calibration.from_dict(d)


@pytest.mark.parametrize("kind", ["head", "mlp", "cnn", "finetune"])
def test_every_run_kind_stores_its_detector_and_threshold(runs, kind):
    from embedkit.deploy.tagger import load_tagger

    run = runs[kind]
    metrics = json.loads((run / "metrics.json").read_text())
    block = metrics["calibration"]["not_music"]
    cal = load_calibration(run)
    assert cal.detector is not None and cal.rule.not_music == block["threshold"] > 0
    assert block["held_out"]["n_tracks"] >= 4 and cal.fitted_on["prior"]
    t = load_tagger(run)
    x = np.random.default_rng(0).standard_normal((3, t.window_samples)).astype(np.float32) * 0.1
    p, s = t.score_segments(x)
    assert p.shape == (3, len(t.labels)) and s.shape == (3,) and np.isfinite(s).all()
    np.testing.assert_allclose(p, t.predict_segments(x), atol=1e-6)  # the same forward


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cnn", "finetune", "mlp", "lgbm"])
def test_onnx_carries_the_detector_for_every_kind(runs, kind, tmp_path):
    """Every kind's ONNX file scores and decides not-music as its torch form does; LightGBM's
    trees are a separate graph, so there the embedding output comes from the torch front."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from embedkit.deploy.onnx_export import export_onnx
    from embedkit.deploy.onnx_runtime import OnnxTagger, read_metadata
    from embedkit.deploy.tagger import load_tagger

    if kind == "lgbm":
        pytest.importorskip("onnxmltools")
        from embedkit.fit import fit_head

        run = fit_head("tiny-test", "lgbm", cache=runs["cache"], runs=tmp_path / "runs", params={"n_estimators": 5})
        t = load_tagger(run.run_dir)
    else:
        t = load_tagger(runs[kind])
    assert t.has_not_music
    export_onnx(t, tmp_path / "m.onnx")
    meta = read_metadata(tmp_path / "m.onnx")
    assert "embedding" in meta["outputs"] and meta["thresholds"]["not_music"] == t.rule.not_music
    o = OnnxTagger.load(tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((2, t.window_samples)).astype(np.float32) * 0.1
    (p, s), (q, r) = t.score_segments(x), o.score_segments(x)
    np.testing.assert_allclose(q, p, atol=1e-5)
    np.testing.assert_allclose(r, s, rtol=1e-3)


def test_a_run_made_before_the_detector_still_loads_and_never_decides_not_music(runs, tmp_path):
    from embedkit.deploy.batch import tag
    from embedkit.deploy.tagger import load_tagger

    old = tmp_path / "old"
    shutil.copytree(runs["head"], old)
    cal = json.loads((old / CALIBRATION_FILE).read_text())
    cal.pop("not_music")
    cal["rule"].pop("not_music")
    (old / CALIBRATION_FILE).write_text(json.dumps(cal))
    t = load_tagger(old)
    assert not t.has_not_music and t.rule.not_music is None
    clip = sorted(runs["data"].glob("*/*.wav"))[0]
    res = tag(old, [clip], workers=1)
    assert res.rows[0].not_music is None and res.rows[0].decision != NOT_MUSIC
    assert res.rows[0].to_json()["not_music"] is None


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["melstats", "panns-cnn10"])
def test_heads_on_other_backbones_store_a_detector(backbone, tracks, panns_checkpoint, tmp_path):
    """melstats (signed features: the signed log keeps them) and PANNs Cnn10 (512-d: projected
    onto 256 principal directions) give a detector, a threshold, and scores through `tag`."""
    from embedkit.deploy.batch import tag
    from embedkit.extract import extract
    from embedkit.fit import fit_head

    ckpt = str(panns_checkpoint("cnn10")) if backbone.startswith("panns") else None
    extract(tracks, backbone, cache=tmp_path / "cache", checkpoint=ckpt, workers=2)
    run = fit_head(backbone, "lr", cache=tmp_path / "cache", runs=tmp_path / "runs").run_dir
    cal = load_calibration(run)
    assert cal.detector is not None and cal.rule.not_music > 0
    assert (cal.detector.proj is not None) == backbone.startswith("panns")
    rows = tag(run, list(tracks["path"][:3]), workers=1, checkpoint=ckpt).rows
    assert all(r.not_music is not None and np.isfinite(r.not_music) for r in rows)
