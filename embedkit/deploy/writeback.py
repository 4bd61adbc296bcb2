"""Genres decided by ``embedkit tag`` written into the files, and undone: ``tag --write-tags``
and ``embedkit untag``.

    results (embedkit.deploy.records.TrackResult: the genres decided under the rule applied, the
    model's default or the command's --threshold / --multi ...) -> per file: is it still the
    content that was tagged? -> intent in the journal (committed durably) ->
    embedkit.deploy.filetags.write_genres -> the entry marked "written"

Write-ahead: the results database's ``tag_journal`` holds one row per write into a file (id,
path, model_id, the content ``fingerprint`` tagged, the file's tag state ``before`` the write
(JSON), the ``genres`` written, the EMBEDKIT_DATE ``date`` written (a marker unique to this
write), ``after`` / ``size``: the fingerprint and size of the file once written, status,
reason, owner (host:pid), created_at / updated_at (UTC)). The intent row ("pending") is
committed before the file is replaced, durably (SQLite ``synchronous=FULL`` for that commit;
PostgreSQL commits are durable by default), then the file is replaced, then the row is marked
"written". A process killed (or a machine losing power) at any point leaves either no intent
(the file untouched) or an intent that the next ``tag --write-tags`` or ``untag`` resolves by
reading the file: it carries this write's model and date -> "written" (recovered); it holds the
state before -> "rolled-back"; anything else (someone changed it since) -> kept as "written", so
its undo state is never lost. Other statuses: "undone" (restored by untag or cleared), "refused"
(the file no longer held the content that was tagged: nothing written).

History: each write is its own row, so ``untag`` restores the state before the latest run of
this model's writes into the file (walking back over entries whose ``before`` is this model's
own earlier write, never over a person's edit). One untag closes the whole history of a file
("undone"): a second untag does not walk further back (a person's edit between two embedkit
writes was the person's decision; the genres embedkit wrote before it are not brought back).
Models stacked on a file (``retrain --promote``: the new model writes over the old one's genre)
are undone one at a time (``untag NEW`` puts back the old model's write, byte for byte) or all
at once: ``untag OLD`` walks back over the later models' untouched writes to the originals.

After a write the file's bytes (and so its content fingerprint) change while its audio does
not: the results row is copied under the new fingerprint, so the next ``embedkit tag`` run does
not decode the file again. A database of an older embedkit (table ``tag_writes``: one row per
file and model) is moved into the journal on first use.

What a file's TagChange can say besides filetags' statuses: "changed" (not the content that
was tagged: nothing written), "recovered" / "rolled-back" / "pending" (an interrupted write
settled, or not yet: its file is unreadable or gone), "missing" (untag: the file is not at its
recorded path; ``untag`` given its new path or folder finds it by content), "cleared" (an
uncertain or not-music re-run took embedkit's genre back out), "not-music" (the decision was
``embedkit.calibration.NOT_MUSIC``: the file is not opened for writing).

Content check before each write: the file's (size, mtime_ns, inode) as fingerprinted, else its
content fingerprint, and again its stat right after the intent is committed; the window left
is the time between that stat and write_genres' own (it refuses a file that changes while its
copy is tagged).
"""

from __future__ import annotations

import datetime as _dt
import os
import socket
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..errors import EmbedkitError
from ..processes import alive, started_at
from .filetags import TagChange, TagState, clean_temporaries, format_of, read_tags, restore, write_genres

JOURNAL_TABLE = "tag_journal"
LEGACY_TABLE = "tag_writes"  # before the journal: (path, model_id) -> the state before the first write

