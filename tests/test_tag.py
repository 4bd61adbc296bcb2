"""`embedkit tag`: excerpts over full-length inputs, every run kind through the CLI, the results
database (re-runs, edits, second model, kill -9, concurrent writers, PostgreSQL), bad inputs."""

import glob
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.deploy.batch import Excerpt, expand_inputs, read_excerpt, tag
from embedkit.deploy.resultsdb import ResultsDB
from embedkit.deploy.tagger import load_tagger
from embedkit.errors import EmbedkitError
from embedkit.synth import make_clip

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
N_SYNTH = 20  # conftest's synth_dataset: 4 classes x 5 clips of 12 s


def _write(path: Path, seconds: float, sr: int, channels: int = 1, seed: int = 0) -> Path:
    y = make_clip(seed % 4, seed, sr, seconds)
    if channels == 2:
        y = np.stack([y, 0.5 * y], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, y, sr)
    return path


# ---------------------------------------------------------------------------------------------
# excerpts


def test_excerpt_parse():
    assert Excerpt.parse("first") == Excerpt("first") and str(Excerpt.parse("Spread:3")) == "spread:3"
    for bad in ("spread", "spread:0", "spread:x", "last", ""):
        with pytest.raises(EmbedkitError, match="--excerpt must be"):
            Excerpt.parse(bad)


@settings(max_examples=200, deadline=None)
@given(
    st.floats(0.5, 3600), st.floats(1, 60), st.integers(1, 9), st.sampled_from(["first", "middle", "spread", "full"])
)
def test_clip_starts_lie_inside_the_song(duration, clip, n, mode):
    starts = Excerpt(mode, n).clip_starts(duration, clip)
    if mode == "full":
        assert starts is None
        return
    room = max(0.0, duration - clip)
    assert all(0 <= s <= room + 1e-9 for s in starts)
    assert len(starts) == (n if mode == "spread" and room > 0 else 1)
    if mode == "middle":
        assert abs(starts[0] - room / 2) < 1e-9
    if mode == "spread" and room > 0 and n > 1:
        assert starts[0] == 0 and abs(starts[-1] - room) < 1e-6 and np.allclose(np.diff(starts), room / (n - 1))


@pytest.fixture(scope="module")
def long_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("long")
    return {
        "ten_minutes": _write(d / "ten.flac", 600.0, 8000, seed=1),
        "twelve_s": _write(d / "twelve.wav", 12.0, 22050, seed=2),
        "stereo48k": _write(d / "stereo.flac", 40.0, 48000, channels=2, seed=3),
        "mono8k": _write(d / "mono8k.wav", 45.0, 8000, seed=4),
    }


EXPECTED_STARTS = {  # (file, excerpt) -> window starts (s), clip 30 s, windows 5 s
    ("ten_minutes", "first"): [0, 5, 10, 15, 20, 25],
    ("ten_minutes", "middle"): [285 + 5 * k for k in range(6)],
    ("ten_minutes", "spread:3"): [s + 5 * k for s in (0, 285, 570) for k in range(6)],
    ("ten_minutes", "full"): [5 * k for k in range(120)],
    ("twelve_s", "first"): [0, 5],
    ("twelve_s", "middle"): [0, 5],
    ("twelve_s", "spread:3"): [0, 5],
    ("twelve_s", "full"): [0, 5],
    ("stereo48k", "middle"): [5 + 5 * k for k in range(6)],
    ("stereo48k", "spread:2"): [s + 5 * k for s in (0, 10) for k in range(6)],
    ("mono8k", "full"): [5 * k for k in range(9)],
    ("mono8k", "first"): [0, 5, 10, 15, 20, 25],
}


