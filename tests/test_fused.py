"""Fused backbones (issue 26): ``-b tiny-test+tiny-test-b`` trains a head on the two stores'
window embeddings joined, and the run goes through every door (predict, tag, stream, serve,
ONNX export with its parity check, the report). tiny-test runs at 16 kHz and tiny-test-b at
22.05 kHz (the synthetic clips' own rate), so the fused tagger resamples one part per window."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from embedkit.cli import app

FUSED = "tiny-test+tiny-test-b"


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _ok(*args) -> str:
    res = _cli(*args)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def fused_cache(tiny_store, synth_dataset, tmp_path_factory):
    """A cache holding the synthetic dataset in both parts' stores (tiny-test copied from the
    shared store, tiny-test-b extracted here)."""
    from embedkit.datasets import load_dataset
    from embedkit.extract import extract

    cache = tmp_path_factory.mktemp("fused-cache")
    shutil.copytree(Path(tiny_store) / "tiny-test", cache / "tiny-test")
    extract(load_dataset(synth_dataset), "tiny-test-b", cache=cache, workers=1)
    return cache


@pytest.fixture(scope="module")
def fused_run(fused_cache, tmp_path_factory):
    runs = tmp_path_factory.mktemp("fused-runs")
    out = _ok("fit", "-b", FUSED, "--cache", fused_cache, "--runs", runs, "--holdout", "0.25")
    (run,) = runs.iterdir()
    return run, out


def test_fit_records_the_fusion_and_its_data(fused_run, fused_cache):
    from embedkit.fusion import open_stores, read_fused
    from embedkit.heads import load_bundle

    run, out = fused_run
    m = json.loads((run / "metrics.json").read_text())
    assert m["name"] == f"concat({FUSED})+lr" and m["backbone"] == FUSED and "concat(tiny-test+tiny-test-b)+lr" in out
    assert m["config"]["fusion"] == {
        "parts": ["tiny-test", "tiny-test-b"],
        "dims": [32, 16],
        "fusion": "concat",
        "weighting": "equal",
        "align": "segment",
    }
    # equal weighting: each block's total variance 48 / 2 = 24 -> weights sqrt(24/32), sqrt(24/16)
    np.testing.assert_allclose(m["config"]["part_weights"], [np.sqrt(0.75), np.sqrt(1.5)])
    assert m["spec"]["family"] == "fused" and m["spec"]["sample_rate"] == 22050 and m["spec"]["embedding_dim"] == 48
    assert set(m["stores"]) == {"tiny-test", "tiny-test-b"} and m["store"] is None
    b = load_bundle(run)
    assert b.config["fusion"]["parts"] == ["tiny-test", "tiny-test-b"] and b.weights_id.count("+") == 1
    # the head's input: tiny-test's 32 columns then tiny-test-b's 16, row k = window k of a track
    seg, X = read_fused(open_stores(FUSED, fused_cache))
    assert X.shape == (len(seg), 48) and m["dataset"]["n_segments"] == len(seg)
    assert seg.groupby("track_id")["segment"].apply(lambda s: list(s) == list(range(len(s)))).all()


def test_fused_tagger_computes_what_training_computed(fused_run, fused_cache):
    """The part at the fused rate gets exactly its stored embedding; the resampled part differs
    only by per-window resampling (a sinc filter on the window vs soxr on the whole clip)."""
    from embedkit.deploy.tagger import load_tagger
    from embedkit.fusion import open_stores, read_fused

    run, _ = fused_run
    t = load_tagger(run)
    assert t.sample_rate == 22050 and t.window_samples == 110250
    seg, X = read_fused(open_stores(FUSED, fused_cache))
    path = seg["path"].iloc[0]
    rows = (seg["path"] == path).to_numpy()
    frames, _ = t.clip_windows(path)
    E = t.embed_segments(frames)[1]
    assert E.shape == (rows.sum(), 48)
    np.testing.assert_allclose(E[:, 32:], X[rows, 32:], rtol=1e-5, atol=1e-5)  # tiny-test-b: same samples
    rel = np.abs(E[:, :32] - X[rows, :32]).max() / np.abs(X[rows, :32]).max()
    assert 0 < rel < 0.05, rel  # tiny-test: resampled per window
    p_store = t.bundle.predict_proba(X[rows]).mean(axis=0)
    p_tag = t.predict_segments(frames).mean(axis=0)
    assert np.abs(p_store - p_tag).max() < 0.05 and p_store.argmax() == p_tag.argmax()


@pytest.mark.slow  # several seconds: the fast tier keeps a minute
def test_fused_run_through_every_door(fused_run, fused_cache, synth_dataset, tmp_path):
    from embedkit.audio.excerpts import Excerpt, read_excerpt
    from embedkit.deploy.onnx_runtime import OnnxTagger
    from embedkit.deploy.serve import ServeConfig, create_app
    from embedkit.deploy.tagger import load_tagger

    pytest.importorskip("onnxruntime")
    requests = pytest.importorskip("requests")
    from servers import running

    run, _ = fused_run
    t = load_tagger(run)
    clips = sorted(str(p) for p in Path(synth_dataset).glob("*/*.wav"))[::5]

    def excerpt(f, how: str = ""):  # the windows `tag` reads (its default excerpt) or all of them
        e = Excerpt.parse(how) if how else Excerpt()
        return read_excerpt(f, t.sample_rate, e, t.audio.clip_s, t.segment.segment_s, t.segment.hop_s)[0]

    want = {f: t.track_probabilities(t.predict_segments(excerpt(f))) for f in clips}

    # predict: the stores' embeddings, every part's store checked against the run
    out = _ok("predict", run, "--cache", fused_cache)
    assert f"predicted with {FUSED}+lr" in out

    # tag (torch)
    _ok("tag", run, *clips, "--out", tmp_path / "t.jsonl", "--workers", "1")
    rows = {r["path"]: r for r in map(json.loads, (tmp_path / "t.jsonl").read_text().splitlines())}
    for f in clips:
        np.testing.assert_allclose([rows[f]["probabilities"][l] for l in t.labels], want[f], atol=1e-6)

    # export: one graph with both fronts and the resampler, parity-checked by the command
    onnx = tmp_path / "fused.onnx"
    out = _ok("export", run, "--format", "onnx", "-o", onnx)
    parity = float(out.split("max |onnxruntime - torch| = ")[1].split()[0])
    assert parity < 1e-5, out
    o = OnnxTagger.load(onnx)
    assert o.sample_rate == 22050 and o.window_samples == 110250
    for f in clips:
        np.testing.assert_allclose(o.track_probabilities(o.predict_segments(excerpt(f))), want[f], atol=1e-5)

    # tag with the ONNX file
    _ok("tag", onnx, *clips, "--out", tmp_path / "o.jsonl", "--workers", "1")
    rows = {r["path"]: r for r in map(json.loads, (tmp_path / "o.jsonl").read_text().splitlines())}
    for f in clips:
        np.testing.assert_allclose([rows[f]["probabilities"][l] for l in t.labels], want[f], atol=1e-5)

    # stream: one record per window, each the tagger's probabilities of that window
    out = _ok("stream", run, clips[0], "--hop", t.segment.hop_s)
    wins = [r for r in map(json.loads, out.strip().splitlines()) if r.get("type") == "window"]
    frames = excerpt(clips[0], "full")
    ref = t.calibrate(t.predict_segments(frames))
    assert len(wins) == len(frames) > 1
    for w, p in zip(wins, ref):
        np.testing.assert_allclose([w["raw"][l] for l in t.labels], p, atol=1e-6)

    # serve: the HTTP answer is the same track probabilities
    with running(create_app(t, ServeConfig())) as url:
        for f in clips[:2]:
            r = requests.post(
                f"{url}/v1/tag", data=Path(f).read_bytes(), headers={"Content-Type": "audio/wav"}, timeout=120
            )
            assert r.status_code == 200, r.text
            np.testing.assert_allclose([r.json()["probabilities"][l] for l in t.labels], want[f], atol=1e-6)

    # the report names the fusion
    html = tmp_path / "r.html"
    _ok("report", run, "-o", html)
    assert f"concat({FUSED})+lr" in html.read_text()


@pytest.mark.slow  # several seconds: the fast tier keeps a minute
def test_stacked_fusion_fits_tags_and_exports(fused_cache, tmp_path):
    from embedkit.deploy.onnx_export import export_onnx, parity_check
    from embedkit.deploy.tagger import load_tagger
    from embedkit.fit import fit_head
    from embedkit.heads import StackedHead

    res = fit_head(FUSED, "lr", cache=fused_cache, runs=tmp_path, fusion="stack", protocol="holdout")
    assert res.metrics["name"] == f"stack({FUSED})+lr"
    assert res.metrics["config"]["fusion"]["fusion"] == "stack" and res.metrics["config"]["fusion"]["weighting"] is None
    stack = res.bundle.model.named_steps["head"]
    assert isinstance(stack, StackedHead) and [m.n_features_in_ for m in stack.parts_] == [32, 16]
    assert stack.meta_.coef_.shape == (len(res.bundle.labels), 2 * len(res.bundle.labels))
    t = load_tagger(res.run_dir)
    export_onnx(t, tmp_path / "s.onnx")
    assert parity_check(t, tmp_path / "s.onnx") < 1e-5


def test_misaligned_stores_are_refused_in_one_line(tiny_store, synth_dataset, tmp_path):
    """tiny-test-b's store lacks 3 of the 20 tracks: fit names the count and the backbones."""
    from embedkit.datasets import load_dataset
    from embedkit.extract import extract

    shutil.copytree(Path(tiny_store) / "tiny-test", tmp_path / "cache" / "tiny-test")
    t = load_dataset(synth_dataset)
    extract(t.iloc[3:].copy(), "tiny-test-b", cache=tmp_path / "cache", workers=1)
    res = _cli("fit", "-b", FUSED, "--cache", tmp_path / "cache", "--runs", tmp_path / "runs")
    assert res.exit_code != 0 and "Traceback" not in res.output
    msg = res.output.strip()
    assert len(msg.splitlines()) == 1, msg
    assert "3 track(s) missing from the tiny-test-b store (of 20)" in msg and FUSED in msg
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize(
    "args, message",
    [
        (["-b", "tiny-test+nope"], "unknown backbone 'nope'"),
        (["-b", "tiny-test+tiny-test"], "names tiny-test twice"),
        (["-b", FUSED, "--fusion", "mean"], "unknown fusion 'mean'"),
        (["-b", FUSED, "--store", "x"], "--store names one backbone's store"),
        (["-b", "tiny-test+melstats"], "no embedding store for backbone 'melstats'"),
    ],
)
def test_bad_fusions_are_one_line(args, message, fused_cache, tmp_path):
    res = _cli("fit", *args, "--cache", fused_cache, "--runs", tmp_path)
    assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1, res.output