#: fault-injection hook (tests): called as ``_fault(step, path)`` at each step of a write, one of
#: STEPS (the replace itself: ``filetags._before_replace``)
_fault: Callable[[str, str], None] | None = None
STEPS = ("before-intent", "after-intent", "after-replace", "before-done", "after-done")
#: seconds an intent recorded by a writer on another machine (a shared PostgreSQL database) is
#: left to it before it is resolved here: a write takes milliseconds
OTHER_HOST_S = 60.0


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _step(name: str, path: str) -> None:
    if _fault is not None:
        _fault(name, path)


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _at_work(owner: str | None, since: _dt.datetime | None) -> bool:
    """Whether the writer that recorded an intent (``owner`` host:pid, at ``since``) may still be
    writing it: a live process on this machine that started before the intent (not a later
    process that reuses the pid); on another machine, an intent younger than OTHER_HOST_S."""
    host, _, pid = (owner or "").rpartition(":")
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=_dt.timezone.utc)  # SQLite hands back naive UTC
    if host != socket.gethostname():
        return bool(host) and since is not None and (_now() - since).total_seconds() < OTHER_HOST_S
    if not pid.isdigit() or int(pid) == os.getpid() or not alive(int(pid)):
        return False
    started = started_at(int(pid))
    return started is None or since is None or started <= since.timestamp() + 1


def journal_table(db):
    """The ``tag_journal`` table of a ``resultsdb.ResultsDB`` (created on first use; the rows of
    an older database's ``tag_writes`` are moved into it)."""
    import sqlalchemy as sa

    t = db.meta.tables.get(JOURNAL_TABLE)
    if t is None:
        t = sa.Table(
            JOURNAL_TABLE,
            db.meta,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("path", sa.Text, nullable=False),
            sa.Column("model_id", sa.String(64), nullable=False),
            sa.Column("fingerprint", sa.String(64)),  # the content that was tagged (before the write)
            sa.Column("after", sa.String(64)),  # the file's fingerprint once written
            sa.Column("size", sa.BigInteger),  # the file's size once written
            sa.Column("genres", sa.JSON),
            sa.Column("date", sa.String(40)),  # EMBEDKIT_DATE written: recognises this write in the file
            sa.Column("before", sa.JSON),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("reason", sa.Text),
            sa.Column("owner", sa.String(300)),
            sa.Column("created_at", sa.DateTime(timezone=True)),
            sa.Column("updated_at", sa.DateTime(timezone=True)),
            sa.Index("ix_tag_journal_model_path", "model_id", "path"),
            sa.Index("ix_tag_journal_status", "status"),
        )
        t.create(db.engine, checkfirst=True)
        _migrate(db, t)
    return t


def _migrate(db, journal) -> None:
    """Rows of an older database's ``tag_writes`` become "written" journal entries."""
    import sqlalchemy as sa

    if not sa.inspect(db.engine).has_table(LEGACY_TABLE):
        return
    old = sa.Table(LEGACY_TABLE, sa.MetaData(), autoload_with=db.engine)

    def tx(c):
        rows = [dict(r._mapping) for r in c.execute(sa.select(old))]
        if not rows:
            return
        now = _now()
        c.execute(
            sa.insert(journal),
            [
                {
                    "path": r["path"],
                    "model_id": r["model_id"],
                    "genres": r.get("genres"),
                    "before": r.get("before"),
                    "status": "written",
                    "reason": r.get("reason"),
                    "created_at": r.get("written_at") or now,
                    "updated_at": now,
                }
                for r in rows
                if r.get("status") in (None, "written")
            ],
        )
        c.execute(sa.delete(old))

    db._retry(tx, durable=True)


@dataclass(frozen=True)
class FileTagOptions:
    """How ``tag --write-tags`` writes: dry_run (show, write nothing), overwrite (replace a
    genre a person set), id3_version (4: one frame value per genre; 3: joined with
    ``separator``)."""

    dry_run: bool = False
    overwrite: bool = False
    id3_version: int = 4
    separator: str = "; "


