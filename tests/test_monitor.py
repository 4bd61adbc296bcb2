"""`embedkit monitor` and the decision metrics: a generated results database spanning weeks with
a planted drift (one genre's share doubling, then a burst of noise tracks decided "not-music"):
the page shows it, `--check` fails on it and passes on the undrifted half; bad input is one line
each. The page in a real browser: test_monitor_renders_in_chromium (slow)."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from embedkit.cli import app

GENRES = ["blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock"]
MODEL = "ab" * 16
START = dt.datetime(2026, 10, 5, 12, tzinfo=dt.timezone.utc)  # a Monday: week 41
PER_WEEK = 400


def _week_decisions(week: int, drifted: bool) -> list[str]:
    """Exact counts (no sampling noise): 10 % uncertain, 2 % not-music, the rest a genre mix that
    is uniform, or from week 3 with metal doubled (and in week 5, 30 % noise tracks)."""
    n_nm = int(0.30 * PER_WEEK) if drifted and week == 5 else int(0.02 * PER_WEEK)
    n_unc = int(0.10 * PER_WEEK)
    n_g = PER_WEEK - n_nm - n_unc
    share = np.full(len(GENRES), 1.0)
    if drifted and week >= 3:
        share[GENRES.index("metal")] = 2.0 * 9 / 8  # metal 10 % -> 20 % of the genre decisions
    counts = np.floor(share / share.sum() * n_g).astype(int)
    counts[0] += n_g - counts.sum()
    out = [g for g, c in zip(GENRES, counts) for _ in range(c)]
    return out + ["uncertain"] * n_unc + ["not-music"] * n_nm


def make_monitor_db(path: Path, weeks: int = 6, drifted: bool = True, run_dir: Path | None = None) -> Path:
    """A results database of ``weeks`` weeks of tagging by one model (rows written through
    ResultsDB's own tables, created_at spread over each week)."""
    from embedkit.calibration import Calibration, DecisionRule
    from embedkit.deploy.resultsdb import ResultsDB

    rng = np.random.default_rng(0)
    artefact = ""
    if run_dir is not None:  # the model's run: its training prior (uniform) in calibration.json
        run_dir.mkdir(parents=True, exist_ok=True)
        cal = Calibration(labels=GENRES, method="none", rule=DecisionRule(threshold=0.5, not_music=1.2))
        cal.fitted_on["prior"] = {g: 0.1 for g in GENRES}
        cal.save(run_dir / "calibration.json")
        artefact = str(run_dir / "head.skops")
    rows, labels = [], []
    for w in range(weeks):
        for i, dec in enumerate(_week_decisions(w, drifted)):
            top = dec if dec in GENRES else GENRES[i % 10]
            p = np.full(10, 0.02)
            p[GENRES.index(top)] = 0.82 if dec in GENRES else 0.35
            p /= p.sum()
            fp = f"b3-{w:02d}{i:05d}" + "0" * 20
            t = START + dt.timedelta(days=7 * w, seconds=int(i * 500_000 / PER_WEEK))
            rows.append(
                {
                    "fingerprint": fp,
                    "model_id": MODEL,
                    "path": f"/music/w{w}/{i}.mp3",
                    "decision": dec,
                    "top_label": top,
                    "top_p": float(p.max()),
                    "not_music": float(rng.uniform(1.5, 4) if dec == "not-music" else rng.uniform(0.5, 1.1)),
                    "genres": [[dec, float(p.max())]] if dec in GENRES else [],
                    "rule": {"threshold": 0.5, "not_music": 1.2},
                    "probabilities": dict(zip(GENRES, map(float, p))),
                    "created_at": t,
                    "updated_at": t,
                }
            )
            if i % 20 == 0 and dec in GENRES:  # the random audit: a person's label, wrong 1 in 4
                labels.append(
                    {
                        "fingerprint": fp,
                        "source": "audit-sample",
                        "reviewer": "r",
                        "label": dec if (i // 20) % 4 else GENRES[(GENRES.index(dec) + 1) % 10],
                    }
                )
    with ResultsDB(path) as db:
        db.register_model(MODEL, "head", GENRES, artefact, "run-1" if run_dir else None)
        with db.engine.begin() as c:
            c.execute(db.tags.insert(), rows)
        if hasattr(db, "put_labels"):
            db.put_labels(labels)
    return path


@pytest.fixture(scope="module")
def dbs(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitor")
    return {
        "drifted": make_monitor_db(root / "drifted.sqlite", run_dir=root / "run"),
        "undrifted": make_monitor_db(root / "undrifted.sqlite", weeks=3, run_dir=root / "run"),
        "root": root,
    }


def test_the_summary_shows_the_planted_drift(dbs):
    from embedkit.deploy.monitor import summarise

    s = summarise(dbs["drifted"])
    (m,) = s["models"]
    assert m["prior_source"].startswith("the training tracks") and m["prior"]["metal"] == pytest.approx(0.1)
    ps = m["periods"]
    assert [p["period"] for p in ps] == ["2026-W41", "2026-W42", "2026-W43", "2026-W44", "2026-W45", "2026-W46"]
    assert all(p["n"] == PER_WEEK for p in ps)
    assert [round(p["not_music_rate"], 2) for p in ps] == [0.02] * 5 + [0.3]
    assert all(p["uncertain_rate"] == pytest.approx(0.10) for p in ps)
    assert all(p["drift"] < 0.005 for p in ps[:3]) and all(p["drift"] > 0.06 for p in ps[3:])
    assert ps[4]["mix"]["metal"] == pytest.approx(0.2, abs=0.01)
    if ps[0]["audit_n"]:  # the review queue's labels table is there: live accuracy with its interval
        lo, hi = ps[0]["accuracy_ci"]
        assert lo < ps[0]["accuracy"] < hi and 0.5 < ps[0]["accuracy"] < 0.95


def test_check_fails_on_the_drift_and_passes_on_the_undrifted_half(dbs):
    from embedkit.deploy.monitor import Limits, check, summarise

    lines = check(summarise(dbs["drifted"]), Limits())
    assert len(lines) == 2, lines
    assert "not-music rate 30.0% > 10.0%" in lines[0] and "2026-W46" in lines[0]
    assert "genre drift PSI" in lines[1] and "metal 10.0% -> 20." in lines[1]
    assert check(summarise(dbs["undrifted"]), Limits()) == []
    # limits are flags: a looser drift limit and not-music limit pass the drifted database too
    assert check(summarise(dbs["drifted"]), Limits(max_not_music=0.5, max_drift=0.2)) == []


def test_cli_page_and_exit_codes(dbs, tmp_path):
    run = CliRunner()
    page = tmp_path / "m.html"
    res = run.invoke(app, ["monitor", "--db", str(dbs["drifted"]), "-o", str(page)])
    assert res.exit_code == 0, res.output
    html = page.read_text()
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org", "")
    assert html.count('class="breach"') == 2 and "2026-W46" in html and "30.0 %" in html
    bad = run.invoke(app, ["monitor", "--db", str(dbs["drifted"]), "--check"])
    assert bad.exit_code == 1 and len([line for line in bad.stdout.splitlines() if line.startswith("model ")]) == 2
    ok = run.invoke(app, ["monitor", "--db", str(dbs["undrifted"]), "--check"])
    assert ok.exit_code == 0, ok.output
    daily = run.invoke(app, ["monitor", "--db", str(dbs["drifted"]), "--period", "day", "--check", "--max-drift", "1"])
    assert daily.exit_code == 1 and "not-music rate" in daily.stdout


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such database"),
        ("empty", "no tagged tracks yet"),
        ("other-version", "made by another embedkit version (tags has no decision"),
        ("not-embedkit", "not an embedkit results database"),
        ("unknown-model", "no rows for model ffff; models in the database: abababababab (2400 rows)"),
    ],
)
def test_bad_input_is_one_line(dbs, tmp_path, case, message):
    import sqlite3

    from embedkit.deploy.resultsdb import ResultsDB

    db, extra = tmp_path / f"{case}.sqlite", []
    if case == "empty":
        ResultsDB(db).close()
    elif case == "other-version":
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE tags (fingerprint TEXT, model_id TEXT, path TEXT, top_label TEXT, top_p REAL)")
        con.commit()
        con.close()
    elif case == "not-embedkit":
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE songs (x)")
        con.commit()
        con.close()
    elif case == "unknown-model":
        db, extra = dbs["drifted"], ["--model", "ffff"]
    res = CliRunner().invoke(app, ["monitor", "--db", str(db), "--check", *extra])
    assert res.exit_code == 1 and "Traceback" not in res.output
    (line,) = [line for line in res.output.splitlines() if line.strip()]
    assert message in line
    if case == "missing":
        assert not db.exists()  # monitoring never creates a database


def test_bad_limits_are_one_line(dbs):
    res = CliRunner().invoke(app, ["monitor", "--db", str(dbs["drifted"]), "--max-not-music", "1.5"])
    assert res.exit_code == 1 and "--max-not-music must be between 0 and 1" in res.output


def test_decision_metrics_for_prometheus():
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry, generate_latest

    from embedkit.calibration import DecisionRule
    from embedkit.deploy.monitor import DecisionMetrics
    from embedkit.deploy.records import TrackResult

    reg = CollectorRegistry()
    m = DecisionMetrics(reg)
    for dec, nm in (("metal", 0.8), ("uncertain", 0.9), ("not-music", 3.0), ("metal", None)):
        m.observe(TrackResult("x", None, "m", ["metal", "pop"], [0.7, 0.3], DecisionRule(), dec, [], [], not_music=nm))
    text = generate_latest(reg).decode()
    assert 'embedkit_decisions_total{decision="metal"} 2.0' in text
    assert 'embedkit_decisions_total{decision="not-music"} 1.0' in text
    assert "embedkit_not_music_rate 0.25" in text and "embedkit_uncertain_rate 0.25" in text
    assert re.search(r"embedkit_not_music_score_count 3\.0", text)
    assert re.search(r"embedkit_confidence_count 4\.0", text)


def test_serve_exposes_the_decision_metrics(tiny_holdout_run, synth_dataset):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from embedkit.deploy.serve import ServeConfig, create_app
    from embedkit.deploy.tagger import load_tagger

    app_ = create_app(load_tagger(tiny_holdout_run), ServeConfig())
    clip = sorted(Path(synth_dataset).glob("*/*.wav"))[0]
    with TestClient(app_, base_url="http://localhost") as client:
        answer = client.post("/v1/tag", content=clip.read_bytes(), headers={"Content-Type": "audio/wav"}).json()
        text = client.get("/metrics").text
    assert answer["not_music"] is not None
    assert f'embedkit_decisions_total{{decision="{answer["decision"]}"}} 1.0' in text
    assert "embedkit_not_music_score_count 1.0" in text and "embedkit_confidence_count 1.0" in text
    for name in ("embedkit_not_music_rate", "embedkit_uncertain_rate"):
        assert name in text


@pytest.mark.slow
def test_monitor_renders_in_chromium(dbs, tmp_path):
    from test_report_browser import CHROMIUM, chromium, console_messages

    if CHROMIUM is None:
        pytest.skip("Chromium not installed (Debian: apt-get install -y chromium)")
    from embedkit.deploy.monitor import build_monitor

    out, _, breaches = build_monitor(dbs["drifted"], tmp_path / "monitor.html")
    res = chromium(tmp_path, out.as_uri(), "--dump-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    assert console_messages(res.stderr) == []
    dom = res.stdout
    assert dom.count('class="breach"') == 2 and "genre drift PSI" in dom
    assert dom.count('class="period"') == 6 and "<svg" in dom
    shot = tmp_path / "m.png"
    res = chromium(tmp_path, out.as_uri(), f"--screenshot={shot}", "--window-size=1200,1600")
    assert res.returncode == 0 and shot.stat().st_size > 10_000
    json.dumps(breaches)
