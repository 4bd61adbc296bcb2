"""Write-ahead of `tag --write-tags` / `untag` (embedkit.deploy.writeback): a tagger killed
(kill -9, a real subprocess) at each step of a write loses no genre, writes no wrong one,
leaves no temporary and `untag` restores every original; a file whose content changed since it
was tagged gets nothing; undo keeps the history; a moved file is found by content."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

pytest.importorskip("mutagen")

import test_tag  # noqa: E402

from embedkit.cli import app  # noqa: E402
from embedkit.deploy import filetags as tw  # noqa: E402
from embedkit.deploy import writeback as wb  # noqa: E402
from embedkit.deploy.batch import tag  # noqa: E402
from embedkit.deploy.resultsdb import ResultsDB  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
postgres_url = test_tag.postgres_url  # a throwaway PostgreSQL cluster (module-scoped fixture)
PERSON = ["Jazz", "Électro-swing"]
#: every step of one write: the five hooks of writeback.STEPS and the replace itself
STEPS = ["before-intent", "after-intent", "before-replace", "after-replace", "before-done", "after-done"]


@pytest.fixture
def library(synth_dataset, tmp_path):
    """Four 6 s clips of the synthetic set (one per genre) as FLAC (one carrying a person's
    genres), MP3, OGG and FLAC."""
    out = tmp_path / "library"
    out.mkdir()
    clips = sorted(synth_dataset.glob("*/*.wav"))[::5][:4]
    files = []
    for src, ext in zip(clips, ("flac", "mp3", "ogg", "flac"), strict=True):
        y, sr = sf.read(src, frames=6 * 22050)
        dst = out / f"{src.parent.name}-{src.stem}.{ext}"
        kw = {"format": "MP3"} if ext == "mp3" else {"format": "OGG", "subtype": "VORBIS"} if ext == "ogg" else {}
        sf.write(dst, y, sr, **kw)
        files.append(dst)
    f = tw._open(files[0], "flac")  # a person's tag editor
    tw._set(f, "flac", tw.TagState(PERSON))
    f.save()
    return files


def _opts(**kw):
    return wb.FileTagOptions(overwrite=True, **kw)


def _tag(run, files, db, **kw):
    return tag(run, files, db=db, workers=1, threshold=0.0, **kw)


def _values(path: Path):
    """Every tag value of a file (as mutagen reads them) and its decoded audio."""
    import mutagen

    tags = mutagen.File(path).tags
    items = sorted((str(k), str(v)) for k, v in (tags.items() if tags else []))
    return items, sf.read(path, dtype="float32")[0]


def _assert_restored(path: Path, original: bytes, copy: Path):
    """Byte-identical where the format allows; else every tag value and the audio identical."""
    if path.read_bytes() == original:
        return
    copy.write_bytes(original)
    (a, x), (b, y) = _values(path), _values(copy)
    assert a == b, path
    np.testing.assert_array_equal(x, y)


def _journal(db) -> list[dict]:
    with ResultsDB(db) as d:
        t = wb.journal_table(d)
        with d.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(t.select().order_by(t.c.id))]


def _temporaries(folder: Path) -> list[Path]:
    return list(folder.glob(".*.embedkit-*.tmp"))


#: the child's fault point: SIGKILL itself at ``step`` of the write into ``victim``
_FAULT = textwrap.dedent(
    """
    import os, signal
    from pathlib import Path
    from embedkit.deploy import filetags, writeback
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    if step == "before-replace":
        filetags._before_replace = lambda tmp: die() if tmp.name.startswith("." + Path(victim).name) else None
    else:
        writeback._fault = lambda s, p: die() if (s, p) == (step, victim) else None
    """
)

KILLER = (
    textwrap.dedent(
        """
    import pickle, sys
    from pathlib import Path
    results, db, step, victim = pickle.loads(Path(sys.argv[1]).read_bytes())
    """
    )
    + _FAULT
    + textwrap.dedent(
        """
    from embedkit.deploy import writeback
    from embedkit.deploy.resultsdb import ResultsDB
    w = writeback.FileTagWriter(ResultsDB(db), results[0].model_id, writeback.FileTagOptions(overwrite=True))
    for r in results:
        w.write(r)
    """
    )
)


# ~1 s each (a writer subprocess): the steps that end in a roll-back, a left temporary and a
# recovery in the fast tier, the others in the slow one
FAST_STEPS = ("after-intent", "before-replace", "after-replace")


@pytest.mark.parametrize("step", [s if s in FAST_STEPS else pytest.param(s, marks=pytest.mark.slow) for s in STEPS])
def test_kill_9_at_each_step_of_a_write_loses_and_miswrites_nothing(step, runs, library, tmp_path):
    run, db = runs["head"], tmp_path / "lib.sqlite"
    original = {p: p.read_bytes() for p in library}
    res = _tag(run, library, db)  # the results (database rows) the killed run had committed
    want = {r.path: r.genres for r in res.rows}
    assert all(want.values()) and len(want) == 4
    job = tmp_path / "job.pkl"
    victim = str(library[1].absolute())  # the second file: the first is done, the others not begun
    job.write_bytes(pickle.dumps((res.rows, str(db), step, victim)))
    p = subprocess.run([sys.executable, "-c", KILLER, str(job)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    killed = _journal(db)
    assert [e["status"] for e in killed if e["path"] == victim] == (
        [] if step == "before-intent" else ["written"] if step == "after-done" else ["pending"]
    )
    assert tw.read_tags(library[0]).genre == want[str(library[0].absolute())]
    assert all(q.read_bytes() == original[q] for q in library[2:])
    victim_now = library[1].read_bytes()
    assert victim_now == original[library[1]] or tw.read_tags(library[1]).genre == want[victim]
    if step == "before-replace":
        assert _temporaries(library[1].parent)  # the kill left the tagged copy behind

    # the next run: the interrupted write is settled, every file gets its genres, no temporary is left
    again = _tag(run, library, db, file_tags=_opts())
    report = again.file_tags
    if step == "before-replace":
        assert report.n_removed == 1
    if step not in ("before-intent", "after-done"):
        assert report.counts["recovered" if step in ("after-replace", "before-done") else "rolled-back"] == 1
    for q in library:
        st = tw.read_tags(q)
        assert st.genre == want[str(q.absolute())] and st.written_by_embedkit, (q, st)  # none lost, none wrong
    assert not _temporaries(library[0].parent)
    assert not [e for e in _journal(db) if e["status"] == "pending"]

    # and untag gives every file back as it was, the person's genres included
    code = CliRunner().invoke(app, ["untag", str(run), "--db", str(db)])
    assert code.exit_code == 0, code.output
    assert "4 written" in " ".join(code.output.split())
    for q in library:
        _assert_restored(q, original[q], tmp_path / f"orig{q.suffix}")
    # byte for byte: the FLAC that had tags, the MP3 and the OGG (a FLAC without any tag gets a
    # comment block: value for value, above)
    assert all(q.read_bytes() == original[q] for q in library[:3])
    assert tw.read_tags(library[0]) == tw.TagState(PERSON)
    assert not [e for e in _journal(db) if e["status"] in ("pending", "written")]


_CLI_KILLER = (
    textwrap.dedent(
        """
    import sys
    step, victim = sys.argv[1], sys.argv[2]
    """
    )
    + _FAULT
    + textwrap.dedent(
        """
    from embedkit.cli import app
    app(sys.argv[3:])
    """
    )
)


@pytest.mark.slow
@pytest.mark.parametrize("step", STEPS)
def test_kill_9_of_the_tag_command_then_rerun_and_untag(step, runs, library, tmp_path):
    """The whole command killed (model, planning, database rows and all), then the same
    command again and untag, through the CLI."""
    run, db = runs["head"], tmp_path / "lib.sqlite"
    original = {p: p.read_bytes() for p in library}
    cmd = ["tag", str(run), *map(str, library), "--db", str(db), "--workers", "1", "--threshold", "0"]
    victim = str(library[2].absolute())
    p = subprocess.run(
        [sys.executable, "-c", _CLI_KILLER, step, victim, *cmd, "--write-tags", "--overwrite"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    res = CliRunner().invoke(app, [*cmd, "--write-tags", "--overwrite"])
    assert res.exit_code == 0, res.output
    with ResultsDB(db) as d:
        decided = {r["path"]: r["decision"] for r in d.rows()}
    for q in library:
        st = tw.read_tags(q)
        assert st.written_by_embedkit and st.genre == [decided[str(q.absolute())]]
    assert not _temporaries(library[0].parent)
    res = CliRunner().invoke(app, [*cmd])  # a plain re-run: everything is already done
    assert res.exit_code == 0 and "0 tracks tagged" in " ".join(res.output.split()), res.output
    res = CliRunner().invoke(app, ["untag", str(run), "--db", str(db)])
    assert res.exit_code == 0, res.output
    for q in library:
        _assert_restored(q, original[q], tmp_path / f"orig{q.suffix}")
    assert tw.read_tags(library[0]) == tw.TagState(PERSON)


def test_the_intent_is_committed_durably_before_the_file_changes(runs, library, tmp_path):
    """The intent's commit runs under synchronous=FULL (survives power loss) and is in the
    database, with the state before, when the file is replaced."""
    import sqlalchemy as sa

    run, db = runs["head"], tmp_path / "lib.sqlite"
    res = _tag(run, library[:1], db)
    d = ResultsDB(db)
    sql: list[str] = []
    sa.event.listen(d.engine, "before_cursor_execute", lambda c, cur, s, *a: sql.append(" ".join(s.split())))
    seen = {}

    def at_replace(tmp):  # read on another connection: what a crash now would leave on disk
        seen["journal"] = [e for e in _journal(db) if e["status"] == "pending"]

    tw_hook, tw._before_replace = tw._before_replace, at_replace
    try:
        w = wb.FileTagWriter(d, res.model_id, _opts())
        ch = w.write(res.rows[0])
    finally:
        tw._before_replace = tw_hook
        d.close()
    assert ch.status == "written"
    (e,) = seen["journal"]
    assert e["before"]["genre"] == PERSON and e["genres"] == res.rows[0].genres and e["date"]
    full = sql.index("PRAGMA synchronous=FULL")
    insert = next(i for i, s in enumerate(sql) if s.startswith("INSERT INTO tag_journal"))
    assert full < insert < sql.index("PRAGMA synchronous=NORMAL", insert)
    (done,) = _journal(db)
    assert done["status"] == "written" and done["after"] == wb._after(ResultsDB(db), str(library[0]))[0]


def test_a_file_replaced_by_other_audio_mid_run_gets_nothing(runs, library, synth_dataset, tmp_path, monkeypatch):
    """The issue's z_mod.flac: swapped for another clip after it was tagged, before its write."""
    run, db = runs["head"], tmp_path / "lib.sqlite"
    victim = library[3]
    other = tmp_path / "other.flac"
    y, sr = sf.read(sorted(synth_dataset.glob("*/*.wav"))[1], frames=5 * 22050)  # other audio
    sf.write(other, y, sr)
    swapped = other.read_bytes()
    write = wb.FileTagWriter.write

    def swap_then_write(self, r):
        if Path(r.path) == victim.absolute():
            shutil.copyfile(other, victim)
        return write(self, r)

    monkeypatch.setattr(wb.FileTagWriter, "write", swap_then_write)
    res = _tag(run, library, db, file_tags=_opts())
    assert res.file_tags.counts["changed"] == 1 and res.file_tags.counts["written"] == 3
    (ch,) = [n for n in res.file_tags.notes if n.status == "changed"]
    assert ch.path == str(victim.absolute()) and "changed since tagging" in ch.reason
    assert victim.read_bytes() == swapped  # nothing written into the new audio
    refused = [e for e in _journal(db) if e["status"] == "refused"]
    assert [e["path"] for e in refused] == [str(victim.absolute())]
    monkeypatch.undo()
    # the next run tags the new content, and writes its own genre
    again = _tag(run, library, db, file_tags=_opts())
    assert again.n_tagged == 1 and again.file_tags.counts["written"] == 1
    assert tw.read_tags(victim).genre == [r.genres for r in again.rows if r.path == str(victim.absolute())][0]