@dataclass
class FileTagReport:
    """What writing tags did: counts per status and the first ``max_notes`` changes worth
    showing (neither "written" nor "unchanged"; with a dry run, "would-write" too), so memory
    does not grow with the library. removed: temporary copies a killed writer had left (the
    first ``max_notes``; n_removed counts all)."""

    dry_run: bool = False
    counts: Counter = field(default_factory=Counter)
    notes: list[TagChange] = field(default_factory=list)
    max_notes: int = 20
    removed: list[str] = field(default_factory=list)
    n_removed: int = 0

    def add(self, ch: TagChange) -> None:
        self.counts[ch.status] += 1
        if ch.status not in ("written", "unchanged") and len(self.notes) < self.max_notes:
            self.notes.append(ch)

    def add_removed(self, paths: Iterable[Path]) -> None:
        for p in paths:
            self.n_removed += 1
            if len(self.removed) < self.max_notes:
                self.removed.append(str(p))


class FileTagWriter:
    """Writes each result's decided genres (``TrackResult.genres`` / ``scores``: the one
    decision, never taken again here) into its file as results arrive (``filetags`` rules: a
    person's genre kept unless ``overwrite``, nothing for "uncertain", copy-verify-replace),
    write-ahead (see the module doc): the file must still hold the content that was tagged, the
    intent is committed durably before the file is replaced. db: a ``resultsdb.ResultsDB``,
    required unless a dry run (without it a write could not be undone). Opening a writer
    resolves the intents a killed run left and, as each folder is first met, removes the
    temporary copies killed writers left there (reported)."""

    def __init__(self, db, model_id: str, options: FileTagOptions | None = None):
        self.options = options or FileTagOptions()
        if db is None and not self.options.dry_run:
            raise EmbedkitError(
                "writing tags needs a results database (--db): it records the previous genres so `embedkit untag` can restore them"
            )
        self.db, self.model_id = db, model_id
        self.table = journal_table(db) if db is not None else None
        self.report = FileTagReport(dry_run=self.options.dry_run)
        self._cleaned: set[str] = set()
        if db is not None and not self.options.dry_run:
            for ch in recover(db, self.table):
                self.report.add(ch)
                self._clean(str(Path(ch.path).parent))

    def _clean(self, folder: str) -> None:
        if self.options.dry_run or folder in self._cleaned:
            return
        self._cleaned.add(folder)
        try:
            self.report.add_removed(clean_temporaries(folder))
        except OSError:  # an unreadable folder: its files fail on their own
            pass

    def write(self, r) -> TagChange:
        """Write one ``records.TrackResult`` into its file. An uncertain result in a file this
        model wrote genres into before (a re-run under a stricter rule) takes them back out:
        the file gets what it held before those writes ("cleared"), so no file keeps a genre
        that no door would decide now."""
        path = str(r.path)
        o = self.options
        self._clean(str(Path(path).parent))
        if not r.genres and self.db is not None:
            chain = _history(self.db, self.table, self.model_id, path)
            if chain:
                ch = self._check(r)[1] if not o.dry_run else None
                if ch is None:
                    ch = _undo(self.db, self.table, self.model_id, path, chain, dry_run=o.dry_run)
                    if ch.status in ("written", "would-write"):
                        ch.status = "would-clear" if o.dry_run else "cleared"
                        ch.reason = f"{r.decision} under the rule applied: {ch.reason}"
                self.report.add(ch)
                return ch
        if getattr(r, "is_not_music", False):  # not music: the file is not opened for writing at all
            why = f"not music (score {r.not_music:.3f} >= {r.rule.not_music:g}): no genre written"
            ch = TagChange(path, "not-music", why, format_of(path) or "", [])
            self.report.add(ch)
            return ch
        kw = dict(
            scores=r.scores,
            model=self.model_id,
            overwrite=o.overwrite,
            id3_version=o.id3_version,
            separator=o.separator,
        )
        if o.dry_run:
            ch = write_genres(path, r.genres, dry_run=True, **kw)
            self.report.add(ch)
            return ch
        ch = self._write(r, path, kw)
        self.report.add(ch)
        return ch

    def _check(self, r) -> tuple[Any, TagChange | None]:
        """(the file's FileStat, None) when it still holds the content that was tagged: the same
        (size, mtime_ns, inode) as when it was fingerprinted, else the same content fingerprint;
        else (stat, a "changed" TagChange, recorded as "refused"), or (None, "failed") when
        it cannot be read."""
        from ..errors import AudioError
        from ..identity import FileStat, hash_file, scheme_of

        path = str(r.path)
        try:
            st = FileStat.of(path)
            same = (
                r.fingerprint is None
                or (r.size, r.mtime_ns, r.inode) == (st.size, st.mtime_ns, st.inode)
                or hash_file(path, scheme_of(r.fingerprint)) == r.fingerprint
            )
        except AudioError as exc:  # vanished or unreadable: nothing to write into
            return None, TagChange(path, "failed", exc.problem, format_of(path) or "", list(r.genres))
        if same:
            return st, None
        problem = (
            "changed since tagging: the file no longer holds the audio that was tagged; nothing written "
            "(run `embedkit tag` again to tag its new content)"
        )
        ch = TagChange(path, "changed", problem, format_of(path) or "", list(r.genres))
        self.db._retry(
            lambda c: c.execute(
                _insert(self.table),
                [_row(path, self.model_id, r.fingerprint, r.genres, None, None, "refused", problem)],
            )
        )
        return st, ch

    def _write(self, r, path: str, kw: dict) -> TagChange:
        import sqlalchemy as sa

        from ..errors import AudioError
        from ..identity import FileStat

        date = _now().isoformat(timespec="microseconds")  # unique to this write: recovery finds it
        probe = write_genres(path, r.genres, dry_run=True, date=date, **kw)
        if probe.status != "would-write":  # unchanged, kept (a person's genre), not writable, failed
            return probe
        st, refused = self._check(r)
        if refused is not None:
            return refused
        _step("before-intent", path)
        eid = _intent(self.db, self.table, path, self.model_id, r.fingerprint, r.genres, probe.before, date, st.size)
        _step("after-intent", path)
        try:  # the file must not have changed while the intent was committed
            same = FileStat.of(path) == st
        except AudioError:
            same = False
        if not same:
            reason = "changed since tagging (while its undo record was written); nothing written"
            _set_status(self.db, self.table, eid, "refused", reason)
            return TagChange(path, "changed", reason, probe.format, list(r.genres))
        ch = write_genres(path, r.genres, date=date, **kw)
        _step("after-replace", path)
        if ch.status != "written":  # write_genres says "written" once the file is replaced, never before
            _set_status(self.db, self.table, eid, "rolled-back", f"not written: {ch.status} ({ch.reason})")
            return ch
        after, size = _after(self.db, path)
        _refingerprint(self.db, r.db_row(), after)
        _step("before-done", path)
        update = {"status": "written", "reason": ch.reason, "after": after, "size": size, "updated_at": _now()}
        if ch.before is not None:
            update["before"] = ch.before  # what the write itself read (the same, barring a race)
        self.db._retry(lambda c: c.execute(sa.update(self.table).where(self.table.c.id == eid).values(**update)))
        _step("after-done", path)
        return ch


