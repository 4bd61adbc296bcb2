"""`embedkit run`: the main job end to end on generated clips (quick mode), reuse of finished
runs on a second invocation, the demo fallback and argument errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import check_html


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """3 classes x 4 clips of 6 s: enough for 2-fold CV with a validation part, seconds to run."""
    from embedkit.synth import make_dataset

    return make_dataset(tmp_path_factory.mktemp("clips"), n_classes=3, per_class=4, duration_s=6.0)


def _metrics(runs: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(runs.glob("*/metrics.json"))}


@pytest.mark.slow
def test_run_quick_end_to_end_and_reuse(tiny_data, tmp_path, monkeypatch):
    from embedkit.cli import app

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["run", str(tiny_data), "--quick", "--threads", "1", "--workers", "2"])
    assert res.exit_code == 0, res.output
    report = tmp_path / "reports" / "report.html"
    assert report.exists() and res.output.strip().splitlines()[-1] == str(Path("reports") / "report.html")
    assert "--resume" not in res.output  # `run` resumes by itself; no train-cnn hint
    runs = _metrics(tmp_path / "runs")
    kinds = sorted((m["kind"], m.get("backbone"), m.get("head")) for m in runs.values())
    assert [k for k in kinds if k[0] == "head"] == [
        ("head", b, h) for b in ("melstats", "tiny-test") for h in ("lgbm", "lr", "mlp")
    ]
    assert sum(k[0] == "cnn" for k in kinds) == 1 and len(kinds) == 7
    for m in runs.values():
        assert m["protocol"]["type"] == "cv" and m["protocol"]["k"] == 2
        assert m["dataset"]["synthetic"] is True and m["dataset"]["n_tracks"] == 12
        assert 0.0 <= m["track_accuracy"] <= 1.0
        if m["kind"] == "head":
            assert m["extract_ms_per_track"] > 0  # the extraction cost reaches the report
    html = report.read_text()
    check_html(html)
    assert 'id="synthetic-banner"' in html
    assert html.count('<article class="run"') == 7
    assert "learning curves" in html.lower() and "tiny-test+lr" in html

    # Second invocation: every run is found finished and reused; only the report is rebuilt.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/metrics.json")}
    res2 = CliRunner().invoke(app, ["run", str(tiny_data), "--quick", "--threads", "1"])
    assert res2.exit_code == 0, res2.output
    assert res2.output.count("reused") >= 7 and "new (" not in res2.output
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert len(list((tmp_path / "runs").glob("*/metrics.json"))) == 7

    # A different protocol is a different run: new directories beside the old ones.
    from embedkit.pipeline import RunPlan, run_all

    out = run_all(
        tiny_data, RunPlan.quick_plan(backbones=("melstats",), heads=("lr",), cnn=False, cv=3), report=None, threads=1
    )
    assert [r.reused for r in out.runs] == [False] and out.report is None
    assert len(list((tmp_path / "runs").glob("*/metrics.json"))) == 8


def test_run_ids_are_deterministic():
    from embedkit.pipeline import run_id

    a = run_id("head", "melstats+lr", {"dataset": "x", "protocol": {"cv": 5}})
    assert a == run_id("head", "melstats+lr", {"protocol": {"cv": 5}, "dataset": "x"})
    assert a != run_id("head", "melstats+lr", {"dataset": "x", "protocol": {"cv": 2}})
    assert a.startswith("head-melstats+lr-")


def test_demo_without_shared_generates_synthetic(tmp_path, monkeypatch):
    from embedkit import pipeline

    monkeypatch.setattr(pipeline, "shared_candidates", lambda: [tmp_path / "absent"])
    tracks, synthetic = pipeline.load_tracks("demo", tmp_path / "cache", demo_size=(2, 3, 6.0))
    assert synthetic and tracks.attrs["synthetic"] is True
    assert len(tracks) == 6 and sorted(tracks["label"].unique()) == ["drone", "pulse"]
    from embedkit.evaluate import dataset_summary

    assert dataset_summary(tracks)["synthetic"] is True


def test_demo_prefers_gtzan_mini(tmp_path, monkeypatch):
    from embedkit import pipeline

    fake = tmp_path / "shared" / "data" / "gtzan_mini"
    fake.mkdir(parents=True)
    monkeypatch.setattr(pipeline, "shared_candidates", lambda: [fake])
    assert pipeline.demo_data(tmp_path / "cache") == (fake, False)


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give a DATA folder"),
        (["DATA", "--backbones", "nope"], "unknown backbone 'nope'"),
        (["DATA", "--heads", "svm"], "unknown head 'svm'"),
        (["DATA", "--cv", "1"], "--cv needs K >= 2"),
        (["DATA", "--clip", "3"], "shorter than one 5 s segment"),
        (["missing-folder"], "missing-folder: no such file or directory"),
    ],
)
def test_run_argument_errors(args, message, tiny_data, tmp_path, monkeypatch):
    from embedkit.cli import app

    monkeypatch.chdir(tmp_path)
    args = [str(tiny_data) if a == "DATA" else a for a in args]
    res = CliRunner().invoke(app, ["run", *args])
    assert res.exit_code == 1, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_report_is_written_after_the_first_run_and_names_those_in_progress(tiny_data, tmp_path, monkeypatch):
    """`embedkit run` writes the report as soon as the heads are done and rewrites it after each
    later run: while the CNN trains, the page holds the head runs and says the CNN is still
    running (and reloads itself); at the end the banner is gone and every run is in."""
    from embedkit.pipeline import RunPlan, run_all

    monkeypatch.chdir(tmp_path)
    report = tmp_path / "report.html"
    seen: list[str] = []

    def progress(event):  # called by the CNN trainer while it trains
        if not seen:
            seen.append(report.read_text())

    plan = RunPlan.quick_plan(backbones=("melstats",), heads=("lr", "lgbm"))
    out = run_all(tiny_data, plan, report=report, threads=1, workers=2, progress=progress)
    assert seen, "the CNN trainer reported no progress"
    during = seen[0]
    assert 'id="pending-banner"' in during and "still running: cnn-scratch" in during
    assert 'http-equiv="refresh"' in during
    assert "melstats+lr" in during and "melstats+lgbm" in during
    final = report.read_text()
    assert 'id="pending-banner"' not in final and 'http-equiv="refresh"' not in final
    assert [r.name for r in out.runs] == ["melstats+lr", "melstats+lgbm", "cnn-scratch"]
    check_html(final)


def test_the_measured_cnn_recipe_is_every_doors_default():
    """One recipe (cnn/recipe.py): `embedkit run`'s CNN stage, train_cnn's defaults and
    `embedkit train-cnn`'s option defaults train the same network the same way; the fine-tune
    defaults of `run --finetune` and `embedkit finetune` agree too."""
    import inspect
    from dataclasses import asdict

    import click
    import typer.main

    from embedkit.cli import app
    from embedkit.cnn import recipe
    from embedkit.cnn.augment import AugmentConfig
    from embedkit.cnn.finetune import FinetuneConfig
    from embedkit.cnn.train import train_cnn
    from embedkit.pipeline import RunPlan

    plan, d = RunPlan(), {k: p.default for k, p in inspect.signature(train_cnn).parameters.items()}
    assert asdict(d["train"]) == asdict(plan.cnn_train) and d["train"].lr == 3e-3 and d["train"].val_size == 0
    assert d["features"] == plan.cnn_features and plan.cnn_features.n_mels == 96
    assert d["channels"] == plan.cnn_channels == (24, 48, 96, 128)
    assert d["augment"].enabled == ("specaugment",) and d["augment"] == AugmentConfig.parse(plan.cnn_augment)
    cmd = typer.main.get_command(app)
    ctx = click.Context(cmd)
    opts = {p.name: p.default for p in cmd.get_command(ctx, "train-cnn").params}
    assert {k: opts[k] for k in recipe.TRAIN} == recipe.TRAIN
    assert opts["augment"] == plan.cnn_augment and opts["channels"] == ",".join(map(str, plan.cnn_channels))
    ft = {p.name: p.default for p in cmd.get_command(ctx, "finetune").params}
    assert (ft["epochs"], ft["val_size"]) == (plan.finetune_train.epochs, plan.finetune_train.val_size) == (10, 0.0)
    assert FinetuneConfig("musicnn-msd", unfreeze=ft["unfreeze"]).unfreeze == "top:6"
    assert FinetuneConfig("tiny-test").unfreeze == "all"


@pytest.mark.slow
def test_cnn_run_records_the_plans_recipe_and_a_changed_recipe_is_a_new_run(tiny_data, tmp_path):
    """Every field of the CNN recipe (training, augmentation and its ranges, front end, filters)
    is in the run's config, and changing one makes a new run instead of reusing the old one."""
    from dataclasses import asdict, replace

    from embedkit.cnn.model import load_model
    from embedkit.pipeline import RunPlan, run_all

    plan = RunPlan.quick_plan(backbones=(), cnn_augment="specaugment", cnn_channels=(4, 8))
    plan = replace(plan, cnn_train=replace(plan.cnn_train, label_smoothing=0.1, lr_schedule="onecycle"))
    out = run_all(tiny_data, plan, cache=tmp_path / "cache", runs=tmp_path / "runs", report=None, threads=1)
    (run,) = out.runs
    m = run.metrics
    assert m["config"]["train"] == asdict(plan.train_config("cnn"))
    assert m["config"]["train"]["label_smoothing"] == 0.1 and m["config"]["train"]["lr_schedule"] == "onecycle"
    assert m["config"]["model"]["channels"] == [4, 8]
    assert m["spec"]["features"] == asdict(plan.cnn_features) and m["spec"]["features"]["sample_rate"] == 22050
    aug = m["config"]["augment"]
    assert list(aug["enabled"]) == ["specaugment"]
    assert (aug["freq_width"], aug["time_width"]) == (plan.cnn_augment_config.freq_width, 20)
    model = load_model(run.run_dir / "model.pt")  # the stored configs rebuild the network
    assert model.features == plan.cnn_features and model.meta["train_config"]["label_smoothing"] == 0.1

    again = run_all(tiny_data, plan, cache=tmp_path / "cache", runs=tmp_path / "runs", report=None, threads=1)
    assert again.runs[0].reused and again.runs[0].run_dir == run.run_dir
    wider = replace(plan, cnn_channels=(4, 16))
    other = run_all(tiny_data, wider, cache=tmp_path / "cache", runs=tmp_path / "runs", report=None, threads=1)
    assert not other.runs[0].reused and other.runs[0].run_dir != run.run_dir
    assert other.runs[0].metrics["config"]["model"]["channels"] == [4, 16]
