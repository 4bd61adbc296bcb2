"""Similar tracks, genre playlists and radio from the track vectors ``embedkit tag --db`` keeps.

    results database (``tags`` + ``tag_vectors`` of one model) -> the similarity space ->
    index (exact below ``EXACT_MAX`` tracks, a FAISS IVF index beyond), persisted beside the database and
    brought up to date on every use -> nearest neighbours -> rules -> results / playlists

**The space.** A track is ``[sqrt(p), ALPHA * unit(v - mean)]`` normalised, compared by cosine:
p the track's calibrated genre probabilities (the ``tags`` row), v its vector
(``embedkit.deploy.vectors``: the backbone embedding for head runs), mean the library's mean
vector when the index was built. The Hellinger part puts tracks of one genre together (what the
model learned on labelled music: the projection is the run's own, fitted on its training data);
the embedding part orders tracks within a genre. Measured on gtzan_mini with musicnn-msd
(``bench/bench_similar.py``; 5-fold, the classifier fitted on the training folds only, each
held-out track queried against the other 99): same-genre precision at 10 is 0.73 with the
plain embedding's cosine and 0.84 in this space (ALPHA 0.5; 0.84 without the embedding part).

**Near-duplicates** (the same recording in another encoding, trimmed, at another path): the
centred embeddings close, the durations alike, and the loudness sketches that tagging keeps
(``embedkit.deploy.vectors.sketch``) correlated over time shifts (``is_duplicate``). Results never hold the
query's duplicates (they are listed apart) nor two duplicates of each other (the better one
stays).

**Vectors of two models are never compared**: a database, a query and an index belong to one
model id and one vector space; anything else is refused with one line.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ..audio.excerpts import DEFAULT_EXCERPT
from ..errors import EmbedkitError
from .vectors import from_bytes, sketch_from_bytes, sketch_similarity

#: weight of the embedding part of the space (see the module doc)
ALPHA = 0.5
#: up to this many tracks an index is the matrix itself (exact search); FAISS IVF beyond
EXACT_MAX = 20_000
#: near-duplicates: cosine of centred embeddings at or above (a cheap first test), loudness
#: sketches correlated at or above (``vectors.sketch_similarity``), durations within (s)
DUPLICATE_COSINE = 0.90
DUPLICATE_SKETCH = 0.90
DUPLICATE_SECONDS = 3.0
#: without sketches (vectors stored by a server upload...), the embedding alone at or above
DUPLICATE_COSINE_ALONE = 0.995
#: the approximate index (FAISS IVF, ``AnnSettings``): how each vector is stored ("SQ8": one
#: byte a dimension), k-means cells searched per query, the rows' dtype for the exact re-rank,
#: the k-means sample (rows a cell) and iterations; measured in bench/bench_similar.py scale
ANN_CODEC = "SQ8"
#: cells searched per query: None = tuned when the index is built, the fewest (a power of two)
#: that find ANN_RECALL of the exact top 10 of ANN_TUNE_QUERIES of its own rows
ANN_NPROBE = None
ANN_RECALL = 0.98  # on its own rows; held-out queries measured ~0.01 lower (bench_similar.py scale)
ANN_TUNE_QUERIES = 200
ROWS_DTYPE = "float16"
ANN_TRAIN_PER_LIST = 50
ANN_NITER = 10
#: the cells are trained again (``Index.update``) once the library is this many times the size
#: they were trained on
ANN_REGROW = 4
#: ANN candidates re-ranked exactly per result asked for
RERANK = 4
#: rows converted / added a chunk at a time (bounded memory at 1M x 2048)
ROW_CHUNK = 32_768
#: a chunk of rows read from the database holds at most about this many bytes of vectors
READ_BYTES = 64 << 20
INDEX_FORMAT = 2
#: seconds an update looks back before the newest row the index holds (late commits)
UPDATE_OVERLAP_S = 600
OUT_SUFFIXES = (".csv", ".jsonl", ".m3u8", ".m3u")


class SimilarError(EmbedkitError):
    """A similarity request that cannot be answered (one line: unknown track, empty database,
    another model's vectors, bad arguments); ``status`` / ``kind``: its HTTP answer."""

    status, kind = 400, "bad_request"


class TooLong(SimilarError):
    """An audio file to embed whole (excerpt ``full``) is longer than the caller's bound."""

    status, kind = 413, "too_long"


class TrackNotFound(SimilarError):
    """The query is neither a track of the library nor an audio file."""

    status, kind = 404, "not_found"


class NoVectors(SimilarError):
    """The database holds no vectors to compare with (none at all, or only another model's)."""

    status, kind = 409, "no_vectors"


# ---------------------------------------------------------------------------------------------
# The space


def space_vectors(probabilities: np.ndarray, vectors: np.ndarray, mean: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """Probabilities [N, C] and vectors [N, D] -> unit vectors of the similarity space float32
    [N, C + D] (see the module doc)."""
    p = np.sqrt(np.clip(np.asarray(probabilities, dtype=np.float64), 0, None))
    p /= np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    r = centred_unit(vectors, mean)
    x = np.hstack([p, alpha * r])
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x.astype(np.float32)


def centred_unit(vectors: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Vectors [N, D] minus ``mean``, each scaled to unit length (what duplicates are judged on)."""
    r = np.asarray(vectors, dtype=np.float64) - np.asarray(mean, dtype=np.float64)
    return r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------------------
# The library of one model in a results database


@dataclass
class Track:
    """One track of the library (a ``tags`` row with its vector)."""

    fingerprint: str
    path: str
    probabilities: np.ndarray  # calibrated, in the model's label order
    vector: np.ndarray | None
    decision: str | None = None
    top_p: float | None = None
    duration_s: float | None = None
    artist: str | None = None
    album: str | None = None
    title: str | None = None
    sketch: np.ndarray | None = field(default=None, repr=False)  # int8 [T, B], ``vectors.sketch``

    def p_of(self, labels: Sequence[str], genre: str) -> float:
        return float(self.probabilities[list(labels).index(genre)])


def _probs(row: dict, labels: Sequence[str]) -> np.ndarray:
    probs = row["probabilities"]
    if isinstance(probs, str):
        probs = json.loads(probs)
    return np.asarray([float(probs.get(l, 0.0)) for l in labels], dtype=np.float64)


class Library:
    """The tracks of ``model_id`` in the results database ``db`` that have vectors.

    model: a run directory / model file (its model id is computed, nothing loaded), a model id,
    or None: the one model whose vectors the database holds (SimilarError when it holds none or
    several)."""

    def __init__(self, db, model=None):
        from .resultsdb import ResultsDB

        self.db = ResultsDB(db)
        self.url = self.db.url
        have = self._models_with_vectors()
        self.model_path = None
        if model is None:
            if not have:
                raise NoVectors(
                    f"{_name(db)}: no track vectors in this database; run `embedkit tag RUN FOLDER --db {_name(db)}` first"
                )
            if len(have) > 1:
                raise SimilarError(
                    f"{_name(db)}: holds vectors of {len(have)} models ({', '.join(sorted(have))}); choose one with --model"
                )
            self.model_id = next(iter(have))
        else:
            self.model_id, self.model_path = _model_id(model)
            if self.model_id not in have:
                others = f"it holds vectors of {', '.join(sorted(have))}" if have else "it holds no track vectors"
                raise NoVectors(
                    f"{_name(db)}: no vectors of model {self.model_id} ({model}); {others}; vectors of two models are never compared"
                )
        labels = self.db.model_labels(self.model_id)
        info = self._model_row()
        if labels is None:  # rows of a model never registered: the stored probabilities' order
            labels = sorted(self._any_probabilities())
        self.labels: list[str] = list(labels)
        self.artefact = (info or {}).get("artefact")
        self.space, self.dim = self._space()

    # -- reads --------------------------------------------------------------------------------

    def _models_with_vectors(self) -> dict[str, int]:
        import sqlalchemy as sa

        v = self.db.vectors
        with self.db.engine.connect() as c:
            rows = c.execute(sa.select(v.c.model_id, sa.func.count()).group_by(v.c.model_id)).all()
        return {r[0]: int(r[1]) for r in rows}

    def _model_row(self) -> dict | None:
        import sqlalchemy as sa

        m = self.db.models
        with self.db.engine.connect() as c:
            r = c.execute(sa.select(m).where(m.c.model_id == self.model_id)).first()
        return None if r is None else dict(r._mapping)

    def _any_probabilities(self) -> list[str]:
        import sqlalchemy as sa

        t = self.db.tags
        with self.db.engine.connect() as c:
            r = c.execute(sa.select(t.c.probabilities).where(t.c.model_id == self.model_id).limit(1)).first()
        probs = r[0] if r else {}
        return list(json.loads(probs) if isinstance(probs, str) else probs)

    def _space(self) -> tuple[str, int]:
        import sqlalchemy as sa

        v = self.db.vectors
        with self.db.engine.connect() as c:
            rows = c.execute(
                sa.select(v.c.space, v.c.dim).where(v.c.model_id == self.model_id).group_by(v.c.space, v.c.dim)
            ).all()
        if len(rows) != 1:
            raise SimilarError(
                f"{_name(self.url)}: model {self.model_id} has vectors of {len(rows)} kinds ({rows}); re-tag the library"
            )
        return str(rows[0][0]), int(rows[0][1])

    def _select(self, since=None, decision: str | None = None, columns: str = "track"):
        """The query of (tags row + vector row) of this model: all, or updated after ``since``,
        or with ``decision``. columns: "track" (what a Track holds) or "index" (what the
        index reads: fingerprint, probabilities, vector, updated)."""
        import sqlalchemy as sa

        t, v = self.db.tags, self.db.vectors
        updated = (
            sa.func.max(t.c.updated_at, v.c.updated_at)
            if self.db.engine.dialect.name == "sqlite"
            else sa.func.greatest(t.c.updated_at, v.c.updated_at)
        ).label("updated")
        cols = [t.c.fingerprint, t.c.probabilities, v.c.vector, updated]
        if columns == "track":
            cols += [t.c.path, t.c.decision, t.c.top_p, t.c.duration_s, v.c.sketch, v.c.dim]
            cols += [v.c.artist, v.c.album, v.c.title]
        q = (
            sa.select(*cols)
            .select_from(t.join(v, sa.and_(t.c.fingerprint == v.c.fingerprint, t.c.model_id == v.c.model_id)))
            .where(t.c.model_id == self.model_id)
        )
        if since is not None:
            q = q.where(sa.or_(t.c.updated_at > since, v.c.updated_at > since))
        if decision is not None:
            q = q.where(t.c.decision == decision)
        return q

    def _chunks(self, since=None, chunk: int | None = None) -> Iterator[list[dict]]:
        """The index's columns of this model's rows (or those updated after ``since``), streamed
        ``chunk`` rows at a time (default: ROW_CHUNK, fewer for wide vectors: READ_BYTES; a
        server-side cursor where the database has one): a build never holds the library's rows
        in memory at once."""
        chunk = chunk or max(1, min(ROW_CHUNK, READ_BYTES // (4 * self.dim)))
        with self.db.engine.connect() as c:
            result = c.execution_options(stream_results=True, yield_per=chunk).execute(
                self._select(since, columns="index")
            )
            for part in result.partitions(chunk):
                yield [dict(r._mapping) for r in part]

    def _query(
        self,
        since=None,
        fingerprints: Iterable[str] | None = None,
        paths: Iterable[str] | None = None,
        decision: str | None = None,
    ):
        """(tags row + vector row) dicts of this model: all, updated after ``since``, or only
        those with one of ``fingerprints`` / ``paths``."""
        from .resultsdb import IN_CHUNK

        t = self.db.tags
        q = self._select(since, decision)
        out = []
        with self.db.engine.connect() as c:
            if fingerprints is None and paths is None:
                return [dict(r._mapping) for r in c.execute(q)]
            for col, values in ((t.c.fingerprint, fingerprints), (t.c.path, paths)):
                values = sorted(set(values or ()))
                for i in range(0, len(values), IN_CHUNK):
                    out.extend(dict(r._mapping) for r in c.execute(q.where(col.in_(values[i : i + IN_CHUNK]))))
        return out

    def track(self, row: dict) -> Track:
        return Track(
            fingerprint=row["fingerprint"],
            path=str(row["path"]),
            probabilities=_probs(row, self.labels),
            vector=from_bytes(row["vector"], row.get("dim")) if row.get("vector") is not None else None,
            decision=row.get("decision"),
            top_p=row.get("top_p"),
            duration_s=row.get("duration_s"),
            artist=row.get("artist"),
            album=row.get("album"),
            title=row.get("title"),
            sketch=sketch_from_bytes(row.get("sketch")),
        )

    def tracks(self, fingerprints: Iterable[str]) -> dict[str, Track]:
        return {r["fingerprint"]: self.track(r) for r in self._query(fingerprints=list(fingerprints))}

    def all_tracks(self, decision: str | None = None) -> list[Track]:
        return [self.track(r) for r in self._query(decision=decision)]

    def find(self, query: str) -> Track | None:
        """The library track a query names: a fingerprint, a path as stored, or a file whose
        content is in the library (another path of the same audio). None: not in the library."""
        if not query:
            return None
        if query.startswith(("b3-", "sha256-")) or (len(query) >= 32 and not os.path.exists(query)):
            rows = self._query(fingerprints=[query])
            if rows:
                return self.track(rows[0])
        rows = self._query(paths={query, str(Path(query).absolute()), str(Path(query).resolve())})
        if rows:
            return self.track(rows[0])
        if os.path.isfile(query):
            from ..identity import fingerprint

            try:
                fp = fingerprint(query, scheme=self.db.scheme)
            except Exception:
                return None
            rows = self._query(fingerprints=[fp])
            if rows:
                return self.track(rows[0])
        return None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Library":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _model_id(model) -> tuple[str, str | None]:
    """(model id, the artefact path or None) of a run directory / model file / model id."""
    s = str(model)
    if os.path.exists(s):
        from .tagger import model_id_of

        return model_id_of(s), s
    if len(s) >= 16 and all(ch in "0123456789abcdef" for ch in s.lower()):
        return s.lower(), None
    raise SimilarError(f"--model {s}: no such run directory or model file, and not a model id")


def _name(db) -> str:
    from .resultsdb import _safe

    s = str(db)
    return _safe(s) if "://" in s else s


# ---------------------------------------------------------------------------------------------
# The index


def index_dir(db_url: str, model_id: str, where: str | os.PathLike | None = None) -> Path:
    """Where the index of ``model_id`` lives: ``<database file>.similar/<model_id>/`` beside a
    SQLite file; for a server database ``$EMBEDKIT_INDEX_DIR`` (default
    ``~/.cache/embedkit/similar``)/<hash of the URL>/<model_id>/. ``where`` overrides the root."""
    if where is not None:
        return Path(where) / model_id
    if db_url.startswith("sqlite:///") and not db_url.endswith(":memory:"):
        return Path(db_url.split(":///", 1)[1] + ".similar") / model_id
    import hashlib

    from .resultsdb import _safe

    root = Path(os.environ.get("EMBEDKIT_INDEX_DIR") or Path.home() / ".cache" / "embedkit" / "similar")
    return root / hashlib.sha256(_safe(db_url).encode()).hexdigest()[:16] / model_id


@dataclass(frozen=True)
class AnnSettings:
    """How the approximate index above ``exact_max`` tracks is built and searched: FAISS
    ``IVF<nlist>,<codec>`` with inner product (the rows are unit vectors: cosine).

    codec: how the index stores each vector ("SQ8": one byte a dimension, "SQ6", "SQ4",
    "SQfp16", "Flat": float32); nlist: k-means cells (None: about 2 sqrt(N), a power of two, at
    least 39 training rows a cell); nprobe: cells searched per query (None: tuned at build, the
    fewest, a power of two, whose results hold ``recall`` of the exact top 10 of
    ``ANN_TUNE_QUERIES`` rows of the library: how many cells a query needs depends on how the
    library's vectors cluster, so it is measured on them, not assumed); rows_dtype: the dtype of the mapped rows file the candidates are re-ranked on
    exactly ("float16" | "float32"); train_per_list / niter: the k-means sample (rows a cell)
    and iterations. Everything but a given nprobe is recorded in ``info.json``; an index built with
    other settings is rebuilt when opened, never read with these."""

    codec: str = ANN_CODEC
    nlist: int | None = None
    nprobe: int | None = ANN_NPROBE
    rows_dtype: str = ROWS_DTYPE
    train_per_list: int = ANN_TRAIN_PER_LIST
    niter: int = ANN_NITER
    recall: float = ANN_RECALL

    def __post_init__(self) -> None:
        if self.codec not in ("SQ8", "SQ6", "SQ4", "SQfp16", "Flat"):
            raise SimilarError(f"index codec must be SQ8, SQ6, SQ4, SQfp16 or Flat, got {self.codec!r}")
        if self.rows_dtype not in ("float16", "float32"):
            raise SimilarError(f"index rows dtype must be float16 or float32, got {self.rows_dtype!r}")
        for name in ("nprobe", "nlist", "train_per_list", "niter"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise SimilarError(f"index {name} must be >= 1, got {getattr(self, name)}")
        if not 0 < float(self.recall) <= 1:
            raise SimilarError(f"index recall must be in (0, 1], got {self.recall}")

    def build_fields(self) -> dict[str, Any]:
        """The settings that shape the files (all but nprobe, a search setting)."""
        from dataclasses import asdict

        return {k: v for k, v in asdict(self).items() if k != "nprobe"}

    def nlist_for(self, n: int) -> int:
        if self.nlist is not None:
            return max(1, min(int(self.nlist), int(n)))
        want = 2 ** int(round(np.log2(max(1.0, 2.0 * np.sqrt(n)))))
        return int(max(1, min(want, n // 39)))

    def recorded(self, n: int) -> dict[str, Any]:
        """What ``info.json`` says of an index of these settings trained on ``n`` rows."""
        nlist = self.nlist_for(n)
        return {
            "library": "faiss",
            "factory": f"IVF{nlist},{self.codec}",
            "codec": self.codec,
            "nlist": nlist,
            "rows_dtype": self.rows_dtype,
            "train_per_list": int(self.train_per_list),
            "niter": int(self.niter),
            "recall_target": float(self.recall),
            "trained_n": int(n),
        }

    def mismatch(self, rec: dict | None) -> str | None:
        """Why an index recorded as ``rec`` was not built with these settings (None: it was)."""
        if not rec:
            return "no approximate index recorded"
        want = self.recorded(int(rec.get("trained_n") or 0))
        for key in ("library", "codec", "nlist", "rows_dtype", "train_per_list", "niter", "recall_target"):
            if rec.get(key) != want[key]:
                return f"{key} {rec.get(key)!r}, these settings {want[key]!r}"
        return None


@dataclass
class IndexInfo:
    model_id: str
    space: str
    dim: int  # of the similarity space (C + D)
    alpha: float
    kind: str  # "exact" | "ivf"
    n: int
    built_at: float
    updated_through: str | None  # the latest row update the index holds (ISO), for incremental updates
    format: int = INDEX_FORMAT
    seconds: dict[str, float] = field(default_factory=dict)
    rows_dtype: str = "float32"  # of the rows file (float32 for exact search; AnnSettings.rows_dtype beside an ANN)
    ann: dict[str, Any] | None = None  # AnnSettings.recorded: how the approximate index was built
    settings: dict[str, Any] | None = None  # the AnnSettings asked for: kept by later opens that ask for none
    files: dict[str, str] = field(default_factory=dict)  # rows / keys / mean / ann: this generation's files


class Index:
    """Nearest neighbours of one model's library in the similarity space.

    Files in ``folder``: ``info.json`` (written last: it names the generation of the other
    files, so a reader sees a whole index or the previous one), ``mean-<gen>.npy`` (the vector
    mean fixed at build), ``keys-<gen>.json`` (fingerprint of each row), ``space-<gen>.npy``
    (the rows [N, C + D], mapped, never held in memory: float32 for exact search; above
    ``exact_max`` tracks ``AnnSettings.rows_dtype``, read only for the candidates being
    re-ranked) and, above ``exact_max``, ``ann-<gen>.faiss`` (FAISS IVF, scalar-quantised
    vectors: ``AnnSettings``). ``open`` brings it up to date: tracks added or re-tagged since
    are added (the index grows; the mean and the k-means cells stay, until the library is
    ``ANN_REGROW`` times the size they were trained on), so a library that grows by tagging
    never needs a rebuild; ``build`` starts over (new mean)."""

    def __init__(
        self,
        folder: Path,
        info: IndexInfo,
        mean: np.ndarray,
        keys: list[str],
        X: np.ndarray,
        ann=None,
        settings: AnnSettings | None = None,
    ):
        self.folder, self.info, self.mean, self.keys, self.X, self.ann = folder, info, mean, keys, X, ann
        self.settings = settings or AnnSettings()
        self.pos = {k: i for i, k in enumerate(keys)}

    # -- build / open -------------------------------------------------------------------------

    @classmethod
    def build(
        cls, lib: Library, where=None, exact_max: int = EXACT_MAX, settings: AnnSettings | None = None
    ) -> "Index":
        settings = settings or AnnSettings()
        t0 = time.perf_counter()
        # Two streamed passes, a chunk of rows at a time (no copy of the library in memory): the
        # mean, then the rows. The mean is only the space's centre, kept with the index and used
        # for every row after, so rows changed between the passes do not unsettle it.
        total, n = np.zeros(lib.dim, np.float64), 0
        for part in lib._chunks():
            total += np.stack([from_bytes(r["vector"], lib.dim) for r in part]).sum(0, np.float64)
            n += len(part)
        if not n:
            raise SimilarError(f"{_name(lib.url)}: no tracks with vectors for model {lib.model_id}")
        mean = (total / n).astype(np.float32)
        kind = "exact" if n <= exact_max else "ivf"
        folder = index_dir(lib.url, lib.model_id, where)
        folder.mkdir(parents=True, exist_ok=True)
        gen = _generation()
        dim = len(lib.labels) + lib.dim
        rows_dtype = "float32" if kind == "exact" else settings.rows_dtype
        X = np.lib.format.open_memmap(folder / f"space-{gen}.npy", "w+", np.dtype(rows_dtype), (n, dim))
        keys: list[str] = []
        extra: list[np.ndarray] = []  # rows added between the passes
        through = None
        for part in lib._chunks():
            V = np.stack([from_bytes(r["vector"], lib.dim) for r in part])
            Xp = space_vectors(np.stack([_probs(r, lib.labels) for r in part]), V, mean)
            fit = max(0, min(len(part), n - len(keys)))
            X[len(keys) : len(keys) + fit] = Xp[:fit]
            extra.extend(Xp[fit:])
            keys.extend(r["fingerprint"] for r in part)
            through = max(filter(None, [through, *(_iso(r["updated"]) for r in part)]), default=None)
        X.flush()
        del X
        X = np.load(folder / f"space-{gen}.npy", mmap_mode="r")
        if not keys:
            raise SimilarError(f"{_name(lib.url)}: the tracks with vectors for model {lib.model_id} were removed")
        if len(keys) != n:  # rows added or removed between the passes: the rows file as read
            first, gen = folder / f"space-{gen}.npy", _generation()
            X = _write_rows(folder / f"space-{gen}.npy", X[: min(n, len(keys))], rows_dtype, {}, extra)
            first.unlink()
            n = len(keys)
        info = IndexInfo(lib.model_id, lib.space, dim, ALPHA, kind, n, time.time(), through, rows_dtype=rows_dtype)
        t1 = time.perf_counter()
        ann = None
        if kind == "ivf":
            ann, info.ann = _ann_build(X, settings)
        info.seconds = {"read": t1 - t0, "ann": time.perf_counter() - t1}
        idx = cls(folder, info, mean, keys, X, ann, settings)
        idx.save(gen)
        return idx

    @classmethod
    def open(
        cls,
        lib: Library,
        where=None,
        update: bool = True,
        exact_max: int = EXACT_MAX,
        settings: AnnSettings | None = None,
    ) -> "Index":
        """The saved index of ``lib``'s model (built when there is none, it is unreadable, or its
        approximate index was built with other ``settings``), with the rows added or changed
        since it was saved added to it. ``settings`` None: the ones the saved index was built
        with (``embedkit index --codec ...`` sticks), the defaults for a new one."""
        asked = settings
        settings = settings or AnnSettings()
        folder = index_dir(lib.url, lib.model_id, where)
        try:
            info = IndexInfo(**json.loads((folder / "info.json").read_text()))
            if info.format != INDEX_FORMAT or info.model_id != lib.model_id or info.space != lib.space:
                raise ValueError("another index")
            saved = AnnSettings(**info.settings) if info.settings else None  # as parsed above
            if asked is None:
                settings = saved or settings
            elif saved is not None and saved.build_fields() != asked.build_fields():
                raise ValueError("asked for other build settings")  # an exact index too: cheap to rebuild
            if info.kind != "exact" and settings.mismatch(info.ann):
                raise ValueError("built with other settings")
            keys = json.loads((folder / info.files["keys"]).read_text())
            X = np.load(folder / info.files["rows"], mmap_mode="r")  # pages read as touched
            mean = np.load(folder / info.files["mean"])
            if X.dtype != np.dtype(info.rows_dtype) or len(keys) != len(X) or X.shape[1] != info.dim:
                raise ValueError("inconsistent files")
            ann = _ann_load(folder / info.files["ann"], info.dim, len(keys)) if info.kind != "exact" else None
        except (OSError, ValueError, TypeError, KeyError, RuntimeError):  # FAISS: RuntimeError
            return cls.build(lib, where, exact_max, settings)
        idx = cls(folder, info, mean, keys, X, ann, settings)
        if update:
            idx.update(lib, exact_max)
        return idx

    def update(self, lib: Library, exact_max: int = EXACT_MAX) -> int:
        """Add the rows added or re-tagged since the index was saved; returns how many."""
        through = _parse_iso(self.info.updated_through)
        # rows stamped before the index was saved can commit after it (a concurrent `tag`):
        # look UPDATE_OVERLAP_S further back, and take what the index lacks or holds older
        since = (
            None
            if through is None
            else (through - _dt.timedelta(seconds=UPDATE_OVERLAP_S)).replace(tzinfo=_dt.timezone.utc)
        )
        rows = [
            r
            for r in lib._query(since=since)
            if r["fingerprint"] not in self.pos or through is None or _parse_iso(_iso(r["updated"])) > through
        ]
        if not rows:
            return 0
        V = np.stack([from_bytes(r["vector"], lib.dim) for r in rows])
        P = np.stack([_probs(r, lib.labels) for r in rows])
        Xn = space_vectors(P, V, self.mean)
        replaced: dict[int, np.ndarray] = {}
        new_keys, new_rows = [], []
        for r, x in zip(rows, Xn):
            i = self.pos.get(r["fingerprint"])
            if i is not None:
                replaced[i] = x  # re-tagged: its row is replaced
            elif r["fingerprint"] not in new_keys:
                new_keys.append(r["fingerprint"])
                new_rows.append(x)
        start = len(self.keys)
        kind = "ivf" if self.info.kind != "exact" or start + len(new_keys) > exact_max else "exact"
        rows_dtype = self.info.rows_dtype if kind == self.info.kind else self.settings.rows_dtype
        gen = _generation()
        self.X = _write_rows(self.folder / f"space-{gen}.npy", self.X, rows_dtype, replaced, new_rows)
        self.keys.extend(new_keys)
        self.pos.update({k: start + j for j, k in enumerate(new_keys)})
        changed = np.array(sorted(replaced) + list(range(start, len(self.keys))), dtype=np.int64)
        if kind == "ivf":
            trained = int((self.info.ann or {}).get("trained_n") or 0)
            if self.ann is None or len(self.keys) > ANN_REGROW * trained:
                # first time above exact_max, or grown well past the cells it was trained on
                self.ann, self.info.ann = _ann_build(self.X, self.settings)
            else:
                _ann_add(self.ann, self.X[changed], changed, replaced=len(replaced))
        self.info.kind, self.info.rows_dtype = kind, rows_dtype
        self.info.n = len(self.keys)
        self.info.updated_through = max(filter(None, [self.info.updated_through, *(_iso(r["updated"]) for r in rows)]))
        self.save(gen)
        return len(rows)

    def write_info(self) -> None:
        """``info.json`` (atomically), with the settings this index is used with."""
        from dataclasses import asdict

        from ..io import atomic_write

        self.info.settings = asdict(self.settings)
        atomic_write(self.folder / "info.json", lambda fh: fh.write(json.dumps(asdict(self.info)).encode()))

    def save(self, gen: str | None = None) -> None:
        """Write this index as a new generation (``gen``: its rows file is already written) and
        point ``info.json`` at it; the files of older generations are removed."""
        from ..io import atomic_write

        self.folder.mkdir(parents=True, exist_ok=True)
        if gen is None:
            gen = _generation()
            self.X = _write_rows(self.folder / f"space-{gen}.npy", self.X, self.info.rows_dtype, {}, [])
        files = {"rows": f"space-{gen}.npy", "keys": f"keys-{gen}.json", "mean": f"mean-{gen}.npy"}
        atomic_write(self.folder / files["mean"], lambda fh: np.save(fh, self.mean))
        atomic_write(self.folder / files["keys"], lambda fh: fh.write(json.dumps(self.keys).encode()))
        if self.ann is not None:
            files["ann"] = f"ann-{gen}.faiss"
            tmp = self.folder / f".ann.{os.getpid()}.tmp"
            _faiss().write_index(self.ann, str(tmp))
            os.replace(tmp, self.folder / files["ann"])
        self.info.files = files
        self.write_info()  # last: it names this generation; a reader sees the old index or this one
        keep = set(files.values()) | {"info.json"}
        for f in self.folder.iterdir():
            stale = f.name.startswith(("space", "keys", "mean", "ann-", "graph.")) and f.name not in keep
            if stale and f.is_file():  # an open reader's mapping stays valid (POSIX unlink)
                try:
                    f.unlink(missing_ok=True)
                except OSError:  # still mapped on Windows: the next save removes it
                    pass

    # -- search ---------------------------------------------------------------------------------

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(row indices [<= k], cosine similarities) of the nearest rows to the unit vector x."""
        k = min(int(k), len(self.keys))
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        if self.ann is not None and k < len(self.keys):
            self.ann.nprobe = int(self.settings.nprobe or (self.info.ann or {}).get("nprobe") or self.ann.nprobe)
            return _ann_topk(self.ann, self.X, x[None], k)[0]
        s = _dot(self.X, x)
        top = np.argpartition(-s, k - 1)[:k] if k < len(s) else np.arange(len(s))
        top = top[np.argsort(-s[top], kind="stable")]
        return top, s[top]


def _saved_settings(folder: Path) -> AnnSettings | None:
    """The settings the index saved in ``folder`` was built with (None: none saved, or from an
    embedkit that did not record them)."""
    try:
        rec = json.loads((folder / "info.json").read_text()).get("settings")
        return AnnSettings(**rec) if rec else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _generation() -> str:
    import uuid

    return f"{int(time.time())}-{uuid.uuid4().hex[:8]}"


def _dot(X: np.ndarray, x: np.ndarray) -> np.ndarray:
    """X @ x in float32, a chunk of rows at a time when X is stored otherwise (float16 rows)."""
    if X.dtype == np.float32:
        return np.asarray(X @ x)
    return np.concatenate([np.asarray(X[i : i + ROW_CHUNK], dtype=np.float32) @ x for i in range(0, len(X), ROW_CHUNK)])


def _write_rows(
    path: Path, old: np.ndarray, dtype: str, replaced: dict[int, np.ndarray], new: list[np.ndarray]
) -> np.ndarray:
    """The rows file ``path``: ``old`` (a chunk at a time, in ``dtype``) with the rows of
    ``replaced`` swapped in and ``new`` appended; returned mapped read-only."""
    n, dim = len(old), int(old.shape[1])
    X = np.lib.format.open_memmap(path, "w+", np.dtype(dtype), (n + len(new), dim))
    for i in range(0, n, ROW_CHUNK):
        X[i : min(n, i + ROW_CHUNK)] = old[i : i + ROW_CHUNK]
    for i, x in replaced.items():
        X[i] = x
    if new:
        X[n:] = np.stack(new)
    X.flush()
    del X
    return np.load(path, mmap_mode="r")


def _iso(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v
    return v.isoformat()


def _parse_iso(s: str | None):
    if s is None:
        return None
    try:
        d = _dt.datetime.fromisoformat(s)
    except ValueError:
        return None
    return d.replace(tzinfo=None) if d.tzinfo is None else d.astimezone(_dt.timezone.utc).replace(tzinfo=None)


def _faiss():
    from ..errors import require

    return require("faiss", "pip install 'embedkit[similar]'", "approximate search of libraries above EXACT_MAX tracks")


def _ann_build(X: np.ndarray, settings: AnnSettings | None = None):
    """(FAISS IVF index over the rows of X, ``settings.recorded``): k-means cells trained on a
    sample of ``train_per_list`` rows a cell (seed 0), then every row added with its row number
    as id, a chunk at a time (X may be a float16 mapped file: no float32 copy of it is made)."""
    faiss = _faiss()
    s = settings or AnnSettings()
    n, d = int(X.shape[0]), int(X.shape[1])
    rec = s.recorded(n)
    index = faiss.index_factory(d, rec["factory"], faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = int(s.niter)
    ivf.cp.min_points_per_centroid = 1  # small libraries: fewer rows than 39 a cell is no error
    ivf.cp.max_points_per_centroid = max(1, int(s.train_per_list))
    ivf.cp.seed = 0
    ntrain = min(n, int(s.train_per_list) * rec["nlist"])
    pick = np.sort(np.random.default_rng(0).choice(n, ntrain, replace=False)) if ntrain < n else slice(None)
    index.train(np.ascontiguousarray(X[pick], dtype=np.float32))
    for i in range(0, n, ROW_CHUNK):
        part = np.ascontiguousarray(X[i : i + ROW_CHUNK], dtype=np.float32)
        index.add_with_ids(part, np.arange(i, i + len(part), dtype=np.int64))
    if s.nprobe is None:
        rec["nprobe"], rec["tuned_recall"] = _tune_nprobe(index, X, s.recall)
    else:
        rec["nprobe"] = index.nprobe = int(s.nprobe)
    return index, rec


def _ann_topk(ann, X: np.ndarray, Q: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each query of Q [m, d]: (row ids, cosines) of its k best, the ANN's
    ``max(RERANK * k, k + 30)`` candidates re-ranked on the rows X (exact cosines)."""
    n = min(int(ann.ntotal), max(RERANK * k, k + 30))
    _, C = ann.search(np.ascontiguousarray(Q, dtype=np.float32), n)
    out = []
    for q, cand in zip(Q, C):
        cand = cand[cand >= 0]
        s = np.asarray(X[cand], dtype=np.float32) @ q
        order = np.argsort(-s, kind="stable")[:k]
        out.append((cand[order], s[order]))
    return out


def _tune_nprobe(ann, X: np.ndarray, target: float, k: int = 10) -> tuple[int, float]:
    """(the fewest cells, a power of two, whose results hold ``target`` of the exact top k of
    ``ANN_TUNE_QUERIES`` rows of X (seed 1; each row itself left out), the recall they reach).
    One exact pass over X, a chunk at a time."""
    n, nlist = int(ann.ntotal), int(ann.nlist)
    k = min(k, n - 1)
    if k < 1 or nlist == 1:
        ann.nprobe = 1
        return 1, 1.0
    m = min(n, ANN_TUNE_QUERIES)
    pick = np.sort(np.random.default_rng(1).choice(n, m, replace=False))
    Q = np.asarray(X[pick], dtype=np.float32)
    S = np.empty((m, n), np.float32) if m * n <= 50_000_000 else None
    best = np.zeros((m, 0), np.int64)
    best_s = np.zeros((m, 0), np.float32)
    for i in range(0, n, ROW_CHUNK):  # the exact top k + 1 of each query (itself among them)
        part = Q @ np.asarray(X[i : i + ROW_CHUNK], dtype=np.float32).T
        if S is not None:
            S[:, i : i + part.shape[1]] = part
            continue
        ids = np.concatenate([best, np.broadcast_to(np.arange(i, i + part.shape[1]), part.shape)], 1)
        sc = np.concatenate([best_s, part], 1)
        keep = np.argpartition(-sc, k, axis=1)[:, : k + 1]
        best, best_s = np.take_along_axis(ids, keep, 1), np.take_along_axis(sc, keep, 1)
    if S is not None:
        best = np.argpartition(-S, k, axis=1)[:, : k + 1]
    truth = [set(t.tolist()) - {int(p)} for t, p in zip(best, pick)]
    nprobe, recall = 1, 0.0
    while True:
        ann.nprobe = nprobe
        found = _ann_topk(ann, X, Q, k + 1)
        recall = float(
            np.mean([len((set(f.tolist()) - {int(p)}) & t) / len(t) for (f, _), t, p in zip(found, truth, pick)])
        )
        if recall >= target or nprobe >= nlist:
            return nprobe, recall
        nprobe = min(nlist, nprobe * 2)


def _ann_add(ann, X: np.ndarray, ids: np.ndarray, replaced: int = 0) -> None:
    """Add rows with ids ``ids``; when ``replaced`` > 0 some are already in the index: those
    are removed first (a re-tagged track's row is replaced, never held twice)."""
    ids = np.asarray(ids, dtype=np.int64)
    if replaced:
        ann.remove_ids(ids)
    ann.add_with_ids(np.ascontiguousarray(X, dtype=np.float32), ids)


def _ann_load(path: Path, dim: int, n: int):
    ann = _faiss().read_index(str(path))
    if ann.d != dim or ann.ntotal != n:
        raise ValueError("an approximate index of other rows")
    return ann


# ---------------------------------------------------------------------------------------------
# Rules and answers


@dataclass
class Rules:
    """What a person can ask of the results (the same names at the CLI and HTTP doors).

    max_per_artist: at most this many results of one artist (None: no cap; tracks without an
    artist tag are never capped). exclude_same_album: no results from the query's album.
    genre: only tracks decided as this genre. min_confidence: only tracks whose probability of
    their decided genre (of ``genre`` when given) is at least this. duplicates: "collapse"
    (default: the query's near-duplicates listed apart, results hold one of each group) or
    "keep"."""

    max_per_artist: int | None = None
    exclude_same_album: bool = False
    genre: str | None = None
    min_confidence: float | None = None
    duplicates: str = "collapse"

    def check(self, labels: Sequence[str]) -> None:
        if self.max_per_artist is not None and self.max_per_artist < 1:
            raise SimilarError(f"--max-per-artist must be >= 1, got {self.max_per_artist}")
        if self.min_confidence is not None and not 0 <= self.min_confidence <= 1:
            raise SimilarError(f"--min-confidence must be in [0, 1], got {self.min_confidence}")
        if self.genre is not None and self.genre not in labels:
            raise SimilarError(f"--genre {self.genre}: not a genre of this model ({', '.join(labels)})")
        if self.duplicates not in ("collapse", "keep"):
            raise SimilarError(f"duplicates must be collapse or keep, got {self.duplicates!r}")


@dataclass
class Hit:
    """One result: the track, its similarity to the query (cosine in the space), and for the
    query's near-duplicates the cosine of their embeddings."""

    track: Track
    score: float
    duplicate_of_query: bool = False
    embedding_cosine: float | None = None

    def to_json(self, labels: Sequence[str]) -> dict[str, Any]:
        t = self.track
        return {
            "path": t.path,
            "fingerprint": t.fingerprint,
            "score": round(float(self.score), 6),
            "artist": t.artist,
            "album": t.album,
            "title": t.title,
            "decision": t.decision,
            "confidence": None if t.top_p is None else float(t.top_p),
            "duration_s": t.duration_s,
            **(
                {"embedding_cosine": round(float(self.embedding_cosine), 6)}
                if self.embedding_cosine is not None
                else {}
            ),
        }


@dataclass
class SimilarResult:
    query: Track
    query_in_library: bool
    hits: list[Hit]
    duplicates: list[Hit]
    model_id: str
    labels: list[str]
    index_kind: str
    n_library: int
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "query": {**Hit(self.query, 1.0).to_json(self.labels), "in_library": self.query_in_library},
            "model_id": self.model_id,
            "index": self.index_kind,
            "library_tracks": self.n_library,
            "results": [h.to_json(self.labels) for h in self.hits],
            "duplicates": [h.to_json(self.labels) for h in self.duplicates],
            "seconds": round(self.seconds, 4),
        }


def _norm_tag(s: str | None) -> str | None:
    return " ".join(s.casefold().split()) if s else None


def is_duplicate(a: Track, b: Track, mean: np.ndarray, cos: float | None = None) -> tuple[bool, float]:
    """(are ``a`` and ``b`` the same recording, the cosine of their centred embeddings): the
    embeddings close (``DUPLICATE_COSINE``), the durations within ``DUPLICATE_SECONDS`` where
    both are known, and the loudness sketches correlated (``DUPLICATE_SKETCH``) over time shifts
    of up to 5 s; without sketches, the embeddings alone at ``DUPLICATE_COSINE_ALONE``. On
    gtzan_mini, different classical pieces reach a centred embedding cosine of 0.98 (more than a
    2 s trim of one track, 0.97): the embedding alone cannot tell them apart, the sketch can
    (``bench/bench_similar.py duplicates``)."""
    if cos is None:
        if a.vector is None or b.vector is None:
            return False, 0.0
        ra, rb = centred_unit(np.stack([a.vector, b.vector]), mean)
        cos = float(ra @ rb)
    if cos < DUPLICATE_COSINE:
        return False, cos
    if a.duration_s is not None and b.duration_s is not None and abs(a.duration_s - b.duration_s) > DUPLICATE_SECONDS:
        return False, cos
    if a.sketch is not None and b.sketch is not None and len(a.sketch) and len(b.sketch):
        return sketch_similarity(a.sketch, b.sketch) >= DUPLICATE_SKETCH, cos
    return cos >= DUPLICATE_COSINE_ALONE, cos


def _admit(t: Track, rules: Rules, labels: Sequence[str]) -> bool:
    if rules.genre is not None and t.decision != rules.genre:
        return False
    if rules.min_confidence is not None:
        p = t.p_of(labels, rules.genre) if rules.genre is not None else float(t.top_p or 0.0)
        if p < rules.min_confidence:
            return False
    return True


def select(
    query: Track,
    candidates: list[tuple[Track, float]],
    k: int,
    rules: Rules,
    labels: Sequence[str],
    mean: np.ndarray,
    chosen: list[Hit] | None = None,
) -> tuple[list[Hit], list[Hit]]:
    """Apply ``rules`` to ``candidates`` (by decreasing score) -> (up to k results, the query's
    near-duplicates). ``chosen``: results already taken (their artists and duplicates count)."""
    hits: list[Hit] = list(chosen or [])
    dups: list[Hit] = []
    per_artist: dict[str, int] = {}
    for h in hits:
        a = _norm_tag(h.track.artist)
        if a:
            per_artist[a] = per_artist.get(a, 0) + 1
    q_album = _norm_tag(query.album)
    collapse = rules.duplicates == "collapse"
    vecs = [t.vector for t, _ in candidates if t.vector is not None]
    if collapse and query.vector is not None and vecs:
        R = {
            t.fingerprint: r
            for (t, _), r in zip([c for c in candidates if c[0].vector is not None], centred_unit(np.stack(vecs), mean))
        }
        rq = centred_unit(query.vector[None], mean)[0]
    else:
        R, rq = {}, None
    kept_r = [R[h.track.fingerprint] for h in hits if h.track.fingerprint in R]
    for t, score in candidates:
        if len(hits) - len(chosen or []) >= k:
            break
        if t.fingerprint == query.fingerprint:
            continue
        r = R.get(t.fingerprint)
        if collapse and r is not None:
            dup, cos = is_duplicate(query, t, mean, float(r @ rq))
            if dup:
                dups.append(Hit(t, score, True, cos))
                continue
            if any(is_duplicate(t, h.track, mean, float(r @ kr))[0] for h, kr in zip(hits, kept_r)):
                continue
        if not _admit(t, rules, labels):
            continue
        if rules.exclude_same_album and q_album and _norm_tag(t.album) == q_album:
            continue
        a = _norm_tag(t.artist)
        if rules.max_per_artist is not None and a and per_artist.get(a, 0) >= rules.max_per_artist:
            continue
        hits.append(Hit(t, score))
        if r is not None:
            kept_r.append(r)
        if a:
            per_artist[a] = per_artist.get(a, 0) + 1
    return hits[len(chosen or []) :], dups


def query_track(
    lib: Library,
    query: str,
    tagger=None,
    excerpt: str | None = None,
    checkpoint: str | None = None,
    max_audio_s: float | None = None,
) -> tuple[Track, bool]:
    """(the query as a Track, whether it is in the library): a library track by fingerprint or
    path, else an audio file embedded now with the library's model (``tagger``, or the model
    the database registered, or --model)."""
    t = lib.find(query)
    if t is not None:
        return t, True
    if not os.path.isfile(query):
        raise TrackNotFound(
            f"{query}: not a track of the library (no such path or fingerprint for model {lib.model_id}) and not an audio file"
        )
    return embed_file(lib, query, tagger, excerpt, checkpoint, max_audio_s), False


def embed_file(
    lib: Library,
    path: str,
    tagger=None,
    excerpt: str | None = None,
    checkpoint: str | None = None,
    max_audio_s: float | None = None,
) -> Track:
    """An audio file as a Track of ``lib``'s space, embedded with the library's model.
    max_audio_s: the most seconds decoded when the whole file is listened to (``TooLong``
    beyond; the HTTP service's bound), None: no bound."""
    from ..audio.excerpts import Excerpt, read_excerpt
    from ..audio.excerpts import TooLong as LongAudio
    from ..errors import AudioError
    from .vectors import track_vector

    if tagger is None:
        artefact = lib.model_path or lib.artefact
        if not artefact or not os.path.exists(artefact):
            raise SimilarError(
                f"{path}: not in the library; embedding it needs model {lib.model_id}, whose file "
                f"{artefact or '(not recorded)'} is not here: pass --model RUN"
            )
        from .tagger import load_tagger

        tagger = load_tagger(artefact, checkpoint=checkpoint)
    if tagger.model_id != lib.model_id or tagger.vector_space != lib.space:
        raise NoVectors(
            f"{path}: the model here ({tagger.model_id}, {tagger.vector_space}) is not the library's "
            f"({lib.model_id}, {lib.space}); vectors of two models are never compared"
        )
    ex = Excerpt.parse(excerpt or _library_excerpt(lib))
    seg = tagger.segment
    try:
        windows, _starts, duration = read_excerpt(
            path, tagger.sample_rate, ex, tagger.audio.clip_s, seg.segment_s, seg.hop_s, max_full_s=max_audio_s
        )
    except LongAudio as exc:
        raise TooLong(str(exc)) from None
    except AudioError as exc:
        raise SimilarError(str(exc)) from None
    if len(windows) == 0:
        raise SimilarError(f"{path}: shorter than one {seg.segment_s:g} s window")
    pw, e = tagger.embed_segments(windows)
    p = tagger.track_probabilities(pw)
    d = tagger.decide(p)
    from .vectors import library_tags, sketch

    tags = library_tags(path)
    return Track(
        fingerprint="",
        path=str(path),
        probabilities=np.asarray(p, dtype=np.float64),
        vector=track_vector(e),
        decision=d.label,
        top_p=float(np.max(p)),
        duration_s=float(duration) if duration else None,
        sketch=sketch(windows, tagger.sample_rate),
        **tags,
    )


def _library_excerpt(lib: Library) -> str:
    import sqlalchemy as sa

    t = lib.db.tags
    with lib.db.engine.connect() as c:
        r = c.execute(
            sa.select(t.c.excerpt, sa.func.count().label("n"))
            .where(t.c.model_id == lib.model_id)
            .group_by(t.c.excerpt)
            .order_by(sa.desc("n"))
            .limit(1)
        ).first()
    return str(r[0]) if r and r[0] else DEFAULT_EXCERPT


def _candidates(lib: Library, idx: Index, x: np.ndarray, n: int) -> list[tuple[Track, float]]:
    ids, scores = idx.search(x, n)
    keys = [idx.keys[i] for i in ids]
    tracks = lib.tracks(keys)
    return [(tracks[k], float(s)) for k, s in zip(keys, scores) if k in tracks]


def similar(
    db,
    query: str,
    k: int = 10,
    rules: Rules | None = None,
    *,
    model=None,
    tagger=None,
    excerpt: str | None = None,
    checkpoint: str | None = None,
    index_root=None,
    library: Library | None = None,
    index: Index | None = None,
    max_audio_s: float | None = None,
) -> SimilarResult:
    """The ``k`` tracks of the library in ``db`` most similar to ``query`` (a path or
    fingerprint of a library track, or any audio file) under ``rules``. model: a run / model
    file / model id (default: the database's only model with vectors); tagger: a loaded Tagger
    of that model (embeds audio files not in the library; else the model is loaded when needed).
    library / index: already open (a server keeps them between requests). max_audio_s: the
    bound on decoded seconds when an audio file is listened to whole (``embed_file``)."""
    t0 = time.perf_counter()
    if int(k) < 1:
        raise SimilarError(f"-k must be >= 1, got {k}")
    rules = rules or Rules()
    own = library is None
    lib = library or Library(db, model if model is not None else (tagger.model_id if tagger is not None else None))
    try:
        rules.check(lib.labels)
        idx = index if index is not None else Index.open(lib, index_root)
        q, inside = query_track(lib, query, tagger, excerpt, checkpoint, max_audio_s)
        x = space_vectors(q.probabilities[None], q.vector[None], idx.mean)[0]
        hits: list[Hit] = []
        dups: list[Hit] = []
        n = min(len(idx.keys), max(4 * k + 8, 32))
        while True:
            cands = _candidates(lib, idx, x, n)
            hits, dups = select(q, cands, k, rules, lib.labels, idx.mean)
            if len(hits) >= k or n >= len(idx.keys):
                break
            n = min(len(idx.keys), n * 4)  # the rules removed too many: look further
        return SimilarResult(
            q, inside, hits, dups, lib.model_id, lib.labels, idx.info.kind, len(idx.keys), time.perf_counter() - t0
        )
    finally:
        if own:
            lib.close()


def update_index(
    db,
    model=None,
    rebuild: bool = False,
    index_root=None,
    exact_max: int = EXACT_MAX,
    settings: AnnSettings | dict[str, Any] | None = None,
) -> tuple[IndexInfo, int]:
    """(the index of ``model``'s vectors in ``db``, rows added or updated): brought up to date,
    or with ``rebuild`` built again from the database (a new mean). ``settings``: of the
    approximate index (an index saved with others is rebuilt); None or {}: the saved index's
    own; a dict: the saved index's own with these fields changed (``embedkit index --codec``)."""
    from dataclasses import asdict

    with Library(db, model) as lib:
        saved = _saved_settings(index_dir(lib.url, lib.model_id, index_root))
        if isinstance(settings, dict):
            settings = AnnSettings(**{**asdict(saved or AnnSettings()), **settings}) if settings else None
        if rebuild:
            idx = Index.build(lib, index_root, exact_max, settings or saved)
            return idx.info, idx.info.n
        idx = Index.open(lib, index_root, update=False, exact_max=exact_max, settings=settings)
        added = idx.update(lib, exact_max)
        if settings is not None and settings != saved and not added:  # a search setting (nprobe): recorded
            idx.write_info()
        return idx.info, added


# ---------------------------------------------------------------------------------------------
# Playlists


@dataclass
class Playlist:
    tracks: list[Track]
    scores: list[float]
    kind: str  # "genre" | "radio"
    model_id: str
    labels: list[str]
    missing: list[str] = field(default_factory=list)  # library paths no longer on disk (left out)


def genre_playlist(
    db, genre: str, length: int = 25, min_confidence: float | None = None, max_per_artist: int | None = None, model=None
) -> Playlist:
    """The ``length`` tracks that best fit ``genre``: decided as it, by decreasing probability
    of it (at least ``min_confidence``), at most ``max_per_artist`` per artist."""
    if length < 1:
        raise SimilarError(f"--length must be >= 1, got {length}")
    with Library(db, model) as lib:
        Rules(max_per_artist=max_per_artist, genre=genre, min_confidence=min_confidence).check(lib.labels)
        gi = lib.labels.index(genre)
        tracks = lib.all_tracks(decision=genre)
        tracks.sort(key=lambda t: (-t.probabilities[gi], t.path))
        out, scores, missing, per = [], [], [], {}
        for t in tracks:
            p = float(t.probabilities[gi])
            if min_confidence is not None and p < min_confidence:
                break
            if not os.path.exists(t.path):
                missing.append(t.path)
                continue
            a = _norm_tag(t.artist)
            if max_per_artist is not None and a and per.get(a, 0) >= max_per_artist:
                continue
            per[a] = per.get(a, 0) + 1
            out.append(t)
            scores.append(p)
            if len(out) >= length:
                break
        if not out:
            raise SimilarError(
                f"no track of the library is decided {genre}"
                + (f" with p >= {min_confidence:g}" if min_confidence is not None else "")
            )
        return Playlist(out, scores, "genre", lib.model_id, lib.labels, missing)


def radio(
    db,
    seed: str,
    length: int = 25,
    max_per_artist: int | None = 2,
    model=None,
    tagger=None,
    index_root=None,
    genre: str | None = None,
    min_confidence: float | None = None,
    duplicates: str = "collapse",
) -> Playlist:
    """A walk from ``seed`` through similar tracks: each next track is the most similar to the
    current one and the seed together (mean of the two cosines, so the walk does not drift away),
    never the artist just played, at most ``max_per_artist`` per artist, no near-duplicate of a
    track already in it. The seed comes first when it is in the library."""
    if length < 1:
        raise SimilarError(f"--length must be >= 1, got {length}")
    with Library(db, model if model is not None else (tagger.model_id if tagger is not None else None)) as lib:
        rules = Rules(max_per_artist=max_per_artist, genre=genre, min_confidence=min_confidence, duplicates=duplicates)
        rules.check(lib.labels)
        idx = Index.open(lib, index_root)
        q, inside = query_track(lib, seed, tagger)
        xs = space_vectors(q.probabilities[None], q.vector[None], idx.mean)[0]
        walk: list[Hit] = [Hit(q, 1.0)] if inside and os.path.exists(q.path) else []
        used = {q.fingerprint} if q.fingerprint else set()
        missing: list[str] = []
        cur = xs
        n = min(len(idx.keys), max(8 * length, 64))
        while len(walk) < length:
            ids_a, s_a = idx.search(cur, n)
            ids_b, s_b = idx.search(xs, n)
            score: dict[int, float] = {}
            for i, s in zip(ids_a, s_a):
                score[int(i)] = 0.5 * float(s) + 0.5 * float(idx.X[i] @ xs)
            for i, s in zip(ids_b, s_b):
                score.setdefault(int(i), 0.5 * float(s) + 0.5 * float(idx.X[i] @ cur))
            order = sorted(score, key=lambda i: -score[i])
            tracks = lib.tracks(idx.keys[i] for i in order)
            cands = [
                (tracks[idx.keys[i]], score[i]) for i in order if idx.keys[i] in tracks and idx.keys[i] not in used
            ]
            prev = _norm_tag(walk[-1].track.artist) if walk else None
            step = None
            for t, s in cands:
                if prev and _norm_tag(t.artist) == prev:
                    continue  # no artist twice in a row
                if not os.path.exists(t.path):
                    if t.path not in missing:
                        missing.append(t.path)
                    used.add(t.fingerprint)
                    continue
                got, _ = select(q, [(t, s)], 1, rules, lib.labels, idx.mean, chosen=walk)
                if got:
                    step = got[0]
                    break
                used.add(t.fingerprint)  # refused for good (duplicate, artist cap, genre)
            if step is None:
                if n >= len(idx.keys):
                    break
                n = min(len(idx.keys), n * 4)
                continue
            walk.append(step)
            used.add(step.track.fingerprint)
            cur = idx.X[idx.pos[step.track.fingerprint]]
        if not walk:
            raise SimilarError(f"{seed}: no track of the library fits the radio's rules")
        return Playlist([h.track for h in walk], [h.score for h in walk], "radio", lib.model_id, lib.labels, missing)


# ---------------------------------------------------------------------------------------------
# Output


def write_m3u8(path: str | os.PathLike, tracks: Sequence[Track]) -> Path:
    """An extended M3U playlist in UTF-8 with paths relative to the playlist's folder (what
    Navidrome, Jellyfin and foobar2000 read; absolute where no relative path exists, as across
    Windows drives)."""
    from ..io import atomic_write

    out = Path(path)
    base = out.absolute().parent
    lines = ["#EXTM3U"]
    for t in tracks:
        target = Path(t.path).absolute()
        try:
            rel = os.path.relpath(target, base)
        except ValueError:
            rel = str(target)
        name = " - ".join(x for x in (t.artist, t.title or Path(t.path).stem) if x)
        secs = -1 if t.duration_s is None else int(round(t.duration_s))
        lines += [f"#EXTINF:{secs},{name}", rel.replace(os.sep, "/") if os.sep != "/" else rel]
    base.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda fh: fh.write(("\n".join(lines) + "\n").encode("utf-8")))
    return out


CSV_FIELDS = ("rank", "path", "score", "artist", "album", "title", "decision", "confidence", "fingerprint")


def write_hits(path: str | os.PathLike, hits: Sequence[Hit], labels: Sequence[str]) -> Path:
    """Results as CSV / JSON Lines (one row per result: path, score, artist, genre decision...)
    or M3U8, by the file's suffix."""
    import csv
    import io

    from ..io import atomic_write

    out = Path(path)
    kind = out.suffix.lower()
    if kind not in OUT_SUFFIXES:
        raise SimilarError(f"--out {out}: use a .csv, .jsonl or .m3u8 file name")
    if kind in (".m3u8", ".m3u"):
        return write_m3u8(out, [h.track for h in hits])
    buf = io.StringIO()
    if kind == ".jsonl":
        for i, h in enumerate(hits, 1):
            buf.write(json.dumps({"rank": i, **h.to_json(labels)}) + "\n")
    else:
        w = csv.writer(buf)
        w.writerow(CSV_FIELDS)
        for i, h in enumerate(hits, 1):
            j = h.to_json(labels)
            w.writerow([i, *(("" if j.get(f) is None else j[f]) for f in CSV_FIELDS[1:])])
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda fh: fh.write(buf.getvalue().encode("utf-8")))
    return out


def check_out(path) -> None:
    if path is not None and Path(path).suffix.lower() not in OUT_SUFFIXES:
        raise SimilarError(f"--out {path}: use a .csv, .jsonl or .m3u8 file name")


__all__ = [
    "ALPHA",
    "AnnSettings",
    "DUPLICATE_COSINE",
    "EXACT_MAX",
    "Hit",
    "Index",
    "Library",
    "Playlist",
    "Rules",
    "SimilarError",
    "SimilarResult",
    "Track",
    "genre_playlist",
    "radio",
    "update_index",
    "similar",
    "space_vectors",
    "write_hits",
    "write_m3u8",
]