def write_tags(
    results: Iterable[Any], *, model_id: str, db=None, options: FileTagOptions | None = None
) -> FileTagReport:
    """Write the decided genres of ``results`` (``records.TrackResult``) into their files."""
    w = FileTagWriter(db, model_id, options)
    for r in results:
        w.write(r)
    return w.report


# ---------------------------------------------------------------------------------------------
# The journal


def _insert(table):
    import sqlalchemy as sa

    return sa.insert(table)


def _row(path, model_id, fp, genres, before, date, status, reason) -> dict[str, Any]:
    now = _now()
    return {
        "path": path,
        "model_id": model_id,
        "fingerprint": fp,
        "genres": list(genres),
        "before": before,
        "date": date,
        "status": status,
        "reason": reason,
        "owner": _owner(),
        "created_at": now,
        "updated_at": now,
    }


def _intent(db, table, path, model_id, fp, genres, before, date, size) -> int:
    """Record the intent to write (committed durably before the file changes); its id. size:
    the file's size now (what a moved file with this content is looked for by)."""
    out: list[int] = []

    def tx(c):
        out.clear()
        row = {**_row(path, model_id, fp, genres, before, date, "pending", ""), "size": size}
        res = c.execute(_insert(table), row)
        out.append(int(res.inserted_primary_key[0]))

    db._retry(tx, durable=True)
    return out[0]


