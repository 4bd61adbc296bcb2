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
    modulation_depth,
)
from embedkit.errors import CalibrationError

from conftest import GTZAN, needs_shared  # noqa: E402

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


SR = 16000


def _noise(rng, color: str, seconds: float = 5.0) -> np.ndarray:
    n = int(seconds * SR)
    f = np.fft.rfftfreq(n, 1 / SR)
    f[0] = f[1]
    shape = {"white": np.ones_like(f), "pink": f**-0.5, "brown": f**-1.0}[color]
    return np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * shape, n)


def _notes(rng, seconds: float = 5.0) -> np.ndarray:
    """Music-like: a new random note (with harmonics and a decaying envelope) every 0.3 s."""
    n, step = int(seconds * SR), int(0.3 * SR)
    y = np.zeros(n)
    t = np.arange(step) / SR
    for i in range(0, n - step + 1, step):
        f0 = 110 * 2 ** (rng.integers(0, 36) / 12)
        y[i : i + step] = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in (1, 2, 3)) * np.exp(-t / 0.1)
    return y


def test_modulation_depth_separates_stationary_noise_from_notes_at_any_loudness(rng):
    def depth(y, level):
        return modulation_depth((level * y / np.abs(y).max())[None].astype(np.float32), SR)[0]

    for color in ("white", "pink", "brown"):
        y = _noise(rng, color)
        loud, quiet = depth(y, 0.3), depth(y, 0.02)  # -47 dB RMS: still measured
        assert 0.3 < loud < 1.0 and abs(loud - quiet) < 0.05, color
    t = np.arange(5 * SR) / SR
    assert depth(np.sin(2 * np.pi * 440 * t), 0.3) < 0.1  # a tone does not move at all
    assert depth(_notes(rng), 0.3) > 5.0
    # too quiet to measure (digital silence, zero padding, -80 dB): NaN, not "stationary"
    assert np.isnan(modulation_depth(np.zeros((2, 5 * SR), np.float32), SR)).all()
    assert np.isnan(depth(_noise(rng, "white"), 1e-4))
    assert np.isnan(modulation_depth(np.ones((1, 1000), np.float32), SR)).all()  # shorter than 4 blocks
    with pytest.raises(ValueError, match=r"windows \[K, L\]"):
        modulation_depth(np.zeros(100), SR)


@needs_shared
def test_real_music_moves_more_than_the_noise_the_embedding_missed(rng):
    """Every 5 s window of one gtzan_mini clip per genre, decoded as a musicnn head run cuts
    them (``training_depths``), moves by more than 1.4 dB; the quiet noises the embedding score
    missed (bench/bench_notmusic.py) by less than 0.7 dB: a margin of 2 on the quietest music."""
    from embedkit.calibration import training_depths
    from embedkit.config import PreprocessConfig

    clips = {p.stem: p for p in sorted(GTZAN.glob("*/*.00000.flac"))}
    assert len(clips) == 10
    depths, why = training_depths(clips, SR, PreprocessConfig().to_dict())
    assert why == "" and set(depths) == set(clips) and all(len(d) == 6 for d in depths.values())
    music = np.concatenate(list(depths.values()))
    assert music.min() > 1.4
    for color in ("white", "pink", "brown"):
        y = _noise(rng, color)
        assert modulation_depth((0.02 * y / np.abs(y).max())[None].astype(np.float32), SR)[0] < 0.7, color
    # nothing decodable: no depths, and why
    assert training_depths({"x": GTZAN / "missing.flac"}, SR, None) == (
        None,
        "none of the training tracks' audio could be decoded at fit time",
    )