def test_part_scaler_weights_blocks():
    from embedkit.heads.fused import PartScaler, part_weights

    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(5, 3, (200, 4)), rng.normal(-1, 0.1, (200, 12))], axis=1).astype(np.float32)
    Z = PartScaler(dims=(4, 12)).fit(X).transform(X)
    # every block's total variance is 16 / 2 = 8 whatever its width
    np.testing.assert_allclose([Z[:, :4].var(0).sum(), Z[:, 4:].var(0).sum()], [8, 8], rtol=1e-3)
    np.testing.assert_allclose(part_weights((4, 12), "none"), [1, 1])
    Z = PartScaler(dims=(4, 12), weighting="none").fit(X).transform(X)
    np.testing.assert_allclose(Z.var(0), np.ones(16), rtol=1e-3)
    with pytest.raises(ValueError, match="do not add up"):
        PartScaler(dims=(4, 4)).fit(X)


@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_run_extracts_missing_parts_and_fits_the_fusion(synth_dataset, tmp_path):
    """`embedkit run --backbones tiny-test+tiny-test-b`: each part's store is extracted (none
    exists yet), the fused head is fitted on the same folds as single runs, and reused on a re-run."""
    args = ["run", synth_dataset, "--backbones", f"tiny-test,{FUSED}", "--heads", "lr", "--no-cnn", "--cv", "2"]
    args += ["--clip", "10", "--cache", tmp_path / "cache", "--runs", tmp_path / "runs", "-o", tmp_path / "r.html"]
    _ok(*args)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["tiny-test", "tiny-test-b"]
    ms = {m["name"]: m for m in (json.loads(f.read_text()) for f in (tmp_path / "runs").glob("*/metrics.json"))}
    assert set(ms) == {"tiny-test+lr", f"concat({FUSED})+lr"}
    fused, single = ms[f"concat({FUSED})+lr"], ms["tiny-test+lr"]
    assert fused["config"]["fusion"]["parts"] == ["tiny-test", "tiny-test-b"]
    import pandas as pd

    folds = [
        pd.read_csv(tmp_path / "runs" / m["run_id"] / "predictions.csv").set_index("track_id")["fold"].sort_index()
        for m in (fused, single)
    ]
    assert folds[0].equals(folds[1]) and folds[0].nunique() == 2  # the same folds as the single run
    assert fused["extract_ms_per_track"] > single["extract_ms_per_track"] > 0
    assert f"concat({FUSED})+lr" in (tmp_path / "r.html").read_text()
    out = _ok(*args)
    assert f"fit concat({FUSED})+lr: reused" in out, out


