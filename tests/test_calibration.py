"""Calibration: scores, temperature scaling, thresholds, decisions, and the run hook."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from embedkit import calibration as C
from embedkit.errors import EmbedkitError


def _prob_rows(n_max=20, c_max=6):
    return st.integers(2, c_max).flatmap(
        lambda c: arrays(
            np.float64, st.tuples(st.integers(1, n_max), st.just(c)), elements=st.floats(0.0, 1.0, allow_nan=False)
        ).map(lambda a: (a + 1e-3) / (a + 1e-3).sum(axis=1, keepdims=True))
    )


def synthetic(n=4000, c=5, temperature=1.0, seed=0):
    """Tracks whose labels are drawn from softmax(logits): perfectly calibrated at T=1; the
    reported probabilities are softmax(logits * temperature) (over-confident for T > 1)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, (n, c))
    true_p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(c, p=row) for row in true_p])
    shown = np.exp(logits * temperature) / np.exp(logits * temperature).sum(1, keepdims=True)
    return shown, y


# --- scores -------------------------------------------------------------------------------


def test_scores_by_hand():
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3]])
    y = np.array([0, 1, 1, 0])
    # bins of width 1/15: confidences 0.9, 0.6, 0.8, 0.7 each alone in a bin
    # |1-0.9| + |0-0.6| + |1-0.8| + |1-0.7| = 0.1 + 0.6 + 0.2 + 0.3 = 1.2 -> /4
    assert C.ece(p, y) == pytest.approx(0.3)
    assert C.nll(p, y) == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.8, 0.7])))
    assert C.brier(p, y) == pytest.approx(np.mean([0.02, 0.72, 0.08, 0.18]))
    assert C.scores(p, y)["accuracy"] == 0.75


def test_ece_of_calibrated_set_is_near_zero_and_overconfidence_is_caught():
    p, y = synthetic()
    assert C.ece(p, y) < 0.025
    p2, y2 = synthetic(temperature=2.5)
    assert C.ece(p2, y2) > 0.1


def test_temperature_recovers_the_distortion():
    p, y = synthetic(temperature=2.0, seed=1)
    t = C.fit_temperature(p, y)
    assert t == pytest.approx(2.0, rel=0.08)
    cal = C.fit_calibration(p, y, list("abcde"))
    after = cal.apply(p)
    assert C.ece(after, y) < 0.03 < C.ece(p, y)
    assert C.nll(after, y) < C.nll(p, y)
    assert C.brier(after, y) < C.brier(p, y)