def test_the_modulation_term_flags_noise_the_embedding_misses_and_round_trips(rng):
    pool = _music(rng, 250)
    det = NotMusicDetector.fit(pool[:200])
    det.modulation = {"depth_ref": 2.0, "embedding_ref": 1.5, "cap": 4.0}
    det.method = "mahalanobis-slog+modulation"
    m = det.embedding_score(pool[200:203])
    # depth 4 dB (moves more than the reference): the embedding score; 0.5 dB: 1.5 x 2 / 0.5 = 6;
    # 0 dB (a tone): capped at 1.5 x 4; NaN (silence): the embedding score
    np.testing.assert_allclose(det.combine(m, np.array([4.0, 0.5, 0.0])), [m[0], 6.0, 6.0])
    np.testing.assert_allclose(det.combine(m, np.full(3, np.nan)), m)
    pink = _noise(rng, "pink")
    notes = np.stack([_notes(rng) * 0.3, 0.02 * pink / np.abs(pink).max(), np.zeros(5 * SR)]).astype(np.float32)
    s = det.score(pool[200:203], notes, SR)
    assert s[0] == m[0] and s[1] > 4.0 and s[2] == m[2]
    again = NotMusicDetector.from_dict(json.loads(json.dumps(det.to_dict())))
    assert again == det and again.method == "mahalanobis-slog+modulation" and again.modulation_note is None
    np.testing.assert_allclose(again.score(pool[200:203], notes, SR), s)
    with pytest.raises(CalibrationError, match="also reads the windows"):
        det.score(pool[200:203])
    with pytest.raises(CalibrationError, match="the 3 windows"):
        det.score(pool[200:203], notes[:2], SR)
    bad = det.to_dict()
    bad["modulation"]["depth_ref"] = -1
    with pytest.raises(CalibrationError, match="modulation references must be > 0"):
        NotMusicDetector.from_dict(bad)
    old = det.to_dict()  # a detector made before the modulation term: the embedding score alone
    old["method"] = "mahalanobis-slog"
    old.pop("modulation")
    old = NotMusicDetector.from_dict(old)
    assert old.modulation is None and "before the modulation term" in old.modulation_note
    np.testing.assert_allclose(old.score(pool[200:203], notes, SR), m)


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
    assert det.modulation is None and "no training audio" in det.fitted_on["modulation"]
    assert "no training audio" in block["modulation"]["why_none"]


def test_the_modulation_references_and_threshold_come_from_the_training_tracks(rng):
    feats = {f"t{i}": _music(rng, 6) for i in range(40)}
    parts = {t: f"fold{i % 4}" for i, t in enumerate(feats)}
    depths = {t: rng.uniform(2.0, 12.0, 6) for t in feats}
    depths["t0"][:] = np.nan  # a silent track: not measured, its embedding score stands
    det, t, block = fit_not_music(feats, parts, "test", depths)
    measured = np.concatenate([d for d in depths.values() if not np.isnan(d).all()])
    emb_only = fit_not_music(feats, parts, "test")[2]
    assert det.method == "mahalanobis-slog+modulation"
    assert det.modulation["depth_ref"] == pytest.approx(np.quantile(measured, 0.01))
    # the embedding reference is the embedding-only threshold's quantile (before rounding)
    assert det.modulation["embedding_ref"] == pytest.approx(emb_only["held_out"]["quantiles"]["0.99"])
    assert t >= emb_only["threshold"] and block["held_out"]["flagged"] <= 0.05
    assert block["modulation"]["n_tracks"] == 40 and det.fitted_on["modulation"]["n_windows"] == 234
    # depths of another cut (window counts that differ) are not paired with the embeddings
    other = fit_not_music(feats, parts, "test", {t: d[:3] for t, d in depths.items()})
    assert other[0].modulation is None and "did not match" in other[2]["modulation"]["why_none"]


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
    # every kind decodes its training audio as its tagger does: the modulation term is there
    assert cal.detector.method == "mahalanobis-slog+modulation" and block["modulation"]["n_tracks"] >= 4
    assert cal.detector.modulation["depth_ref"] > 0 and cal.detector.modulation["cap"] == 4.0
    t = load_tagger(run)
    x = np.random.default_rng(0).standard_normal((3, t.window_samples)).astype(np.float32) * 0.1
    p, s = t.score_segments(x)
    assert p.shape == (3, len(t.labels)) and s.shape == (3,) and np.isfinite(s).all()
    np.testing.assert_allclose(p, t.predict_segments(x), atol=1e-6)  # the same forward
    e = t.embed_segments(x)[1]
    np.testing.assert_allclose(
        s, cal.detector.combine(cal.detector.embedding_score(e), modulation_depth(x, t.sample_rate))
    )


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


def test_a_run_whose_detector_predates_the_modulation_term_scores_as_before(runs, tmp_path):
    from embedkit.deploy.batch import tag
    from embedkit.deploy.tagger import load_tagger

    old = tmp_path / "old"
    shutil.copytree(runs["head"], old)
    cal = json.loads((old / CALIBRATION_FILE).read_text())
    cal["not_music"]["method"] = "mahalanobis-slog"
    cal["not_music"].pop("modulation")
    (old / CALIBRATION_FILE).write_text(json.dumps(cal))
    t = load_tagger(old)
    det = t.calibration.detector
    assert t.has_not_music and det.modulation is None and "before the modulation term" in det.modulation_note
    clip = sorted(runs["data"].glob("*/*.wav"))[0]
    windows = t.clip_windows(clip)[0]
    row = tag(old, [clip], workers=1).rows[0]
    assert row.not_music == pytest.approx(det.embedding_score(t.embed_segments(windows)[1]).mean(), rel=1e-5)


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