@pytest.mark.parametrize("name, excerpt", sorted(EXPECTED_STARTS))
def test_each_excerpt_covers_the_windows_it_claims(long_files, name, excerpt):
    from embedkit.audio import decoding as audio

    path = long_files[name]
    windows, starts, duration = read_excerpt(str(path), 16000, Excerpt.parse(excerpt), 30.0, 5.0, 5.0)
    np.testing.assert_allclose(starts, EXPECTED_STARTS[name, excerpt], atol=1e-6)
    assert windows.shape == (len(starts), 80000) and windows.dtype == np.float32
    # the windows are those of a full decode at the same positions (seeking is exact)
    y, sr = audio.decode(path)
    full = audio.resample(y, sr, 16000)
    for w, s in zip(windows, starts):
        i = int(round(s * 16000))
        np.testing.assert_allclose(w, full[i : i + 80000], atol=2e-3)
    assert abs(duration - len(y) / sr) < 0.05


def test_default_excerpt_is_the_measured_middle(runs, long_files):
    """tag's default (library and CLI) is DEFAULT_EXCERPT, "middle" (bench/bench_excerpts.py):
    on a 10-minute file it listens to the run's 12 s clip from 294 s (2 windows) and gives what
    --excerpt middle gives."""
    import inspect

    from embedkit.audio.excerpts import DEFAULT_EXCERPT
    from embedkit.cli.deploy import tag_cmd

    assert DEFAULT_EXCERPT == "middle" and Excerpt() == Excerpt("middle")
    assert inspect.signature(tag).parameters["excerpt"].default == DEFAULT_EXCERPT
    assert inspect.signature(tag_cmd).parameters["excerpt"].default.default == DEFAULT_EXCERPT
    path = long_files["ten_minutes"]
    default, middle = (tag(runs["head"], [path], keep_rows=1, **kw).rows[0] for kw in ({}, {"excerpt": "middle"}))
    assert default.excerpt == "middle" and default.n_windows == 2
    np.testing.assert_allclose(default.probabilities, middle.probabilities, rtol=1e-9, atol=1e-12)


def test_only_the_excerpt_is_decoded(long_files, monkeypatch):
    from embedkit.audio import decoding as audio

    calls = []
    real = audio.decode

    def spy(path, max_seconds=None, start_s=0.0):
        calls.append((start_s, max_seconds))
        return real(path, max_seconds, start_s)

    monkeypatch.setattr(audio, "decode", spy)
    read_excerpt(str(long_files["ten_minutes"]), 16000, Excerpt("middle"), 30.0, 5.0, 5.0)
    assert calls == [(284.75, 30.5)]
    calls.clear()
    read_excerpt(str(long_files["ten_minutes"]), 16000, Excerpt("first"), 30.0, 5.0, 5.0)
    assert calls == [(0.0, 30.25)]


def test_inputs_folders_lists_and_stdin(tmp_path):
    a = _write(tmp_path / "lib" / "x" / "a.wav", 6, 8000)
    b = _write(tmp_path / "lib" / "b.flac", 6, 8000, seed=1)
    (tmp_path / "lib" / "notes.txt").write_text("not audio, not listed")
    (tmp_path / "list.txt").write_text("lib/b.flac\n# comment\n\nlib/x/a.wav\n")
    (tmp_path / "list.csv").write_text("genre,path\nrock,lib/x/a.wav\n")
    assert expand_inputs([tmp_path / "lib"]) == [str(b), str(a)]  # sorted paths; notes.txt is not audio
    assert expand_inputs([tmp_path / "list.txt"]) == [str(b), str(a)]
    assert expand_inputs([tmp_path / "list.csv", tmp_path / "list.txt"]) == [str(a), str(b)]
    assert expand_inputs(["-"], stdin=[f"{a}\n", "\n", f"{b}\n", f"{a}\n"]) == [str(a), str(b)]
    assert expand_inputs([tmp_path / "missing.wav"]) == [str(tmp_path / "missing.wav")]


# ---------------------------------------------------------------------------------------------
# every run kind through the CLI


def _rows(db) -> list[dict]:
    with ResultsDB(db) as d:
        return d.rows()