@settings(max_examples=60, deadline=None)
@given(_prob_rows(), st.floats(0.05, 20.0))
def test_apply_keeps_rows_summing_to_one_and_argmax(p, t):
    cal = C.Calibration(labels=[str(i) for i in range(p.shape[1])], temperature=t)
    q = cal.apply(p)
    assert q.shape == p.shape
    np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-9)
    assert (q >= 0).all()
    # argmax unchanged wherever the top class is unique (ties may resolve either way)
    top2 = np.sort(p, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-9
    assert (q.argmax(1)[clear] == p.argmax(1)[clear]).all()


@settings(max_examples=40, deadline=None)
@given(_prob_rows(n_max=30))
def test_scores_are_in_range(p):
    y = np.zeros(len(p), dtype=int)
    assert 0.0 <= C.ece(p, y) <= 1.0
    assert 0.0 <= C.brier(p, y) <= 2.0
    assert C.nll(p, y) >= 0.0


def test_apply_on_batches_and_wrong_width():
    cal = C.Calibration(labels=["a", "b", "c"], temperature=2.0)
    p = np.array([[[0.7, 0.2, 0.1]], [[0.1, 0.1, 0.8]]])
    q = cal.apply(p)
    assert q.shape == (2, 1, 3)
    assert q[0, 0, 0] < 0.7  # T > 1 softens
    with pytest.raises(C.CalibrationError, match="3 classes"):
        cal.apply(np.ones((2, 4)) / 4)


def test_round_trip_and_bad_files(tmp_path):
    cal = C.Calibration(labels=["a", "b"], temperature=1.7, rule=C.DecisionRule(threshold=0.8, multi=True, k=2))
    back = C.Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert back == cal
    cal.save(tmp_path / C.CALIBRATION_FILE)
    assert C.load_calibration(tmp_path, ["a", "b"]) == cal
    assert C.load_calibration(tmp_path / "none") is None
    with pytest.raises(C.CalibrationError, match="differ"):
        C.load_calibration(tmp_path, ["a", "c"])
    (tmp_path / C.CALIBRATION_FILE).write_text('{"method": "isotonic"}')
    with pytest.raises(C.CalibrationError, match="unknown calibration method"):
        C.load_calibration(tmp_path)
    (tmp_path / C.CALIBRATION_FILE).write_text('{"method": "temperature", "temperature": -1, "labels": ["a"]}')
    with pytest.raises(C.CalibrationError, match="> 0"):
        C.load_calibration(tmp_path)
    assert issubclass(C.CalibrationError, EmbedkitError)


# --- thresholds and decisions ---------------------------------------------------------------


def test_select_threshold_rule():
    # 20 tracks: confidences 0.99 .. 0.40; the 12 most confident are right, then wrong / right alternate
    conf = np.linspace(0.99, 0.40, 20)
    right = np.array([True] * 12 + [False, True] * 4)
    p = np.stack([conf, 1 - conf], axis=1)
    y = np.where(right, 0, 1)
    sel = C.select_threshold(p, y, target=0.97, min_tagged=10)
    # the 12 right tracks reach 100 %; adding the 13th (wrong) drops to 12/13 = 92 %
    assert sel["target_reached"] and sel["n_tagged"] == 12 and sel["accuracy"] == 1.0
    assert conf[12] < sel["threshold"] < conf[11]
    assert sel["coverage"] == pytest.approx(0.6)
    # an easier target tags more: 12/13 >= 0.9 reaches the 13th track
    sel2 = C.select_threshold(p, y, target=0.9, min_tagged=10)
    assert sel2["n_tagged"] >= 13 and sel2["accuracy"] >= 0.9
    # unreachable target: best precision with >= min_tagged tracks, flagged
    sel3 = C.select_threshold(p, 1 - y, target=0.97, min_tagged=10)
    assert not sel3["target_reached"] and sel3["n_tagged"] >= 10
    # too few tracks to choose on: no threshold
    sel4 = C.select_threshold(p[:19], y[:19])
    assert sel4["threshold"] == 0.0 and not sel4["target_reached"] and "only 19" in sel4["note"]


@settings(max_examples=50, deadline=None)
@given(_prob_rows(n_max=40, c_max=4), st.integers(0, 2**31 - 1))
def test_selected_threshold_meets_its_target_or_says_so(p, seed):
    y = np.random.default_rng(seed).integers(0, p.shape[1], len(p))
    sel = C.select_threshold(p, y, target=0.8, min_tagged=3, min_tracks=1)
    if sel["target_reached"]:
        assert sel["accuracy"] >= 0.8 - 1e-9 and sel["n_tagged"] >= min(3, len(p))
    m = p.max(1) >= sel["threshold"]
    assert sel["n_tagged"] == int(m.sum())


def test_coverage_curve_is_monotone():
    p, y = synthetic(n=500)
    curve = C.coverage_curve(p, y)
    cov = [r["coverage"] for r in curve]
    assert cov[0] == 1.0 and all(a >= b for a, b in zip(cov, cov[1:], strict=False))
    assert curve[0]["accuracy"] == pytest.approx((p.argmax(1) == y).mean())


def test_decide_threshold_and_multi():
    labels = ["blues", "jazz", "rock", "pop"]
    p = np.array([0.45, 0.40, 0.10, 0.05])
    d = C.decide(p, labels, C.DecisionRule(threshold=0.5))
    assert d.uncertain and d.genres == [] and d.confidence == 0.45
    d = C.decide(p, labels, C.DecisionRule(threshold=0.4))
    assert d.label == "blues" and d.genres == ["blues"] and str(d) == "blues"
    d = C.decide(p, labels, C.DecisionRule(threshold=0.4, multi=True, multi_threshold=0.9, margin=0.1))
    assert d.genres == ["blues", "jazz"] and d.scores == [0.45, 0.40]  # within the margin
    d = C.decide(p, labels, C.DecisionRule(multi=True, multi_threshold=0.05, margin=0.0, k=3))
    assert d.genres == ["blues", "jazz", "rock"]  # >= 0.05 but capped at k = 3
    d = C.decide(p, labels, C.DecisionRule(multi=True, multi_threshold=0.5, margin=0.01))
    assert d.genres == ["blues"]
    with pytest.raises(EmbedkitError, match="threshold"):
        C.DecisionRule(threshold=1.5)
    with pytest.raises(EmbedkitError, match="max_genres"):
        C.DecisionRule(k=0)


# --- the run hook ---------------------------------------------------------------------------


def _evaluation(temperature=2.0, n_folds=5, n=400, seed=0):
    from embedkit.evaluate import Evaluation

    p, y = synthetic(n=n, c=4, temperature=temperature, seed=seed)
    labels = ["a", "b", "c", "d"]
    ev = Evaluation(labels)
    ids = np.array([f"t{i:04d}" for i in range(n)])
    track_labels = {t: labels[k] for t, k in zip(ids, y, strict=True)}
    for f in range(n_folds):
        sel = np.arange(n) % n_folds == f
        # two identical segments per track: the mean equals the track probabilities
        ev.add_fold(f"fold{f}", np.repeat(ids[sel], 2), np.repeat(p[sel], 2, axis=0), track_labels)
    return ev, p, y


def test_track_probabilities_are_the_fold_means():
    ev, p, y = _evaluation()
    df, P = ev.track_probabilities()
    assert P.shape == (400, 4)
    order = np.argsort(df["track_id"].to_numpy())  # folds concatenated; rows follow df
    np.testing.assert_allclose(P[order], p, atol=1e-12)
    assert (df["true"].to_numpy()[order] == y).all()


@pytest.mark.parametrize("n_folds", [5, 1])
def test_calibrate_run_writes_file_and_honest_scores(tmp_path, n_folds):
    ev, p, y = _evaluation(n_folds=n_folds)
    block = C.calibrate_run(ev, tmp_path)
    cal = C.load_calibration(tmp_path, ev.labels)
    assert cal.temperature == pytest.approx(block["temperature"]) and cal.temperature > 1.3
    assert block["before"]["ece"] > 0.08 and block["after"]["ece"] < block["before"]["ece"] / 2
    assert block["after"]["accuracy"] == pytest.approx(block["before"]["accuracy"])
    assert len(block["cross_fit_temperatures"]) == 5
    th = block["threshold"]
    assert cal.rule.threshold == pytest.approx(th["threshold"], abs=1e-4)
    assert 0 < th["coverage"] <= 1 and th["cross_fitted"]["n_tagged"] > 0
    assert len(block["reliability_after"]) == C.ECE_BINS and sum(b["n"] for b in block["reliability_after"]) == len(y)
    json.dumps(block)  # JSON-plain


def test_fit_run_carries_its_calibration(runs, tmp_path):
    """A head run writes calibration.json beside its bundle and the scores in metrics.json."""
    from embedkit.fit import fit_head

    # runs["cache"]: the synthetic set extracted with tiny-test (12 s clips, 5 s segments), shared
    res = fit_head("tiny-test", "lr", cache=runs["cache"], runs=tmp_path / "runs", cv=5)
    cal = C.load_calibration(res.run_dir, res.bundle.labels)
    block = res.metrics["calibration"]
    assert cal is not None and cal.temperature == pytest.approx(block["temperature"])
    for part in ("before", "after"):
        assert set(block[part]) == {"ece", "nll", "brier", "accuracy"}
    assert block["before"]["accuracy"] == pytest.approx(res.metrics["track_accuracy_mean_prob"], abs=1e-9)
    assert block["ece_bins"] == 15 and 0 <= block["threshold"]["threshold"] <= 1
    assert not list(res.run_dir.parent.glob(".*tmp*"))  # written inside the temporary run dir
    from embedkit.deploy.tagger import load_tagger

    t = load_tagger(res.run_dir)  # the Tagger carries it: probabilities and default decisions
    assert t.calibration == cal
    p = np.arange(1.0, len(t.labels) + 1) / np.arange(1.0, len(t.labels) + 1).sum()
    np.testing.assert_allclose(t.calibrate(p), cal.apply(p))
    assert t.calibration.decide(t.calibrate(p)).label in (*t.labels, C.UNCERTAIN)


def test_ece_noise_floor_matches_a_calibrated_sample():
    """ece_if_calibrated predicts the ECE that truly calibrated samples of that size show."""
    p, _ = synthetic(n=100, seed=4)
    floor = C.ece_if_calibrated(p, draws=300)
    rng = np.random.default_rng(9)
    observed = [C.ece(p, np.array([rng.choice(p.shape[1], p=r) for r in p])) for _ in range(100)]
    assert floor["mean"] == pytest.approx(np.mean(observed), rel=0.15)
    assert 0.03 < floor["mean"] < floor["p90"] < 0.2  # 100 tracks: far from 0 even when perfect


def test_temperature_is_dropped_when_it_does_not_lower_held_out_nll(tmp_path, monkeypatch):
    ev, p, y = _evaluation(temperature=2.0)
    # a cross-fit that makes every track worse: the run must fall back to the identity
    monkeypatch.setattr(C, "cross_fit", lambda p, y, g: (np.full_like(p, 1 / p.shape[1]), [1.0] * 5))
    block = C.calibrate_run(ev, tmp_path)
    cal = C.load_calibration(tmp_path)
    assert block["method"] == cal.method == "none" and cal.temperature == 1.0
    assert block["after"] == block["before"] and block["candidates"]["temperature"]["nll"] > block["before"]["nll"]
    np.testing.assert_allclose(cal.apply(p), p, atol=1e-9)
    assert cal.fitted_on["temperature_fitted"] > 1.3  # what the full fit would have used, recorded


def test_no_temperature_on_too_few_or_all_right_tracks(tmp_path):
    """All held-out tracks right: the NLL falls as T -> 0, so no temperature is fitted."""
    ev, p, y = _evaluation(temperature=2.0, n=12)
    block = C.calibrate_run(ev, tmp_path)
    assert block["method"] == "none" and "only 12 held-out tracks" in block["why_not_temperature"]
    from embedkit.evaluate import Evaluation

    ev = Evaluation(["a", "b"])
    ids = np.array([f"t{i}" for i in range(40)])
    lab = {t: "ab"[i % 2] for i, t in enumerate(ids)}
    proba = np.array([[0.8, 0.2] if i % 2 == 0 else [0.3, 0.7] for i in range(40)])
    for f in range(4):
        ev.add_fold(f"fold{f}", ids[f::4], proba[f::4], lab)
    block = C.calibrate_run(ev, tmp_path)
    assert block["method"] == "none" and "every held-out track is right" in block["why_not_temperature"]
    assert C.load_calibration(tmp_path).is_identity
