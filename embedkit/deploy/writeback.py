"""Genres decided by ``embedkit tag`` written into the files, and undone: ``tag --write-tags``
and ``embedkit untag``.

    results (embedkit.deploy.records.TrackResult: the genres decided under the rule applied, the
    model's default or the command's --threshold / --multi ...) -> embedkit.deploy.filetags.write_genres
    -> the results database's ``tag_writes`` table: what each file held before, for ``untag``

``tag_writes`` (one row per file path and model id): genres written, the file's tag state
before embedkit's first write with this model (``before``, JSON; kept across later writes so
undo goes back to the person's values), status, reason, written_at / updated_at (UTC). After a
write the file's bytes (and so its content fingerprint) change while its audio does not: the
results row is copied under the new fingerprint, so the next ``embedkit tag`` run does not
decode the file again.
"""

from __future__ import annotations

import datetime as _dt
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from ..errors import EmbedkitError
from .filetags import TagChange, read_tags, restore, write_genres

WRITES_TABLE = "tag_writes"


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def writes_table(db):
    """The ``tag_writes`` table of a ``tagdb.ResultsDB`` (created on first use)."""
    import sqlalchemy as sa

    t = db.meta.tables.get(WRITES_TABLE)
    if t is None:
        t = sa.Table(
            WRITES_TABLE,
            db.meta,
            sa.Column("path", sa.Text, primary_key=True),
            sa.Column("model_id", sa.String(64), primary_key=True),
            sa.Column("genres", sa.JSON),
            sa.Column("before", sa.JSON),
            sa.Column("status", sa.String(16)),
            sa.Column("reason", sa.Text),
            sa.Column("written_at", sa.DateTime(timezone=True)),
            sa.Column("updated_at", sa.DateTime(timezone=True)),
        )
        t.create(db.engine, checkfirst=True)
    return t


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
    does not grow with the library."""

    dry_run: bool = False
    counts: Counter = field(default_factory=Counter)
    notes: list[TagChange] = field(default_factory=list)
    max_notes: int = 20

    def add(self, ch: TagChange) -> None:
        self.counts[ch.status] += 1
        if ch.status not in ("written", "unchanged") and len(self.notes) < self.max_notes:
            self.notes.append(ch)


class FileTagWriter:
    """Writes each result's decided genres (``TrackResult.genres`` / ``scores``: the one
    decision, never taken again here) into its file as results arrive (``tagwrite`` rules: a
    person's genre kept unless ``overwrite``, nothing for "uncertain", copy-verify-replace), and
    records every write in ``tag_writes`` (the state before, for ``untag``) with the results row
    copied under the file's new fingerprint. db: a ``resultsdb.ResultsDB``, required unless a
    dry run (without it a write could not be undone)."""

    def __init__(self, db, model_id: str, options: FileTagOptions | None = None):
        self.options = options or FileTagOptions()
        if db is None and not self.options.dry_run:
            raise EmbedkitError(
                "writing tags needs a results database (--db): it records the previous genres so `embedkit untag` can restore them"
            )
        self.db, self.model_id = db, model_id
        self.table = writes_table(db) if db is not None else None
        self.report = FileTagReport(dry_run=self.options.dry_run)

    def write(self, r) -> TagChange:
        """Write one ``records.TrackResult`` into its file. An uncertain result in a file this
        model wrote genres into before (a re-run under a stricter rule) takes them back out:
        the file gets what it held before that write ("cleared"), so no file keeps a genre that
        no door would decide now."""
        path = str(r.path)
        o = self.options
        if not r.genres and self.db is not None:
            rec = _recorded(self.db, self.table, self.model_id, [path]).get(path)
            if rec is not None:
                ch = _undo(self.db, self.table, self.model_id, path, rec, dry_run=o.dry_run)
                if ch.status in ("written", "would-write"):
                    ch.status = "would-clear" if o.dry_run else "cleared"
                    ch.reason = f"uncertain under the rule applied: {ch.reason}"
                self.report.add(ch)
                return ch
        ch = write_genres(
            path,
            r.genres,
            scores=r.scores,
            model=self.model_id,
            dry_run=o.dry_run,
            overwrite=o.overwrite,
            id3_version=o.id3_version,
            separator=o.separator,
        )
        self.report.add(ch)
        if ch.status == "written" and self.db is not None:
            first = _recorded(self.db, self.table, self.model_id, [path]).get(path)
            _record(
                self.db,
                self.table,
                {
                    "path": path,
                    "model_id": self.model_id,
                    "genres": ch.genres,
                    "before": first["before"] if first else ch.before,
                    "status": "written",
                    "reason": ch.reason,
                },
            )
            _refingerprint(self.db, r.db_row())
        return ch
        return ch


def write_tags(
    results: Iterable[Any], *, model_id: str, db=None, options: FileTagOptions | None = None
) -> FileTagReport:
    """Write the decided genres of ``results`` (``records.TrackResult``) into their files."""
    w = FileTagWriter(db, model_id, options)
    for r in results:
        w.write(r)
    return w.report


def _recorded(db, table, model_id: str, paths: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    import sqlalchemy as sa

    q = sa.select(table).where(table.c.model_id == model_id)
    if paths is not None:
        q = q.where(table.c.path.in_(list(paths)))
    with db.engine.connect() as c:
        return {r.path: dict(r._mapping) for r in c.execute(q)}


def _record(db, table, row: dict[str, Any]) -> None:
    import sqlalchemy as sa

    now = _now()

    def tx(c):
        c.execute(sa.delete(table).where(table.c.path == row["path"], table.c.model_id == row["model_id"]))
        c.execute(sa.insert(table), [{**row, "written_at": row.get("written_at") or now, "updated_at": now}])

    db._retry(tx)


def _refingerprint(db, row: dict[str, Any]) -> None:
    """The results row again under the tagged file's fingerprint (same audio, new bytes)."""
    from ..identity import FileStat, fingerprint

    try:
        st = FileStat.of(row["path"])
        fp = fingerprint(row["path"], scheme=db.scheme)
    except EmbedkitError:
        return
    if fp == row.get("fingerprint"):
        return
    keep = {k: v for k, v in row.items() if k in {c.name for c in db.tags.columns}}
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
        ]
    )