@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_every_run_kind_tags_the_same_folder_through_the_cli(runs, tmp_path):
    db = tmp_path / "library.sqlite"
    for kind in ("head", "cnn", "finetune"):
        res = runner.invoke(
            app,
            [
                "tag",
                str(runs[kind]),
                str(runs["data"]),
                "--db",
                str(db),
                "--out",
                str(tmp_path / f"{kind}.csv"),
                "--workers",
                "2",
            ],
        )
        assert res.exit_code == 0, res.output
        # the default excerpt (middle; a 12 s clip: the same windows as first)
        assert f"{N_SYNTH} tracks tagged (middle, {2 * N_SYNTH} windows)" in " ".join(res.output.split())
        assert "genre" in res.output  # the table
    rows = _rows(db)
    assert len(rows) == 3 * N_SYNTH and len({r["model_id"] for r in rows}) == 3
    for r in rows:
        assert r["top_label"] == max(r["probabilities"], key=r["probabilities"].get) == r["decision"]
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-6 and r["n_windows"] == 2 and r["excerpt"] == "middle"
        assert r["topk"][0] == [r["top_label"], pytest.approx(r["top_p"])] and len(r["topk"]) == 3
        assert r["embedkit_version"] and r["created_at"] is not None and r["size"] > 0
    import pandas as pd

    for kind in ("head", "cnn", "finetune"):
        df = pd.read_csv(tmp_path / f"{kind}.csv")
        assert len(df) == N_SYNTH and np.allclose(df[[c for c in df if c.startswith("p_")]].sum(axis=1), 1, atol=1e-5)
    # head run: the same numbers as `predict` on the store (first excerpt of a 12 s clip = its store windows)
    from embedkit.fit import predict_store

    ref, _ = predict_store(runs["head"] / "head.skops", cache=runs["cache"])
    mid = [r for r in rows if r["model_kind"] == "head"]
    by_path = {r["path"]: r for r in mid}
    for r in ref.itertuples():
        got = by_path[str(Path(r.path).absolute())]["probabilities"]
        np.testing.assert_allclose(
            [got[l] for l in sorted(got)], [getattr(r, f"p_{l}") for l in sorted(got)], atol=1e-6
        )


def test_full_excerpt_reports_window_shares_and_jsonl(runs, tmp_path, long_files):
    out = tmp_path / "x.jsonl"
    res = tag(runs["head"], [long_files["mono8k"]], excerpt="full", out=out)
    assert res.n_tagged == 1
    import json

    (row,) = [json.loads(l) for l in out.read_text().splitlines()]
    assert row["n_windows"] == 9 and row["window_starts_s"] == [5.0 * k for k in range(9)]
    assert abs(sum(row["window_share"].values()) - 1) < 1e-9 and all(
        v * 9 == pytest.approx(round(v * 9)) for v in row["window_share"].values()
    )


# ---------------------------------------------------------------------------------------------
# database


@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_rerun_is_a_noop_edit_retags_second_model_leaves_first_untouched(runs, tmp_path):
    lib = tmp_path / "lib"
    shutil.copytree(runs["data"], lib)
    db = tmp_path / "db.sqlite"
    first = tag(runs["head"], [lib], db=db)
    assert first.n_tagged == N_SYNTH and first.model_loaded
    again = tag(runs["head"], [lib], db=db)
    assert (again.n_tagged, again.n_done_before, again.model_loaded) == (0, N_SYNTH, False)
    before = {(r["fingerprint"], r["model_id"]): r for r in _rows(db)}
    # edit one file in place: new content, new fingerprint, tagged again; nothing else redone
    victim = sorted(lib.glob("*/*.wav"))[3]
    sf.write(victim, make_clip(2, 999, 22050, 12.0), 22050)
    edited = tag(runs["head"], [lib], db=db)
    assert (edited.n_tagged, edited.n_done_before) == (1, N_SYNTH - 1)
    after = {(r["fingerprint"], r["model_id"]): r for r in _rows(db)}
    assert len(after) == N_SYNTH + 1 and all(after[k] == v for k, v in before.items())
    # a second model adds its rows and does not touch the first's
    tag(runs["mlp"], [lib], db=db)
    rows = {(r["fingerprint"], r["model_id"]): r for r in _rows(db)}
    assert len(rows) == 2 * N_SYNTH + 1 and all(rows[k] == v for k, v in after.items())
    # another excerpt for the same model replaces the row in place (one row per content and model)
    tag(runs["head"], [victim], db=db, excerpt="full")
    assert len(_rows(db)) == 2 * N_SYNTH + 1
    # a copy of a file is the same audio: already tagged
    shutil.copy(victim, tmp_path / "copy.wav")
    assert tag(runs["head"], [tmp_path / "copy.wav"], db=db, excerpt="full").n_done_before == 1