def _set_status(db, table, ids: int | Sequence[int], status: str, reason: str | None = None, **values) -> None:
    import sqlalchemy as sa

    ids = [ids] if isinstance(ids, int) else list(ids)
    if not ids:
        return
    values = {"status": status, "updated_at": _now(), **values}
    if reason is not None:
        values["reason"] = reason
    db._retry(lambda c: c.execute(sa.update(table).where(table.c.id.in_(ids)).values(**values)))


def _history(db, table, model_id: str, path: str) -> list[dict[str, Any]]:
    """The "written" entries of ``path`` by ``model_id``, latest first."""
    import sqlalchemy as sa

    q = (
        sa.select(table)
        .where(table.c.model_id == model_id, table.c.path == path, table.c.status == "written")
        .order_by(table.c.id.desc())
    )
    with db.engine.connect() as c:
        return [dict(r._mapping) for r in c.execute(q)]


def _histories(db, table, model_id: str) -> dict[str, list[dict[str, Any]]]:
    """{path: its "written" entries by ``model_id``, latest first}."""
    import sqlalchemy as sa

    q = (
        sa.select(table)
        .where(table.c.model_id == model_id, table.c.status == "written")
        .order_by(table.c.path, table.c.id.desc())
    )
    out: dict[str, list[dict[str, Any]]] = {}
    with db.engine.connect() as c:
        for r in c.execute(q):
            out.setdefault(r.path, []).append(dict(r._mapping))
    return out


def _target(chain: list[dict[str, Any]], model_id: str) -> dict[str, Any]:
    """The entry whose ``before`` untag restores: the latest, or, while that state was this
    model's own earlier write, the entry before it (the state before this run of writes)."""
    for e in chain:
        before = TagState.from_dict(e["before"] or {"genre": None})
        if not (before.written_by_embedkit and before.provenance.get("EMBEDKIT_MODEL") == [model_id]):
            return e
    return chain[-1]


def _after(db, path: str) -> tuple[str | None, int | None]:
    """Fingerprint (the database's scheme) and size of the file as it is now."""
    from ..identity import FileStat, hash_file

    try:
        return hash_file(path, db.scheme), FileStat.of(path).size
    except EmbedkitError:
        return None, None


def _refingerprint(db, row: dict[str, Any] | None, fp: str | None) -> None:
    """The results row again under the tagged file's fingerprint ``fp`` (same audio, new bytes)."""
    from ..identity import FileStat

    if row is None or fp is None or fp == row.get("fingerprint"):
        return
    try:
        st = FileStat.of(row["path"])
    except EmbedkitError:
        return
    keep = {k: v for k, v in row.items() if k in {c.name for c in db.tags.columns}}
    keep.pop("created_at", None)
    keep.pop("updated_at", None)
    # the track vector too (same audio): the next run finds the file done, vector included
    vectors = [{**v, "fingerprint": fp} for v in db.vector_rows(row["model_id"], row["fingerprint"])]
    db.write(
        [
            {
                **keep,
                "fingerprint": fp,
                "size": st.size,
                "mtime": st.mtime_ns / 1e9,
                "mtime_ns": st.mtime_ns,
                "inode": st.inode,
            }
        ],
        vectors=vectors,
    )


def _is_this_write(state: TagState, e: dict[str, Any]) -> bool:
    return (
        e.get("date") is not None
        and state.written_by_embedkit
        and state.provenance.get("EMBEDKIT_MODEL") == [e["model_id"]]
        and state.provenance.get("EMBEDKIT_DATE") == [e["date"]]
    )