def test_a_touched_file_with_the_same_content_is_written(runs, library, tmp_path):
    """The fast check (size, mtime_ns, inode) differs, the fingerprint does not: written."""
    run, db = runs["head"], tmp_path / "lib.sqlite"
    res = _tag(run, library[1:2], db)
    st = library[1].stat()
    os.utime(library[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    w = wb.FileTagWriter(ResultsDB(db), res.model_id, _opts())
    assert w.write(res.rows[0]).status == "written"


def test_a_file_replaced_while_its_intent_is_committed_gets_nothing(runs, library, tmp_path, monkeypatch):
    """The narrowest window: replaced after the content check, before the write."""
    run, db = runs["head"], tmp_path / "lib.sqlite"
    res = _tag(run, library[1:2], db)
    data = library[2].read_bytes()

    def swap(step, path):
        if step == "after-intent":
            library[1].write_bytes(data)

    monkeypatch.setattr(wb, "_fault", swap)
    w = wb.FileTagWriter(ResultsDB(db), res.model_id, _opts())
    ch = w.write(res.rows[0])
    assert ch.status == "changed" and library[1].read_bytes() == data
    assert [e["status"] for e in _journal(db)] == ["refused"]


def test_untag_restores_the_state_before_the_latest_write(runs, library, tmp_path):
    """Write (Jazz / Électro-swing -> a genre), the person sets "Nu-Jazz", a re-run with
    --overwrite writes again: untag gives back "Nu-Jazz". One untag closes the history: a second
    one has nothing left (it does not walk back past the person's edit)."""
    run, db = runs["head"], tmp_path / "lib.sqlite"
    f = library[0]
    first = _tag(run, [f], db, file_tags=_opts())
    assert first.file_tags.counts["written"] == 1
    st = tw.read_tags(f)
    edited = tw.TagState(["Nu-Jazz"], st.provenance)  # a tag editor changes the genre only
    m = tw._open(f, "flac")
    tw._set(m, "flac", edited)
    m.save()
    assert _tag(run, [f], db, file_tags=wb.FileTagOptions()).file_tags.counts["kept"] == 1  # no --overwrite
    again = _tag(run, [f], db, file_tags=_opts())
    assert again.file_tags.counts["written"] == 1 and tw.read_tags(f).written_by_embedkit
    out = CliRunner().invoke(app, ["untag", str(run), "--db", str(db)])
    assert out.exit_code == 0 and "1 written" in out.output, out.output
    assert tw.read_tags(f) == edited
    assert [e["status"] for e in _journal(db)] == ["undone", "undone"]
    out = CliRunner().invoke(app, ["untag", str(run), "--db", str(db)])
    assert out.exit_code == 1 and "no files recorded" in out.output


def test_untag_walks_back_over_the_models_own_writes(runs, library, tmp_path):
    """Two writes by one model with no edit between (a re-run under another rule): untag gives
    back what the file held before the first."""
    run, db = runs["head"], tmp_path / "lib.sqlite"
    f = library[0]
    original = f.read_bytes()
    _tag(run, [f], db, file_tags=_opts())
    two = tag(
        run, [f], db=db, workers=1, threshold=0.0, multi=True, multi_threshold=0.0, max_genres=2, file_tags=_opts()
    )
    assert two.file_tags.counts["written"] == 1 and len(tw.read_tags(f).genre) == 2
    rep = wb.untag_files(run, str(db))
    assert rep.counts["written"] == 1 and f.read_bytes() == original


def test_untag_finds_a_moved_file_by_content(runs, library, tmp_path):
    run, db = runs["head"], tmp_path / "lib.sqlite"
    original = {p: p.read_bytes() for p in library}
    _tag(run, library, db, file_tags=_opts())
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    new = moved / "renamed.mp3"
    shutil.move(library[1], new)
    edited = moved / "retitled.ogg"  # moved and a tag other than the genre edited: found by its write's mark
    shutil.move(library[2], edited)
    m = tw._open(edited, "ogg")
    m.tags["TITLE"] = ["a title"]
    m.save()
    out = CliRunner().invoke(app, ["untag", str(run), "--db", str(db), "--dry-run"])
    text = " ".join(out.output.split())
    assert out.exit_code == 0 and "2 missing" in text and f"embedkit untag {run} NEW_PATH --db {db}" in text, text
    out = CliRunner().invoke(app, ["untag", str(run), "--db", str(db), str(moved)])
    assert out.exit_code == 0 and "2 written" in out.output, out.output
    _assert_restored(new, original[library[1]], tmp_path / "o.mp3")
    assert tw.read_tags(edited) == tw.TagState(None) and tw._open(edited, "ogg").tags["TITLE"] == ["a title"]
    out = CliRunner().invoke(app, ["untag", str(run), "--db", str(db)])  # the other two, where they are
    assert out.exit_code == 0 and "2 written" in out.output and "missing" not in out.output, out.output
    assert library[0].read_bytes() == original[library[0]]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temporaries_of_killed_writers_are_removed_and_reported(runs, library, tmp_path):
    run, db = runs["head"], tmp_path / "lib.sqlite"
    folder = library[0].parent
    left = folder / f".{library[1].name}.embedkit-{_dead_pid()}.tmp"
    left.write_bytes(library[1].read_bytes())
    live = folder / f".{library[2].name}.embedkit-{os.getppid()}.tmp"  # a writer at work: kept
    live.write_bytes(b"x")
    dry = _tag(run, library, db, file_tags=_opts(dry_run=True))
    assert dry.file_tags.n_removed == 0 and left.exists()  # a dry run writes nothing
    res = CliRunner().invoke(
        app, ["tag", str(run), *map(str, library), "--db", str(db), "--threshold", "0", "--write-tags", "--overwrite"]
    )
    text = " ".join(res.output.split())
    assert res.exit_code == 0 and "removed 1 temporary copies left by a killed tag writer" in text, text
    assert not left.exists() and live.exists()
    live.unlink()
    left.write_bytes(b"y")
    rep = wb.untag_files(run, str(db))
    assert rep.n_removed == 1 and not left.exists() and rep.counts["written"] == 4


def test_an_older_databases_records_move_into_the_journal(runs, library, tmp_path):
    """tag_writes (one row per file and model, before the journal) is read as history."""
    import sqlalchemy as sa

    run, db = runs["head"], tmp_path / "lib.sqlite"
    res = _tag(run, library[:1], db)
    before = tw.read_tags(library[0]).to_dict()
    ch = tw.write_genres(library[0], res.rows[0].genres, model=res.model_id, overwrite=True)
    assert ch.status == "written"
    with ResultsDB(db) as d:
        old = sa.Table(
            "tag_writes",
            sa.MetaData(),
            sa.Column("path", sa.Text, primary_key=True),
            sa.Column("model_id", sa.String(64), primary_key=True),
            sa.Column("genres", sa.JSON),
            sa.Column("before", sa.JSON),
            sa.Column("status", sa.String(16)),
            sa.Column("reason", sa.Text),
            sa.Column("written_at", sa.DateTime(timezone=True)),
            sa.Column("updated_at", sa.DateTime(timezone=True)),
        )
        old.create(d.engine)
        with d.engine.begin() as c:
            c.execute(
                old.insert(),
                [{"path": str(library[0].absolute()), "model_id": res.model_id, "before": before, "status": "written"}],
            )
    rep = wb.untag_files(run, str(db))
    assert rep.counts["written"] == 1 and tw.read_tags(library[0]) == tw.TagState(PERSON)


def test_an_intent_of_a_writer_at_work_is_left_to_it(runs, library, tmp_path):
    """A pending intent whose writer is alive (and started before it) is not settled by another
    run; one whose pid now belongs to a later process, or to a dead one, is."""
    import datetime as dt
    import socket

    run, db = runs["head"], tmp_path / "lib.sqlite"
    res = _tag(run, library[1:2], db)
    r = res.rows[0]
    host = socket.gethostname()
    d = ResultsDB(db)
    t = wb.journal_table(d)
    live = f"{host}:{os.getppid()}"  # pytest's parent: alive, started long before now
    assert wb._at_work(live, wb._now()) and not wb._at_work(live, wb._now() - dt.timedelta(days=3650))
    assert not wb._at_work(f"{host}:{_dead_pid()}", wb._now())
    assert wb._at_work("another-host:1", wb._now()) and not wb._at_work(
        "another-host:1", wb._now() - dt.timedelta(hours=1)
    )
    row = wb._row(r.path, r.model_id, r.fingerprint, r.genres, tw.read_tags(r.path).to_dict(), "x", "pending", "")
    with d.engine.begin() as c:
        c.execute(t.insert(), [{**row, "owner": live}])
    assert wb.recover(d, t) == []  # left to its writer
    with d.engine.begin() as c:
        c.execute(t.update().values(owner=f"{host}:{_dead_pid()}"))
    (ch,) = wb.recover(d, t)
    assert ch.status == "rolled-back" and [e["status"] for e in _journal(db)] == ["rolled-back"]
    d.close()


def test_untag_of_a_moved_file_says_what_to_do(runs, library, tmp_path):
    run, db = runs["head"], tmp_path / "lib.sqlite"
    _tag(run, library[1:2], db, file_tags=_opts())
    gone = library[1]
    shutil.move(gone, tmp_path / "x.mp3")
    for args in ([], [str(gone)]):
        out = CliRunner().invoke(app, ["untag", str(run), "--db", str(db), *args])
        lines = [line for line in out.output.splitlines() if "file not found" in line]
        assert out.exit_code == 0 and len(lines) == 1 and "1 missing" in out.output, out.output
        assert lines[0].startswith(f"missing {gone}: file not found (moved or renamed?); give its new path")
        assert f"embedkit untag {run} NEW_PATH --db {db}" in lines[0]


@pytest.mark.slow
def test_write_ahead_on_postgresql(runs, library, postgres_url, monkeypatch):
    """The journal on PostgreSQL: a run interrupted after a replace, settled by the next run,
    then untag."""
    url, run = postgres_url, runs["head"]
    original = {p: p.read_bytes() for p in library}

    class Crash(BaseException):
        pass

    def crash(step, path):
        if step == "after-replace" and path == str(library[2].absolute()):
            raise Crash

    monkeypatch.setattr(wb, "_fault", crash)
    with pytest.raises(Crash):
        _tag(run, library, url, file_tags=_opts())
    monkeypatch.setattr(wb, "_fault", None)
    again = _tag(run, library, url, file_tags=_opts())
    assert again.file_tags.counts["recovered"] == 1
    assert all(tw.read_tags(q).written_by_embedkit for q in library)
    rep = wb.untag_files(run, url)
    assert rep.counts["written"] == 4
    assert all(q.read_bytes() == original[q] for q in library[:3])


def test_an_interrupted_write_into_a_file_moved_since_is_settled_where_it_is(runs, library, tmp_path):
    """Killed after the replace, the file moved before the next run: untag NEW_FOLDER finds it
    by the write's mark, completes the record and restores the person's genres."""
    run, db = runs["head"], tmp_path / "lib.sqlite"
    original = library[0].read_bytes()
    res = _tag(run, library[:1], db)
    job = tmp_path / "job.pkl"
    job.write_bytes(pickle.dumps((res.rows, str(db), "after-replace", str(library[0].absolute()))))
    p = subprocess.run([sys.executable, "-c", KILLER, str(job)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(library[0], moved / "x.flac")
    out = CliRunner().invoke(app, ["untag", str(run), "--db", str(db)])
    text = " ".join(out.output.split())
    assert "1 pending" in text and "could not be checked" in text and "NEW_PATH" in text, text
    out = CliRunner().invoke(app, ["untag", str(run), "--db", str(db), str(moved)])
    text = " ".join(out.output.split())
    assert out.exit_code == 0 and "1 recovered" in text and "1 written" in text, text
    assert (moved / "x.flac").read_bytes() == original
    assert [e["status"] for e in _journal(db)] == ["undone"]