@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_nothing_to_do_does_not_load_a_model(runs, tmp_path):
    db = tmp_path / "db.sqlite"
    tag(runs["head"], [runs["data"]], db=db)
    code = (
        "import sys; from typer.testing import CliRunner; from embedkit.cli import app; "
        f"r = CliRunner().invoke(app, ['tag', {str(runs['head'])!r}, {str(runs['data'])!r}, '--db', {str(db)!r}]); "
        "print(r.exit_code, 'torch' in sys.modules, 'sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.split()[-3:] == ["0", "False", "False"], out.stdout + out.stderr


_KILL = """
import os, signal, sys
from embedkit.deploy.batch import tag
n = int(sys.argv[4])
def progress(done, total):
    if done >= n:
        os.kill(os.getpid(), signal.SIGKILL)
tag(sys.argv[1], [sys.argv[2]], db=sys.argv[3], batch_size=2, workers=1, out=sys.argv[5], progress=progress)
"""


# killed once 1 track is done in the fast tier, once 9 are (a longer prefix) in the slow one: the
# same resume rule, one more tagging subprocess (~2 s)
@pytest.mark.parametrize("kill_after", [1, pytest.param(9, marks=pytest.mark.slow)])
def test_kill_9_then_resume_loses_and_duplicates_nothing(runs, tmp_path, kill_after):
    db, ref_db = tmp_path / "db.sqlite", tmp_path / "ref.sqlite"
    out = tmp_path / "out.csv"
    p = subprocess.run(
        [sys.executable, "-c", _KILL, str(runs["head"]), str(runs["data"]), str(db), str(kill_after), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert p.returncode == -signal.SIGKILL, p.stderr
    killed = _rows(db)
    assert kill_after <= len(killed) < N_SYNTH and not out.exists()  # the out file is all or nothing
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    con.close()
    res = tag(runs["head"], [runs["data"]], db=db, out=out)
    assert (res.n_done_before, res.n_tagged) == (len(killed), N_SYNTH - len(killed))
    rows = _rows(db)
    assert len(rows) == N_SYNTH == len({r["fingerprint"] for r in rows})
    done = {r["fingerprint"]: r for r in rows}
    assert all(done[r["fingerprint"]] == r for r in killed)  # finished tracks were not recomputed
    tag(runs["head"], [runs["data"]], db=ref_db)
    for r in _rows(ref_db):
        assert done[r["fingerprint"]]["probabilities"] == pytest.approx(r["probabilities"], abs=1e-9)
    assert len(out.read_text().splitlines()) == N_SYNTH + 1


@pytest.mark.slow
def test_concurrent_tag_runs_share_one_sqlite_file(runs, tmp_path):
    db = tmp_path / "shared.sqlite"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmds = [
        [
            sys.executable,
            "-m",
            "embedkit.cli",
            "tag",
            str(runs[k]),
            str(runs["data"]),
            "--db",
            str(db),
            "--batch-size",
            "2",
            "--workers",
            "1",
            "--table",
            "0",
        ]
        for k in ("head", "mlp", "head")
    ]
    procs = [
        subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-500:] for o in outs]
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert con.execute("SELECT COUNT(*), COUNT(DISTINCT model_id) FROM tags").fetchone() == (2 * N_SYNTH, 2)
    assert con.execute("SELECT COUNT(*) FROM tag_failures").fetchone() == (0,)
    con.close()


@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_dask_shards_write_the_same_rows(runs, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        res = tag(runs["head"], [runs["data"]], db=tmp_path / "d.sqlite", executor=client, shard_size=7)
    assert res.n_tagged == N_SYNTH and not res.model_loaded
    tag(runs["head"], [runs["data"]], db=tmp_path / "l.sqlite")
    a = {r["fingerprint"]: r["probabilities"] for r in _rows(tmp_path / "d.sqlite")}
    b = {r["fingerprint"]: r["probabilities"] for r in _rows(tmp_path / "l.sqlite")}
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-9) for k in a)


# ---------------------------------------------------------------------------------------------
# PostgreSQL: a throwaway cluster


def _pg_bin(name: str) -> str | None:
    return shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)