def _resolve(db, table, e: dict[str, Any], path: str | None = None) -> TagChange:
    """Settle a pending intent by what the file (at ``path``, default its recorded path) holds:
    this write -> "written" (status "recovered"), the state before -> "rolled-back", anything
    else -> kept as "written" (the undo state is never dropped); an unreadable or missing file
    leaves it pending."""
    path = path or e["path"]
    try:
        now = read_tags(path)
    except EmbedkitError as exc:
        problem = getattr(exc, "problem", str(exc))
        return TagChange(
            path,
            "pending",
            f"an interrupted write could not be checked ({problem}); its record is kept until the file is back",
            genres=list(e["genres"] or []),
        )
    extra = {} if path == e["path"] else {"path": path}
    if _is_this_write(now, e):
        after, size = _after(db, path)
        if e.get("fingerprint"):
            rows = db.done(e["model_id"], fingerprints=[e["fingerprint"]])
            row = rows.get(e["fingerprint"])
            _refingerprint(db, None if row is None else {**row, "path": path}, after)
        reason = "an interrupted write had reached the file; its undo record is complete"
        _set_status(db, table, e["id"], "written", reason, after=after, size=size, **extra)
        return TagChange(path, "recovered", reason, genres=list(e["genres"] or []))
    if now == TagState.from_dict(e["before"] or {"genre": None}):
        reason = "an interrupted write had not reached the file (left as it was)"
        _set_status(db, table, e["id"], "rolled-back", reason, **extra)
        return TagChange(path, "rolled-back", reason, genres=list(e["genres"] or []))
    reason = "an interrupted write: the file changed since; its undo record is kept"
    _set_status(db, table, e["id"], "written", reason, **extra)
    return TagChange(path, "recovered", reason, genres=now.genre or [])


def recover(db, table=None, paths: Sequence[str] | None = None) -> list[TagChange]:
    """Resolve the intents that killed writers left "pending" (all, or those of ``paths``);
    those of a writer still running on this machine are left to it."""
    import sqlalchemy as sa

    table = table if table is not None else journal_table(db)
    q = sa.select(table).where(table.c.status == "pending").order_by(table.c.id)
    with db.engine.connect() as c:
        pending = [dict(r._mapping) for r in c.execute(q)]
    out = []
    want = None if paths is None else set(paths)
    for e in pending:
        if want is not None and e["path"] not in want:
            continue
        if _at_work(e.get("owner"), e.get("created_at")):
            continue  # its writer may be replacing the file right now
        out.append(_resolve(db, table, e))
    return out


# ---------------------------------------------------------------------------------------------
# Undo


def _undo(
    db, table, model_id: str, path: str, chain: list[dict[str, Any]], *, dry_run: bool, force: bool = False
) -> TagChange:
    """Put back what ``path`` held before ``model_id``'s latest run of writes (``chain``: its
    "written" entries, latest first); they are closed ("undone") once the file holds it again.
    A file whose genre a person or another model changed since is "kept" unless ``force``."""
    target = _target(chain, model_id)
    above: list[dict[str, Any]] = []  # later models' writes stacked on this model's (a promotion)
    if not force:
        try:
            now = read_tags(path)
        except EmbedkitError as exc:
            return TagChange(path, "failed", getattr(exc, "problem", str(exc)))
        if now.written_by_embedkit and now.provenance.get("EMBEDKIT_MODEL") not in (None, [model_id]):
            above = _stacked(db, table, model_id, path, now)
            if not above:
                return TagChange(
                    path,
                    "kept",
                    f"last written by another model ({now.provenance['EMBEDKIT_MODEL'][0]}); untag that one first",
                    genres=now.genre or [],
                )
    ch = restore(path, target["before"] or {"genre": None}, dry_run=dry_run, force=force)
    if ch.status in ("written", "unchanged") and not dry_run:
        _set_status(db, table, [e["id"] for e in chain + above], "undone", f"restored by untag ({ch.status})")
    return ch