def untag(
    model_id: str, db, paths: Sequence[str] | None = None, *, dry_run: bool = False, force: bool = False
) -> list[TagChange]:
    """Restore what the files held before ``model_id`` wrote genres into them (all files it
    wrote, or ``paths``). A file whose genre a person (or another model) changed since is
    "kept" unless ``force``; a restored file's record is removed."""

    table = writes_table(db)
    recs = _recorded(db, table, model_id, paths)
    return [_undo(db, table, model_id, path, rec, dry_run=dry_run, force=force) for path, rec in sorted(recs.items())]


def untag_files(
    model, db: str, paths: Sequence[str] | None = None, *, dry_run: bool = False, force: bool = False
) -> FileTagReport:
    """``embedkit untag``: restore the files ``model`` (a run directory or model file) wrote
    genres into, as recorded in the results database ``db`` (all, or ``paths``). Raises
    EmbedkitError when the database records none."""
    import os

    from .resultsdb import ResultsDB
    from .tagger import model_id_of

    mid = model_id_of(model)
    with ResultsDB(db) as database:
        changes = untag(
            mid, database, [os.path.abspath(p) for p in paths] if paths else None, dry_run=dry_run, force=force
        )
    if not changes:
        raise EmbedkitError(f"{db}: no files recorded as tagged by model {mid}")
    report = FileTagReport(dry_run=dry_run, max_notes=len(changes))
    for ch in changes:
        report.add(ch)
    return report


def _undo(db, table, model_id: str, path: str, rec: dict[str, Any], *, dry_run: bool, force: bool = False) -> TagChange:
    """Put back what ``path`` held before ``model_id``'s write (``rec``: its ``tag_writes``
    row); the record is removed once the file holds it again. A file whose genre a person or
    another model changed since is "kept" unless ``force``."""
    import sqlalchemy as sa

    if not force:
        try:
            now = read_tags(path)
        except EmbedkitError as exc:
            return TagChange(path, "failed", getattr(exc, "problem", str(exc)))
        if now.written_by_embedkit and now.provenance.get("EMBEDKIT_MODEL") not in (None, [model_id]):
            return TagChange(
                path,
                "kept",
                f"last written by another model ({now.provenance['EMBEDKIT_MODEL'][0]}); untag that one first",
                genres=now.genre or [],
            )
    ch = restore(path, rec["before"], dry_run=dry_run, force=force)
    if ch.status in ("written", "unchanged") and not dry_run:
        db._retry(lambda c: c.execute(sa.delete(table).where(table.c.path == path, table.c.model_id == model_id)))
    return ch


def summary(changes: Sequence[TagChange]) -> dict[str, int]:
    """Count of changes per status."""
    from collections import Counter

    return dict(Counter(c.status for c in changes))