@pytest.fixture(scope="module")
def postgres_url():
    pytest.importorskip("psycopg", reason="psycopg not installed (pip install 'embedkit[postgres]')")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found; scripts/test.sh installs Debian's postgresql"
        )
    as_user: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="embedkit-pg-"))
    if os.getuid() == 0:  # initdb refuses root: run the cluster as the postgres user
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run a throwaway cluster as")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = base / "data"
    r = subprocess.run(
        [*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"initdb failed: {r.stderr.strip().splitlines()[-1:]}")
    r = subprocess.run(
        [
            *as_user,
            pg_ctl,
            "-D",
            str(data),
            "-l",
            str(base / "log"),
            "-w",
            "-o",
            f"-k {base} -p {port} -c listen_addresses='' -c fsync=off",
            "start",
        ],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"pg_ctl start failed: {r.stderr.strip()[-300:]}")
    try:
        yield f"postgresql+psycopg://postgres@/postgres?host={base}&port={port}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_postgresql_results_database(runs, tmp_path, postgres_url):
    res = runner.invoke(app, ["tag", str(runs["head"]), str(runs["data"]), "--db", postgres_url, "--table", "0"])
    assert res.exit_code == 0, res.output
    again = tag(runs["head"], [runs["data"]], db=postgres_url)
    assert (again.n_tagged, again.n_done_before, again.model_loaded) == (0, N_SYNTH, False)
    tag(runs["mlp"], [runs["data"]], db=postgres_url)
    sqlite_db = tmp_path / "s.sqlite"
    tag(runs["head"], [runs["data"]], db=sqlite_db)
    pg = {(r["fingerprint"], r["model_id"]): r for r in _rows(postgres_url)}
    assert len(pg) == 2 * N_SYNTH
    for r in _rows(sqlite_db):
        assert pg[r["fingerprint"], r["model_id"]]["probabilities"] == pytest.approx(r["probabilities"], abs=1e-12)
    import sqlalchemy as sa

    eng = sa.create_engine(postgres_url)
    with eng.connect() as c:  # the README query, on PostgreSQL's JSON
        n = c.execute(sa.text("SELECT COUNT(*) FROM tags WHERE (probabilities->>'chime')::float > 0.0")).scalar_one()
    eng.dispose()
    assert n == 2 * N_SYNTH


# ---------------------------------------------------------------------------------------------
# bad inputs


@pytest.fixture
def messy(tmp_path, runs):
    lib = tmp_path / "messy"
    good = sorted(runs["data"].glob("*/*.wav"))[:3]
    lib.mkdir()
    for g in good:
        shutil.copy(g, lib / g.name)
    (lib / "empty.wav").write_bytes(b"")
    (lib / "notaudio.mp3").write_text("this is a text file\n")
    full = _write(tmp_path / "t.wav", 12, 22050)
    (lib / "truncated.wav").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    _write(lib / "short.wav", 2.0, 22050)
    sf.write(lib / "silent.wav", np.zeros(22050 * 6, np.float32), 22050)
    return lib


def test_bad_files_are_recorded_and_the_rest_finish(runs, messy, tmp_path):
    db = tmp_path / "db.sqlite"
    missing = tmp_path / "gone.wav"
    res = runner.invoke(app, ["tag", str(runs["head"]), str(messy), str(missing), "--db", str(db)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "3 tracks tagged" in text and "6 failed" in text and "Traceback" not in res.output
    expect = {
        "empty.wav": "empty file (0 bytes)",
        "notaudio.mp3": "cannot decode audio",
        "truncated.wav": "truncated",
        "short.wav": "too short: 2.00 s is less than one 5 s window",
        "silent.wav": "silent",
        "gone.wav": "file not found",
    }
    lines = [l for l in res.output.splitlines() if l.startswith("skipped ")]
    assert len(lines) == 6
    for name, reason in expect.items():
        assert any(name in l and reason in l for l in lines), (name, lines)
    with ResultsDB(db) as d:
        assert {Path(p).name for p in d.failed(_model_id(runs["head"]))} == set(expect)
    # failures are remembered: not retried (no model load) unless asked; --strict fails the run
    again = tag(runs["head"], [messy], db=db)
    assert (again.n_tagged, again.n_failed_before, again.n_failed, again.model_loaded) == (0, 5, 0, False)
    strict = runner.invoke(app, ["tag", str(runs["head"]), str(messy), "--db", str(db), "--strict"])
    assert strict.exit_code == 1 and "--strict: 5 of 8 files failed" in " ".join(strict.output.split())
    retried = tag(runs["head"], [messy], db=db, retry_failed=True)
    assert retried.n_failed == 5 and retried.model_loaded
    nothing = runner.invoke(app, ["tag", str(runs["head"]), str(messy / "empty.wav")])
    assert nothing.exit_code == 1 and "nothing could be tagged: 1 of 1 files failed" in nothing.output


def test_a_file_vanishing_mid_run_is_recorded(runs, tmp_path):
    lib = tmp_path / "lib"
    shutil.copytree(runs["data"], lib)
    last = sorted(lib.glob("*/*.wav"))[-1]

    def progress(done, total):
        if done >= 1 and last.exists():
            last.unlink()

    res = tag(runs["head"], [lib], batch_size=2, workers=1, progress=progress)
    assert res.n_tagged == N_SYNTH - 1 and res.failures == [{"path": str(last), "reason": "file not found"}]


def test_bad_arguments_are_one_line(runs, tmp_path):
    for args, msg in (
        (["--excerpt", "spread:0"], "--excerpt must be first, middle, spread:N"),
        (["--out", str(tmp_path / "x.parquet")], "use a .csv or .jsonl file name"),
        (["--db", str(tmp_path / "no" / "such" / "dir" / "x.sqlite")], "does not exist"),
        (["--top-k", "0"], "--top-k must be >= 1"),
    ):
        res = runner.invoke(app, ["tag", str(runs["head"]), str(runs["data"]), *args])
        assert res.exit_code == 1 and msg in res.output and "Traceback" not in res.output, res.output
    res = runner.invoke(app, ["tag", str(tmp_path / "norun"), str(runs["data"])])
    assert res.exit_code == 1 and "no such run directory or model file" in res.output
    res = runner.invoke(app, ["tag", str(runs["head"]), str(tmp_path)])
    assert res.exit_code == 1 and "no audio files found" in res.output


def _model_id(run) -> str:
    from embedkit.deploy.tagger import model_id_of

    return model_id_of(run)


def test_cli_reads_paths_from_stdin_and_lists(runs, tmp_path):
    files = sorted(runs["data"].glob("*/*.wav"))[:3]
    res = runner.invoke(
        app, ["tag", str(runs["head"]), "-", "--out", str(tmp_path / "a.jsonl")], input="".join(f"{f}\n" for f in files)
    )
    assert res.exit_code == 0, res.output
    assert [__import__("json").loads(l)["path"] for l in (tmp_path / "a.jsonl").read_text().splitlines()] == [
        str(f) for f in files
    ]
    (tmp_path / "new-uploads.txt").write_text("\n".join(str(f) for f in files[:2]) + "\n")
    res = runner.invoke(
        app, ["tag", str(runs["head"]), str(tmp_path / "new-uploads.txt"), "--excerpt", "spread:3", "--table", "0"]
    )
    assert res.exit_code == 0 and "2 tracks tagged (spread:3, 4 windows)" in " ".join(res.output.split()), res.output


# ---------------------------------------------------------------------------------------------
# chunked planning (memory flat in the number of inputs)


def _probs(rows) -> dict[str, list[float]]:
    return {r.path: list(r.probabilities) for r in rows}


@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_chunked_planning_gives_the_same_results_and_handles_copies_across_chunks(runs, tmp_path, monkeypatch):
    import embedkit.deploy.batch as tag_mod
    import embedkit.deploy.resultsdb as tagdb_mod

    lib = tmp_path / "lib"
    shutil.copytree(runs["data"], lib)
    first = sorted(lib.glob("*/*.wav"))[0]
    shutil.copy(first, lib / "zz-copy-of-first.wav")  # sorted last: a chunk after its original
    t = load_tagger(runs["head"])  # one tagger: a later load reads the head's numpy form (1e-8 apart)
    whole = tag(runs["head"], [lib], db=tmp_path / "whole.sqlite", keep_rows=100, workers=2, tagger=t)
    assert whole.n_tagged == N_SYNTH and len(whole.rows) == N_SYNTH + 1

    monkeypatch.setattr(tag_mod, "PLAN_CHUNK", 3)
    monkeypatch.setattr(tagdb_mod, "IN_CHUNK", 2)  # restricted queries span several IN clauses
    db = tmp_path / "chunked.sqlite"
    out = tmp_path / "chunked.jsonl"
    seen = []
    res = tag(
        runs["head"], [lib], db=db, out=out, keep_rows=100, workers=2, tagger=t, progress=lambda *a: seen.append(a)
    )
    assert (res.n_tagged, res.n_done_before, res.n_failed) == (N_SYNTH, 0, 0)  # the copy is not tagged again
    assert _probs(res.rows) == _probs(whole.rows)
    assert seen[-1] == (N_SYNTH + 1, N_SYNTH + 1) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == N_SYNTH + 1 and {x["path"] for x in lines} == set(_probs(whole.rows))
    assert ResultsDB(db).count() == N_SYNTH

    again = tag(runs["head"], [lib], db=db, workers=2)
    assert (again.n_tagged, again.n_done_before, again.model_loaded) == (0, N_SYNTH, False)


def test_results_db_restricted_queries(runs, tmp_path, monkeypatch):
    import embedkit.deploy.resultsdb as tagdb_mod

    db = tmp_path / "db.sqlite"
    res = tag(runs["head"], [runs["data"]], db=db, keep_rows=100)
    monkeypatch.setattr(tagdb_mod, "IN_CHUNK", 3)
    d = ResultsDB(db)
    everything = d.done(res.model_id, "middle")  # tag's default excerpt
    assert len(everything) == N_SYNTH
    some = sorted(everything)[:7]
    assert sorted(d.done(res.model_id, "middle", fingerprints=some)) == some
    paths = [everything[f]["path"] for f in some[:4]]
    assert sorted(d.done(res.model_id, "middle", paths=paths)) == sorted(some[:4])
    both = d.done(res.model_id, "middle", paths=paths, fingerprints=some[4:])
    assert sorted(both) == some  # rows matching either, once each
    assert d.done(res.model_id, "full", fingerprints=some) == {} and d.done("other", paths=paths) == {}
    assert d.failed(res.model_id, paths=paths) == {}
