"""The results database of ``embedkit tag``: one row per (audio content, model).

SQLAlchemy Core over any database URL; a plain file path means SQLite (the default). Tables:

- ``tags``: primary key (``fingerprint``, ``model_id``): the content fingerprint of
  ``embedkit.identity`` (so a renamed or copied file is the same audio, an edited one is new
  audio) and ``Tagger.model_id`` (a hash of the model artefact). Columns: path, size, mtime (+ mtime_ns, inode),
  duration_s, excerpt, n_windows, top_label, top_p, decision (the top label, "uncertain" below
  the rule's threshold, or "not-music" at or above its not-music threshold), not_music (the
  track's not-music score; NULL for models without a detector and rows of older embedkits), genres ([[genre, p], ...] decided, several with a multi-genre rule),
  rule (the DecisionRule applied, JSON), topk / probabilities / window_share (JSON), model_kind,
  run_id, embedkit_version, created_at, updated_at (UTC).
- ``tag_failures``: (path, model_id) -> fingerprint, reason, timestamps: files that could not be
  tagged by that model. A later success removes the file's failure row.
- ``tag_models``: model_id -> kind, labels, artefact path, run id: what each model id means.
- ``tag_vectors``: (fingerprint, model_id) -> the track vector, its space, a loudness sketch and
  the file's artist / album / title, for similarity (``embedkit.deploy.vectors``; written in the
  same transaction as the ``tags`` row).
- ``labels``: (fingerprint, source, reviewer) -> label, path, model_id and decision shown,
  timestamps: a person's labels (``embedkit.deploy.library``); the latest row of a fingerprint
  is its label, whatever path the audio has now.
- ``tag_meta``: name -> value; ``fingerprints``: the scheme of the database's fingerprints
  (``embedkit.identity``), recorded when it is created. A database made before schemes (rows,
  no record) is ``sha256`` and stays so: its rows keep matching the files they came from.

Writes are idempotent upserts (``INSERT ... ON CONFLICT DO UPDATE`` on SQLite and PostgreSQL, a
delete + insert in one transaction elsewhere), each batch one transaction: a run killed at any
point leaves every committed batch and nothing partial, and re-running upserts the same rows.
SQLite files are opened in WAL mode with a busy timeout, so concurrent ``tag`` processes on one
file wait for each other instead of failing or corrupting it; commits use ``synchronous=NORMAL``
(a killed process loses nothing committed) except the write-ahead intents of ``tag
--write-tags`` (table ``tag_journal``, ``embedkit.deploy.writeback``), committed with ``FULL``
so they survive power loss too.

    >>> db = ResultsDB("library.sqlite")                                   # doctest: +SKIP
    >>> db.done("3f2a...", model_id)        # fingerprints already tagged  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from pathlib import Path
from typing import Any, Iterable

from ..errors import DatabaseError, EmbedkitError, first_line

#: seconds a SQLite writer waits for another writer's lock before giving up
SQLITE_BUSY_TIMEOUT_S = 120


#: values per IN (...) clause of a restricted query
IN_CHUNK = 500


def database_url(db: str | os.PathLike) -> str:
    """A SQLAlchemy URL for ``db``: URLs ("sqlite:///x", "postgresql+psycopg://...") pass
    through; anything else is a SQLite file path."""
    s = str(db)
    if "://" in s:
        return s
    return f"sqlite:///{Path(s).expanduser().absolute()}"


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


class ResultsDB:
    """Open (and create if needed) the results database at ``db`` (path or SQLAlchemy URL)."""

    def __init__(self, db: str | os.PathLike):
        import sqlalchemy as sa

        self.url = database_url(db)
        kw: dict[str, Any] = {}
        if self.url.startswith("sqlite"):
            path = self.url.split(":///", 1)[-1]
            if path and path != ":memory:":
                parent = Path(path).parent
                if not parent.is_dir():
                    raise DatabaseError(f"{path}: folder {parent} does not exist")
            kw["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
        try:
            self.engine = sa.create_engine(self.url, **kw)
        except Exception as exc:  # unknown dialect, missing driver, malformed URL
            raise DatabaseError(f"{_safe(self.url)}: cannot open database ({first_line(_driver_error(exc))})") from None
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self.meta = sa.MetaData()
        self.tags = sa.Table(
            "tags",
            self.meta,
            sa.Column("fingerprint", sa.String(64), primary_key=True),
            sa.Column("model_id", sa.String(64), primary_key=True),
            sa.Column("path", sa.Text, nullable=False),
            sa.Column("size", sa.BigInteger),
            sa.Column("mtime", sa.Float),
            sa.Column("mtime_ns", sa.BigInteger),  # with size and inode: re-runs skip re-hashing unchanged files
            sa.Column("inode", sa.BigInteger),
            sa.Column("duration_s", sa.Float),
            sa.Column("excerpt", sa.String(32)),
            sa.Column("n_windows", sa.Integer),
            sa.Column("top_label", sa.Text),
            sa.Column("top_p", sa.Float),
            sa.Column("decision", sa.Text),
            sa.Column("not_music", sa.Float),  # the track's not-music score (None: the model has no detector)
            sa.Column("genres", sa.JSON),  # [[genre, p], ...] decided under ``rule`` (empty: uncertain)
            sa.Column("rule", sa.JSON),  # the DecisionRule applied (embedkit.calibration)
            sa.Column("topk", sa.JSON),
            sa.Column("probabilities", sa.JSON),
            sa.Column("window_share", sa.JSON),
            sa.Column("model_kind", sa.String(16)),
            sa.Column("run_id", sa.Text),
            sa.Column("embedkit_version", sa.String(32)),
            sa.Column("created_at", sa.DateTime(timezone=True)),
            sa.Column("updated_at", sa.DateTime(timezone=True)),
            # re-runs look up a chunk of their inputs by path (the stat -> fingerprint shortcut)
            sa.Index("ix_tags_model_path", "model_id", "path"),
        )
        self.failures = sa.Table(
            "tag_failures",
            self.meta,
            sa.Column("path", sa.Text, primary_key=True),
            sa.Column("model_id", sa.String(64), primary_key=True),
            sa.Column("fingerprint", sa.String(64)),
            sa.Column("reason", sa.Text),
            sa.Column("created_at", sa.DateTime(timezone=True)),
            sa.Column("updated_at", sa.DateTime(timezone=True)),
        )
        self.models = sa.Table(
            "tag_models",
            self.meta,
            sa.Column("model_id", sa.String(64), primary_key=True),
            sa.Column("kind", sa.String(16)),
            sa.Column("labels", sa.JSON),
            sa.Column("artefact", sa.Text),
            sa.Column("run_id", sa.Text),
            sa.Column("created_at", sa.DateTime(timezone=True)),
        )
        self.info = sa.Table(
            "tag_meta",
            self.meta,
            sa.Column("name", sa.String(64), primary_key=True),
            sa.Column("value", sa.Text),
        )
        # A person's labels (review, import, audit): one per (audio content, source, reviewer), so
        # two reviewers never overwrite each other and a re-import changes nothing; the label of
        # a fingerprint is its latest row (``current_labels``).
        self.labels = sa.Table(
            "labels",
            self.meta,
            sa.Column("fingerprint", sa.String(64), primary_key=True),
            sa.Column("source", sa.String(32), primary_key=True),  # review | audit-sample | import | tags
            sa.Column("reviewer", sa.String(128), primary_key=True),
            sa.Column("label", sa.Text, nullable=False),
            sa.Column("path", sa.Text),  # where the audio was when labelled (the fingerprint is what counts)
            sa.Column("model_id", sa.String(64)),  # the model whose decision was shown, if any
            sa.Column("decision", sa.Text),  # that decision
            sa.Column("created_at", sa.DateTime(timezone=True)),
            sa.Column("updated_at", sa.DateTime(timezone=True)),
        )
        from .vectors import vector_table

        #: track vectors for similarity (``embedkit.deploy.vectors``): one per (fingerprint, model_id)
        self.vectors = vector_table(self.meta)
        self._create()
        #: the fingerprint scheme of this database's rows: files are identified in it
        self.scheme = self._scheme()

    # -- schema --------------------------------------------------------------------------

    def _create(self) -> None:
        # Two processes creating the schema at once: one wins, the other sees "already exists".
        for attempt in range(5):
            try:
                self.meta.create_all(self.engine)
                for index in self.tags.indexes:  # a database made before the index existed gets it
                    index.create(self.engine, checkfirst=True)
                self._add_columns()
                return
            except Exception as exc:
                if attempt == 4 or not _is_race(exc):
                    raise DatabaseError(
                        f"{_safe(self.url)}: cannot create the results tables ({first_line(_driver_error(exc))})"
                    ) from None
                time.sleep(0.05 * (attempt + 1))

    def _add_columns(self) -> None:
        """Columns added since a database was made (``genres``, ``rule``): added empty. Its rows
        then have no recorded rule, and ``embedkit tag`` decides them again from their stored
        probabilities under the rule it applies (and rewrites them)."""
        import sqlalchemy as sa

        for table in (self.tags, self.vectors):  # tag_vectors: columns added since (``sketch``) too
            tname = table.name
            have = {c["name"] for c in sa.inspect(self.engine).get_columns(tname)}
            missing = [c for c in table.columns if c.name not in have]
            for col in missing:
                kind = col.type.compile(dialect=self.engine.dialect)
                try:
                    with self.engine.begin() as c:
                        name = self.engine.dialect.identifier_preparer.quote(col.name)
                        c.execute(sa.text(f"ALTER TABLE {tname} ADD COLUMN {name} {kind}"))
                except Exception as exc:  # another process added it first
                    if col.name not in {c["name"] for c in sa.inspect(self.engine).get_columns(tname)}:
                        raise DatabaseError(
                            f"{_safe(self.url)}: cannot add column {tname}.{col.name} ({first_line(_driver_error(exc))})"
                        ) from None

    def _scheme(self) -> str:
        """The recorded fingerprint scheme; recorded now when absent: LEGACY for a database that
        already holds fingerprints (made before schemes), identity.SCHEME for an empty one.
        Concurrent openers agree: the loser of the insert race retries and reads the winner's."""
        import sqlalchemy as sa

        from ..identity import LEGACY, SCHEME, artefact_scheme

        found: list[str] = []

        def tx(c):
            found.clear()
            row = c.execute(sa.select(self.info.c.value).where(self.info.c.name == "fingerprints")).first()
            if row is not None:
                found.append(row[0])
                return
            old = any(
                c.execute(sa.select(t.c.fingerprint).where(t.c.fingerprint.is_not(None)).limit(1)).first()
                for t in (self.tags, self.failures)
            )
            found.append(LEGACY if old else SCHEME)
            c.execute(sa.insert(self.info), [{"name": "fingerprints", "value": found[0]}])

        self._retry(tx)
        try:
            return artefact_scheme(found[0])
        except EmbedkitError as exc:  # a scheme this embedkit does not know
            raise DatabaseError(f"{_safe(self.url)}: {exc}") from None

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "ResultsDB":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reads ---------------------------------------------------------------------------

    def done(
        self,
        model_id: str,
        excerpt: str | None = None,
        *,
        paths: Iterable[str] | None = None,
        fingerprints: Iterable[str] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """{fingerprint: row} of the tracks ``model_id`` has tagged (with ``excerpt`` if given).
        paths / fingerprints: only rows with one of these paths or fingerprints (a batch job
        asks for each chunk of its inputs, so its memory does not grow with the database)."""
        import sqlalchemy as sa

        q = sa.select(self.tags).where(self.tags.c.model_id == model_id)
        if excerpt is not None:
            q = q.where(self.tags.c.excerpt == excerpt)
        return {r["fingerprint"]: r for r in self._select(q, self.tags, paths, fingerprints)}

    def failed(self, model_id: str, *, paths: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """{path: row} of the files ``model_id`` could not tag (only ``paths``, if given)."""
        import sqlalchemy as sa

        q = sa.select(self.failures).where(self.failures.c.model_id == model_id)
        return {r["path"]: r for r in self._select(q, self.failures, paths, None)}

    def _select(self, q, table, paths, fingerprints) -> list[dict[str, Any]]:
        """Rows of ``q``, restricted to ``paths`` / ``fingerprints`` when given, asked for in
        groups of IN_CHUNK values (every database's limit on bound parameters is above it)."""
        if paths is None and fingerprints is None:
            with self.engine.connect() as c:
                return [dict(r._mapping) for r in c.execute(q)]
        out: dict[tuple, dict[str, Any]] = {}
        keys = [k.name for k in table.primary_key.columns]
        with self.engine.connect() as c:
            for col, values in ((table.c.path, paths), (getattr(table.c, "fingerprint", None), fingerprints)):
                values = sorted(set(values or ()))
                for i in range(0, len(values), IN_CHUNK):
                    for r in c.execute(q.where(col.in_(values[i : i + IN_CHUNK]))):
                        row = dict(r._mapping)
                        out[tuple(row[k] for k in keys)] = row
        return list(out.values())

    def rows(self, model_id: str | None = None) -> list[dict[str, Any]]:
        import sqlalchemy as sa

        q = sa.select(self.tags).order_by(self.tags.c.path, self.tags.c.model_id)
        if model_id is not None:
            q = q.where(self.tags.c.model_id == model_id)
        with self.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(q)]

    def vector_fingerprints(self, model_id: str, fingerprints: Iterable[str]) -> set[str]:
        """Those of ``fingerprints`` that have a track vector of ``model_id``."""
        import sqlalchemy as sa

        q = sa.select(self.vectors.c.fingerprint).where(self.vectors.c.model_id == model_id)
        values, out = sorted(set(fingerprints)), set()
        with self.engine.connect() as c:
            for i in range(0, len(values), IN_CHUNK):
                out.update(r[0] for r in c.execute(q.where(self.vectors.c.fingerprint.in_(values[i : i + IN_CHUNK]))))
        return out

    def vector_rows(self, model_id: str, fingerprint: str) -> list[dict[str, Any]]:
        """The ``tag_vectors`` row of (``fingerprint``, ``model_id``), as a list (empty: none)."""
        import sqlalchemy as sa

        v = self.vectors.c
        q = sa.select(self.vectors).where(v.model_id == model_id, v.fingerprint == fingerprint)
        with self.engine.connect() as c:
            return [
                {k: x for k, x in r._mapping.items() if k not in ("created_at", "updated_at")} for r in c.execute(q)
            ]

    def count(self, table: str = "tags") -> int:
        import sqlalchemy as sa

        with self.engine.connect() as c:
            return int(c.execute(sa.select(sa.func.count()).select_from(self.meta.tables[table])).scalar_one())

    # -- writes --------------------------------------------------------------------------

    def model_labels(self, model_id: str) -> list[str] | None:
        """The label order registered for ``model_id`` (None: never registered here)."""
        import sqlalchemy as sa

        with self.engine.connect() as c:
            row = c.execute(sa.select(self.models.c.labels).where(self.models.c.model_id == model_id)).first()
        return None if row is None or not row[0] else [str(x) for x in row[0]]

    def register_model(self, model_id: str, kind: str, labels: list[str], artefact: str, run_id: str | None) -> None:
        row = {
            "model_id": model_id,
            "kind": kind,
            "labels": list(labels),
            "artefact": artefact,
            "run_id": run_id,
            "created_at": _now(),
        }
        self._retry(lambda c: self._upsert(c, self.models, [row], ("model_id",), keep=("created_at",)))

    def put_labels(self, rows: Iterable[dict[str, Any]]) -> int:
        """Upsert label rows (fingerprint, label, source, reviewer[, path, model_id, decision]) in
        one transaction; the row of the same (fingerprint, source, reviewer) is replaced, its
        created_at kept. Returns the number of rows written."""
        now = _now()
        rows = [
            {"path": None, "model_id": None, "decision": None, **r, "created_at": now, "updated_at": now} for r in rows
        ]
        if rows:
            key = ("fingerprint", "source", "reviewer")
            self._retry(lambda c: self._upsert(c, self.labels, rows, key, keep=("created_at",)))
        return len(rows)

    def label_rows(self) -> list[dict[str, Any]]:
        """Every label row, oldest change first."""
        import sqlalchemy as sa

        q = sa.select(self.labels).order_by(self.labels.c.updated_at, self.labels.c.fingerprint)
        with self.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(q)]

    def current_labels(self, sources: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """{fingerprint: its latest label row} (only rows of ``sources`` when given)."""
        keep = None if sources is None else set(sources)
        out: dict[str, dict[str, Any]] = {}
        for r in self.label_rows():
            if keep is None or r["source"] in keep:
                out[r["fingerprint"]] = r
        return out

    def write(
        self,
        results: Iterable[dict[str, Any]],
        failures: Iterable[dict[str, Any]] = (),
        vectors: Iterable[dict[str, Any]] = (),
    ) -> None:
        """Upsert ``results`` (rows of ``tags``), ``failures`` (path, model_id, fingerprint,
        reason) and ``vectors`` (rows of ``tag_vectors``) in one transaction. created_at of an
        existing row is kept."""
        import sqlalchemy as sa

        now = _now()
        results = [{**r, "created_at": now, "updated_at": now} for r in results]
        failures = [{**f, "created_at": now, "updated_at": now} for f in failures]
        vectors = [{**v, "created_at": now, "updated_at": now} for v in vectors]
        if not results and not failures and not vectors:
            return

        def tx(c):
            if results:
                self._upsert(c, self.tags, results, ("fingerprint", "model_id"), keep=("created_at",))
                for mid in {r["model_id"] for r in results}:  # a file that now works is no longer failed
                    paths = [r["path"] for r in results if r["model_id"] == mid]
                    c.execute(
                        sa.delete(self.failures).where(self.failures.c.model_id == mid, self.failures.c.path.in_(paths))
                    )
            if failures:
                self._upsert(c, self.failures, failures, ("path", "model_id"), keep=("created_at",))
            if vectors:
                self._upsert(c, self.vectors, vectors, ("fingerprint", "model_id"), keep=("created_at",))

        self._retry(tx)

    def _upsert(
        self, conn, table, rows: list[dict[str, Any]], key: tuple[str, ...], keep: tuple[str, ...] = ()
    ) -> None:
        import sqlalchemy as sa

        dialect = self.engine.dialect.name
        if dialect in ("sqlite", "postgresql"):
            if dialect == "sqlite":
                from sqlalchemy.dialects.sqlite import insert
            else:
                from sqlalchemy.dialects.postgresql import insert
            stmt = insert(table)
            update = {c.name: stmt.excluded[c.name] for c in table.columns if c.name not in key and c.name not in keep}
            conn.execute(stmt.on_conflict_do_update(index_elements=list(key), set_=update), rows)
            return
        # Portable fallback: delete the keys, insert the rows (one transaction: no reader sees a gap).
        for r in rows:
            conn.execute(sa.delete(table).where(*[table.c[k] == r[k] for k in key]))
        conn.execute(sa.insert(table), rows)

    def _retry(self, tx, attempts: int = 8, durable: bool = False) -> None:
        """Run ``tx(conn)`` in a transaction; retry when a concurrent writer raced us (SQLite
        'database is locked' past the busy timeout, PostgreSQL serialisation / unique races).
        durable: the commit must survive power loss, not only a killed process (the write-ahead
        intents of ``writeback``): SQLite commits it with ``synchronous=FULL`` (the WAL is
        fsynced at the commit); other databases' commits are durable already (PostgreSQL's
        default ``synchronous_commit=on``)."""
        for attempt in range(attempts):
            try:
                if durable and self.engine.dialect.name == "sqlite":
                    self._durable(tx)
                    return
                with self.engine.begin() as c:
                    tx(c)
                return
            except Exception as exc:
                if attempt == attempts - 1 or not _is_race(exc):
                    raise DatabaseError(f"{_safe(self.url)}: write failed ({first_line(_driver_error(exc))})") from None
                time.sleep(0.05 * 2**attempt)

    def _durable(self, tx) -> None:
        """``tx`` in one SQLite transaction committed with synchronous=FULL; the connection
        goes back to the pool at NORMAL."""
        with self.engine.connect() as c:
            c.exec_driver_sql("PRAGMA synchronous=FULL")  # set before the transaction begins
            c.commit()
            try:
                with c.begin():
                    tx(c)
            finally:
                c.exec_driver_sql("PRAGMA synchronous=NORMAL")
                c.commit()


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    # WAL + NORMAL: a committed batch survives a process kill (and power loss may lose the last
    # commits: results are recomputed). Write-ahead intents commit with FULL (ResultsDB._retry).
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _is_race(exc: Exception) -> bool:
    msg = str(exc).lower()
    return any(
        s in msg
        for s in (
            "database is locked",
            "already exists",
            "duplicate key",
            "could not serialize",
            "deadlock",
            "unique constraint",
        )
    )


def _driver_error(exc: Exception) -> BaseException:
    """The database driver's own exception that SQLAlchemy wraps (its message without the SQL)."""
    return getattr(exc, "orig", None) or exc


def _safe(url: str) -> str:
    """The URL without its password."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url
