"""The results database of ``embedkit tag``: one row per (audio content, model).

SQLAlchemy Core over any database URL; a plain file path means SQLite (the default). Tables:

- ``tags``: primary key (``fingerprint``, ``model_id``): the content fingerprint of
  ``embedkit.identity`` (so a renamed or copied file is the same audio, an edited one is new
  audio) and ``Tagger.model_id`` (a hash of the model artefact). Columns: path, size, mtime (+ mtime_ns, inode),
  duration_s, excerpt, n_windows, top_label, top_p, decision (the top label, or "uncertain" below
  the rule's threshold), genres ([[genre, p], ...] decided, several with a multi-genre rule),
  rule (the DecisionRule applied, JSON), topk / probabilities / window_share (JSON), model_kind,
  run_id, embedkit_version, created_at, updated_at (UTC).
- ``tag_failures``: (path, model_id) -> fingerprint, reason, timestamps: files that could not be
  tagged by that model. A later success removes the file's failure row.
- ``tag_models``: model_id -> kind, labels, artefact path, run id: what each model id means.
- ``tag_meta``: name -> value; ``fingerprints``: the scheme of the database's fingerprints
  (``embedkit.identity``), recorded when it is created. A database made before schemes (rows,
  no record) is ``sha256`` and stays so: its rows keep matching the files they came from.

Writes are idempotent upserts (``INSERT ... ON CONFLICT DO UPDATE`` on SQLite and PostgreSQL, a
delete + insert in one transaction elsewhere), each batch one transaction: a run killed at any
point leaves every committed batch and nothing partial, and re-running upserts the same rows.
SQLite files are opened in WAL mode with a busy timeout, so concurrent ``tag`` processes on one
file wait for each other instead of failing or corrupting it.

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

        have = {c["name"] for c in sa.inspect(self.engine).get_columns("tags")}
        missing = [c for c in self.tags.columns if c.name not in have]
        for col in missing:
            kind = col.type.compile(dialect=self.engine.dialect)
            try:
                with self.engine.begin() as c:
                    name = self.engine.dialect.identifier_preparer.quote(col.name)
                    c.execute(sa.text(f"ALTER TABLE tags ADD COLUMN {name} {kind}"))
            except Exception as exc:  # another process added it first
                if col.name not in {c["name"] for c in sa.inspect(self.engine).get_columns("tags")}:
                    raise DatabaseError(
                        f"{_safe(self.url)}: cannot add column tags.{col.name} ({first_line(_driver_error(exc))})"
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

    def write(self, results: Iterable[dict[str, Any]], failures: Iterable[dict[str, Any]] = ()) -> None:
        """Upsert ``results`` (rows of ``tags``) and ``failures`` (path, model_id, fingerprint,
        reason) in one transaction. created_at of an existing row is kept."""
        import sqlalchemy as sa

        now = _now()
        results = [{**r, "created_at": now, "updated_at": now} for r in results]
        failures = [{**f, "created_at": now, "updated_at": now} for f in failures]
        if not results and not failures:
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

    def _retry(self, tx, attempts: int = 8) -> None:
        """Run ``tx(conn)`` in a transaction; retry when a concurrent writer raced us (SQLite
        'database is locked' past the busy timeout, PostgreSQL serialisation / unique races)."""
        for attempt in range(attempts):
            try:
                with self.engine.begin() as c:
                    tx(c)
                return
            except Exception as exc:
                if attempt == attempts - 1 or not _is_race(exc):
                    raise DatabaseError(f"{_safe(self.url)}: write failed ({first_line(_driver_error(exc))})") from None
                time.sleep(0.05 * 2**attempt)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a committed batch survives a process kill
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