def _stacked(db, table, model_id: str, path: str, now: TagState) -> list[dict[str, Any]]:
    """The "written" entries of the models that wrote into ``path`` over ``model_id``'s genre
    (``retrain --promote``: the new model re-tags only what it decides differently, on top of
    the old model's write), latest first, when the file holds the latest of them untouched;
    [] when anything else (a person's edit, a model that wrote over an original) is in the way.
    Untagging the old model then restores the originals in one step."""
    out: list[dict[str, Any]] = []
    state = now
    while state.written_by_embedkit and state.provenance.get("EMBEDKIT_MODEL") not in (None, [model_id]):
        other = state.provenance["EMBEDKIT_MODEL"][0]
        chain = _history(db, table, other, path)
        if not chain or not _is_this_write(state, chain[0]):
            return []
        state = TagState.from_dict(_target(chain, other)["before"] or {"genre": None})
        out += chain
        if len(out) > 1000:  # a cycle of models writing over each other: not a stack
            return []
    return out if state.written_by_embedkit and state.provenance.get("EMBEDKIT_MODEL") == [model_id] else []


def _candidates(paths: Sequence[str]) -> list[str]:
    """Writable audio files among ``paths`` (files; folders searched recursively)."""
    out: dict[str, None] = {}
    for p in map(Path, paths):
        if p.is_dir():
            for q in sorted(p.rglob("*")):
                if format_of(q) is not None and q.is_file():
                    out.setdefault(str(q.absolute()), None)
        elif p.is_file():
            out.setdefault(str(p.absolute()), None)
    return list(out)


def _find_moved(db, wanted: dict[Any, dict[str, Any]], candidates: list[str]) -> dict[Any, str]:
    """{key: new path} for journal entries (``wanted``: key -> entry) whose file is gone from
    its path, found among ``candidates`` by content (a "written" entry's fingerprint ``after``
    the write, a pending one's ``fingerprint``: the content it was to write into; sizes first,
    so few files are hashed) or, failing that, by the model and date of the write the file
    carries (its other tags were edited since)."""
    from ..identity import hash_file

    if not wanted or not candidates:
        return {}
    fp_of = lambda e: e["after"] if e["status"] == "written" else e["fingerprint"]  # noqa: E731
    by_fp = {fp_of(e): key for key, e in wanted.items() if fp_of(e)}
    sizes = {e["size"] for e in wanted.values() if e.get("size") is not None}
    found: dict[Any, str] = {}
    left = list(candidates)
    for cand in candidates:
        try:
            if os.path.getsize(cand) not in sizes:
                continue
            key = by_fp.get(hash_file(cand, db.scheme))
        except (OSError, EmbedkitError):
            continue
        if key is not None and key not in found:
            found[key] = cand
            left.remove(cand)
    marks = {(e["model_id"], e["date"]): key for key, e in wanted.items() if key not in found and e.get("date")}
    for cand in left if marks else ():
        try:
            st = read_tags(cand)
        except EmbedkitError:
            continue
        mark = ((st.provenance.get("EMBEDKIT_MODEL") or [None])[0], (st.provenance.get("EMBEDKIT_DATE") or [None])[0])
        key = marks.pop(mark, None)
        if key is not None:
            found[key] = cand
        if not marks:
            break
    return found


def _stuck(db, table, model_id: str) -> list[dict[str, Any]]:
    """Pending intents of ``model_id`` whose file is gone from its path (recovery left them)."""
    import sqlalchemy as sa

    q = sa.select(table).where(table.c.model_id == model_id, table.c.status == "pending")
    with db.engine.connect() as c:
        return [dict(r._mapping) for r in c.execute(q) if not os.path.lexists(r.path)]