def test_extract_of_a_fusion_names_the_parts(synth_dataset, tmp_path):
    res = _cli("extract", synth_dataset, "-b", FUSED, "--cache", tmp_path)
    assert res.exit_code != 0 and len(res.output.strip().splitlines()) == 1, res.output
    assert f"-b tiny-test; embedkit extract {synth_dataset} -b tiny-test-b" in " ".join(res.output.split())
    assert not any(tmp_path.iterdir())


def test_parts_on_different_segment_grids_are_refused(tiny_store, synth_dataset, tmp_path):
    from embedkit.config import PreprocessConfig, SegmentConfig
    from embedkit.datasets import load_dataset
    from embedkit.extract import extract

    shutil.copytree(Path(tiny_store) / "tiny-test", tmp_path / "cache" / "tiny-test")
    prep = PreprocessConfig(segments=SegmentConfig(4.0, 4.0))
    extract(load_dataset(synth_dataset), "tiny-test-b", cache=tmp_path / "cache", prep=prep, workers=1)
    res = _cli("fit", "-b", FUSED, "--cache", tmp_path / "cache", "--runs", tmp_path / "runs")
    assert res.exit_code != 0 and len(res.output.strip().splitlines()) == 1, res.output
    assert "the tiny-test-b store was extracted with other preprocessing" in res.output
    assert "share one segment grid" in " ".join(res.output.split())
