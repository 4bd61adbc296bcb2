"""`embedkit report`: builds from generated metrics.json fixtures (several kinds of run, one
with only the required fields, a single run), and the HTML is well formed, self-contained,
escaped and carries the numbers of the runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import check_html, make_run, make_runs


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from embedkit.report import build_report

    root = tmp_path_factory.mktemp("runs")
    runs = make_runs(root / "runs")
    out, ctx = build_report([root / "runs"], root / "reports" / "report.html")
    return out, out.read_text(encoding="utf-8"), ctx, runs


def test_report_is_wellformed_and_self_contained(built):
    out, html, ctx, runs = built
    c = check_html(html)
    assert c.tags.count("svg") >= len(runs) + 2  # confusion per full run + class counts + scatters + curves
    assert html.count('<article class="run"') == len(runs)
    # no leftover temp file from the atomic write
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]


def test_report_numbers_and_order(built):
    _, html, ctx, runs = built
    accs = [r["track_accuracy"] for r in runs]
    ranked = [v.m["track_accuracy"] for v in ctx["runs"]]
    assert ranked == sorted(accs, reverse=True)
    lb = html[html.index('id="leaderboard"') : html.index('id="genres"')]
    # leaderboard rows appear in accuracy order, with mean ± std, vote and segment accuracy
    positions = [lb.index(f'href="#run-{i + 1}"') for i in range(len(runs))]
    assert positions == sorted(positions)
    best = max(runs, key=lambda r: r["track_accuracy"])
    assert f"{100 * best['track_accuracy']:.1f} ± {100 * best['track_accuracy_std']:.1f} %" in lb
    assert f"{100 * best['track_accuracy_vote']:.1f}" in lb
    assert f"{100 * best['segment_accuracy']:.1f}" in lb
    # per-genre F1, confusion counts, misclassified file names and cost figures are there
    for s in best["per_class"].values():
        assert f"{s['f1']:.2f}" in html
    assert best["misclassified"] and Path(best["misclassified"][0]["path"]).name in html
    assert "310 ms" in html and "45 ms" in html  # extraction per track, CNN inference
    assert "4,020" in html  # parameter count of r-musicnn-lr (2010 * 2)
    assert "SYNTHETIC" not in html  # fixtures are not synthetic


def test_missing_fields_render_as_dash(built):
    _, html, ctx, _ = built
    card = html[html.index('id="run-7"') :]
    card = card[: card.index("</article>")]
    assert "minimal &lt;run&gt; &amp; co" in card  # escaped, not injected
    assert "<run>" not in html
    assert "Per-class scores: —" in card and "Confusion matrix: —" in card and "Misclassified tracks: —" in card
    row = [r for r in ctx["runs"] if r.run_id == "r-minimal"][0]
    assert row.infer_ms_total is None and row.acc_std is None
    assert "42.1 %" in html


def test_deployment_section_per_run(built):
    """Each calibrated run gets its numbers, a reliability diagram and a coverage curve with
    the default threshold marked; the run without calibration is listed as such."""
    _, html, ctx, runs = built
    sec = html[html.index('<section id="deployment">') :]
    sec = sec[: sec.index("</section>")]
    calibrated = [v for v in ctx["runs"] if v.m.get("calibration")]
    assert len(calibrated) == len(runs) - 1  # all but r-minimal
    for v in calibrated:
        c = v.m["calibration"]
        part = sec[sec.index(f'id="deploy-{v.rank}"') :]
        part = part[: part.index("</figure>", part.index("</figure>") + 1)]
        assert part.count("<svg") == 2 and 'class="default-threshold"' in part
        # one marker per non-empty bin, before and after
        assert part.count('class="rel-before"') == sum(1 for b in c["reliability_before"] if b["n"])
        assert part.count('class="rel-after"') == sum(1 for b in c["reliability_after"] if b["n"])
        th = c["threshold"]
        assert (
            f"At {th['threshold']:.2f}: {100 * th['coverage']:.0f} % of tracks tagged, {100 * th['accuracy']:.1f} % of them right"
            in part
        )
        assert f"{c['after']['ece']:.3f}" in sec and f"{c['before']['ece']:.3f}" in sec
    assert "No calibration recorded for: minimal &lt;run&gt; &amp; co" in sec
    assert 'href="#deployment"' in html


def test_written_comparison_follows_the_numbers(built):
    _, _, ctx, runs = built
    text = " ".join(ctx["comparison"])
    by = {r["run_id"]: r for r in runs}
    views = ctx["runs"]
    best = views[0]
    assert text.startswith(f"{best.label} ranks first with {100 * best.acc:.1f}")
    pre = max(
        (r for r in runs if r.get("kind") == "head" and r.get("backbone") == "musicnn-msd"),
        key=lambda r: r["track_accuracy"],
    )
    gap = abs(100 * (pre["track_accuracy"] - by["r-cnn"]["track_accuracy"]))
    assert f"a gap of {gap:.1f} points" in text
    assert "hand-crafted baseline" in text and f"{100 * by['r-melstats-lr']['track_accuracy']:.1f} %" in text
    # cheapest within 2 points, recomputed independently
    band = [v for v in views if v.acc >= best.acc - 0.02 and v.infer_ms_total is not None]
    cheapest = min(band, key=lambda v: v.infer_ms_total)
    if cheapest is best:
        assert "No run within 2 points of the best is cheaper" in text or "No other run is within 2 points" in text
    else:
        assert f"cheapest run within 2 points of the best is {cheapest.label}" in text
    assert "minimal <run> & co" not in text  # far from the best: not part of the cost comparison


def test_comparison_changes_with_data(tmp_path):
    """Swap which approach wins: the text must follow (no canned conclusion)."""
    from embedkit.report import build_report

    make_run(tmp_path / "a", "pre", "head", "musicnn-msd", "lr", 0.2, 1, extra={"extract_ms_per_track": 5.0})
    make_run(tmp_path / "a", "cnn", "cnn", "scratch-cnn", "cnn", 0.95, 2)
    _, ctx = build_report([tmp_path / "a"], tmp_path / "r.html")
    text = " ".join(ctx["comparison"])
    assert ctx["runs"][0].kind == "cnn" and "in favour of the scratch CNN" in text
    # a run near the best without a recorded cost is named, not silently dropped
    best = ctx["runs"][0].acc
    (tmp_path / "a" / "nocost").mkdir()
    (tmp_path / "a" / "nocost" / "metrics.json").write_text(
        json.dumps({"run_id": "nocost", "kind": "head", "name": "no-cost", "track_accuracy": best - 0.01})
    )
    _, ctx = build_report([tmp_path / "a"], tmp_path / "r.html")
    assert "Inference cost (including embedding extraction for head runs) is not recorded for no-cost" in " ".join(
        ctx["comparison"]
    )


def test_single_run_synthetic(tmp_path):
    from embedkit.report import build_report

    make_run(
        tmp_path / "runs", "only", "head", "melstats", "lr", 0.7, 0, labels=["drone", "pulse", "chime"], synthetic=True
    )
    out, ctx = build_report([tmp_path / "runs" / "only"], tmp_path / "out" / "r.html")
    html = out.read_text()
    check_html(html)
    assert 'id="synthetic-banner"' in html and "SYNTHETIC DATA" in html
    assert "only run in this report" in ctx["comparison"][0]
    assert "No pretrained-embedding run and no scratch CNN run" in " ".join(ctx["comparison"])
    assert html.count('<article class="run"') == 1


def test_bad_runs_are_skipped_and_listed(tmp_path):
    from embedkit.report import ReportError, build_report

    make_run(tmp_path, "good", "head", "melstats", "lr", 0.7, 0)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{not json")
    (tmp_path / "noacc").mkdir()
    (tmp_path / "noacc" / "metrics.json").write_text(json.dumps({"run_id": "x", "track_accuracy": None}))
    out, ctx = build_report([tmp_path], tmp_path / "r.html")
    assert len(ctx["runs"]) == 1 and len(ctx["skipped"]) == 2
    assert 'id="skipped"' in out.read_text()
    with pytest.raises(ReportError, match="no runs found"):
        build_report([tmp_path / "broken"], tmp_path / "r2.html")
    with pytest.raises(ReportError, match="no such file"):
        build_report([tmp_path / "nope"], tmp_path / "r3.html")


def test_learning_curve_shapes():
    from embedkit.report.build import normalise_curves

    a = normalise_curves({"train_loss": [1, 0.5], "val_accuracy": [0.5, 0.7]})
    b = normalise_curves(
        [{"epoch": 1, "train_loss": 1, "val_accuracy": 0.5}, {"epoch": 2, "train_loss": 0.5, "val_accuracy": 0.7}]
    )
    c = normalise_curves({"fold0": {"train_loss": [1, 0.5], "val_accuracy": [0.5, 0.7]}})
    d = normalise_curves(
        [
            {
                "fold": "fold0",
                "epochs": [
                    {"epoch": 1, "train_loss": 1, "val_accuracy": 0.5},
                    {"epoch": 2, "train_loss": 0.5, "val_accuracy": 0.7},
                ],
            }
        ]
    )
    # embedkit.cnn's layout: phase labels and timings are not curves
    e = normalise_curves(
        {
            "fold0": [
                {"epoch": 1, "phase": "head", "train_loss": 1, "val_accuracy": 0.5, "seconds": 2.0, "compute_s": 1.0},
                {"epoch": 2, "phase": "all", "train_loss": 0.5, "val_accuracy": 0.7, "seconds": 2.0, "compute_s": 1.0},
            ]
        }
    )
    for got in (a, b, c, d, e):
        assert len(got) == 1 and got[0][1] == {"train_loss": [1.0, 0.5], "val_accuracy": [0.5, 0.7]}, got
    two = normalise_curves({"fold0": [{"val_loss": 1.0}], "fold1": [{"val_loss": None}, {"val_loss": 0.5}]})
    assert [n for n, _ in two] == ["fold0", "fold1"] and np.isnan(two[1][1]["val_loss"][0])
    assert normalise_curves(None) == [] and normalise_curves("junk") == [] and normalise_curves([{"phase": "x"}]) == []


def test_report_cli(tmp_path, monkeypatch):
    from embedkit.cli import app

    make_run(tmp_path / "runs", "one", "head", "melstats", "lr", 0.7, 0)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["report", "-o", "out/report.html"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "report.html").exists()
    res = CliRunner().invoke(app, ["report", "missing-dir"])
    assert res.exit_code == 1 and "missing-dir: no such file or directory" in res.output
    assert "Traceback" not in res.output


def test_chart_helpers():
    from embedkit.report import charts

    ticks = charts.nice_ticks(0.31, 0.93)
    assert ticks[0] <= 0.31 and ticks[-1] >= 0.93 and 4 <= len(ticks) <= 8
    t = charts.log_ticks(0.8, 950)
    assert t[0] <= 0.8 and t[-1] >= 950 and all(b > a for a, b in zip(t, t[1:]))
    # points that cannot sit on a log axis are left out, not drawn at -inf
    svg = charts.scatter(
        [
            {"x": 0.0, "y": 50, "color": "#000", "tag": 1, "name": "a"},
            {"x": 12.0, "y": 70, "color": "#000", "tag": 2, "name": "b <b>"},
        ],
        "t",
        "x",
        "y",
    )
    assert svg.count("<circle") == 1 and "b &lt;b&gt;" in svg
    assert charts.scatter([{"x": None, "y": 1, "color": "#000", "tag": 1, "name": "a"}], "t", "x", "y") == ""
    assert charts.heatmap([[1, 2]], ["a", "b"], "bad shape") == ""
    hm = charts.heatmap([[3, 1], [0, 4]], ["x&y", "z"], "cm")
    assert "x&amp;y" in hm and hm.count("<rect") == 5  # 4 cells + frame
    assert charts.line_chart([{"name": "a", "ys": [float("nan")], "color": "#000"}], "t", "x", "y") == ""