def untag(
    model_id: str,
    db,
    paths: Sequence[str] | None = None,
    *,
    dry_run: bool = False,
    force: bool = False,
    moved_hint: str = "",
) -> list[TagChange]:
    """Restore what the files held before ``model_id``'s latest writes into them (all files it
    wrote, or those at ``paths``: files or folders). Pending intents are resolved first. A
    recorded file gone from its path is looked for by content among ``paths`` (a moved or
    renamed file; its record follows it); without ``paths`` it is reported "missing" with
    ``moved_hint``. A file whose genre a person (or another model) changed since is "kept"
    unless ``force``."""
    table = journal_table(db)
    early = [] if dry_run else recover(db, table)
    given = [os.path.abspath(p) for p in paths or ()]
    candidates = _candidates(given) if paths is not None else []
    if candidates and not dry_run:  # an interrupted write into a file moved since: settled where it is now
        stuck = {e["id"]: e for e in _stuck(db, table, model_id)}
        for eid, new in _find_moved(db, stuck, candidates).items():
            early = [ch for ch in early if ch.path != stuck[eid]["path"]]
            early.append(_resolve(db, table, stuck[eid], path=new))
            _repath(db, table, model_id, stuck[eid]["path"], new)  # its earlier writes follow it
    recs = _histories(db, table, model_id)
    orphans = {p: chain for p, chain in recs.items() if not os.path.lexists(p)}
    if paths is not None:
        inside = lambda p: any(p == g or p.startswith(g.rstrip(os.sep) + os.sep) for g in given)  # noqa: E731
        heads = {p: chain[0] for p, chain in orphans.items()}
        moved = _find_moved(db, heads, [c for c in candidates if c not in recs])
        todo = {p: chain for p, chain in recs.items() if inside(p) and p not in orphans}
        for old, new in moved.items():
            if not dry_run:
                _repath(db, table, model_id, old, new)
            todo[new] = [{**e, "path": new} for e in recs[old]]
        orphans = {p: chain for p, chain in orphans.items() if inside(p) and p not in moved}
    else:
        todo = {p: chain for p, chain in recs.items() if p not in orphans}
    out = [ch for ch in early if ch.status != "rolled-back"]
    for ch in out:
        if ch.status == "pending" and moved_hint:
            ch.reason += f"; moved or renamed? {moved_hint}"
    for p in sorted(orphans):
        out.append(
            TagChange(
                p,
                "missing",
                "file not found (moved or renamed?)" + (f"; {moved_hint}" if moved_hint else ""),
                genres=list(orphans[p][0]["genres"] or []),
            )
        )
    out += [_undo(db, table, model_id, p, chain, dry_run=dry_run, force=force) for p, chain in sorted(todo.items())]
    return out


def _repath(db, table, model_id: str, old: str, new: str) -> None:
    import sqlalchemy as sa

    db._retry(
        lambda c: c.execute(
            sa.update(table)
            .where(table.c.model_id == model_id, table.c.path == old, table.c.status == "written")
            .values(path=new, updated_at=_now())
        )
    )


def untag_files(
    model, db: str, paths: Sequence[str] | None = None, *, dry_run: bool = False, force: bool = False
) -> FileTagReport:
    """``embedkit untag``: restore the files ``model`` (a run directory or model file) wrote
    genres into, as recorded in the results database ``db`` (all, or ``paths``: files or
    folders, where moved or renamed files are found by content). Temporary copies killed writers
    left beside those files are removed (reported). Raises EmbedkitError when the database
    records none."""
    from .resultsdb import ResultsDB
    from .tagger import model_id_of

    mid = model_id_of(model)
    hint = f"give its new path or folder: embedkit untag {model} NEW_PATH --db {db}"
    with ResultsDB(db) as database:
        changes = untag(mid, database, list(paths) if paths else None, dry_run=dry_run, force=force, moved_hint=hint)
    if not changes:
        where = " at these paths (nor any file with the content of one it tagged)" if paths else ""
        raise EmbedkitError(f"{db}: no files recorded as tagged by model {mid}{where}")
    report = FileTagReport(dry_run=dry_run, max_notes=len(changes))
    if not dry_run:
        folders = {str(Path(ch.path).parent) for ch in changes}
        folders |= {os.path.abspath(p) for p in paths or () if os.path.isdir(p)}
        for folder in sorted(folders):
            try:
                report.add_removed(clean_temporaries(folder))
            except OSError:
                pass
    for ch in changes:
        report.add(ch)
    return report


def summary(changes: Sequence[TagChange]) -> dict[str, int]:
    """Count of changes per status."""
    return dict(Counter(c.status for c in changes))
