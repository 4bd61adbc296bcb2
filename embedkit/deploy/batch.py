"""Tag a music library with a trained model: ``embedkit tag MODEL INPUT...``.

    inputs (files, folders, path lists, stdin), a chunk of PLAN_CHUNK at a time -> content
    fingerprints -> skip what the results database already holds for this model -> lanes
    (embedkit.jobs, one per core): decode only the excerpt (seeking) -> windows
    (embedkit.audio.segments) -> the track's forwards (Tagger.predict_segments) -> per track: top
    genre, top-k, all probabilities (+ window shares with ``full``) -> database upserts / CSV /
    JSONL / terminal table (on an accelerator: forwards batched across files instead)

Which audio is listened to (``--excerpt``), with clip = the run's clip length (``audio.clip_s``,
30 s by default) and windows cut by the run's segment config:

- ``first``: [0, clip): what an ingest backend usually feeds; for a 30 s file exactly the
  windows training and ``embedkit predict`` saw.
- ``middle`` (the default, ``audio.excerpts.DEFAULT_EXCERPT``: as cheap as ``first`` and not
  fooled by an intro; bench/bench_excerpts.py): the clip centred in the song; a song no longer
  than the clip gives the same windows as ``first``.
- ``spread:N``: N clips with starts evenly spaced from 0 to duration - clip (overlapping when
  the song is shorter than N clips); the track probability is the mean over all their windows.
- ``full``: every window of the song; rows also get the share of windows whose top genre is
  each label.

A song shorter than the clip contributes the windows it has (no looping or padding: tagging
reports what is in the file); one shorter than one window is a bad file. Only the excerpt is
decoded: ``middle`` / ``spread`` seek (libsndfile) to each clip, with 0.25 s of margin so the
resampler sees real samples at the edges.

Re-runs: a track whose (fingerprint, model id) row exists with the same excerpt is not
decoded again; with nothing to do the model is never loaded. Files recorded as failed for the
model are skipped unless ``retry_failed``. Kill -9 at any point loses at most the batch being
written (each batch is one transaction), and the next run redoes exactly the missing tracks.
"""

from __future__ import annotations

import csv
import json
import os
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ..audio.excerpts import DEFAULT_EXCERPT, Excerpt, read_excerpt
from ..calibration import DecisionRule
from ..errors import AudioError, EmbedkitError
from ..jobs import Decoded, Failure, JobResult, cached_model, run_shards, run_tracks
from .inputs import InputReport, expand_inputs
from .records import TrackResult, applied_rule, track_result
from .vectors import vector_rows

OUTPUT_SUFFIXES = (".csv", ".jsonl")
#: input paths fingerprinted and planned at a time (bounds a run's memory)
PLAN_CHUNK = 1024


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class TagResult(JobResult):
    """What ``tag`` did. The counters every job reports are ``jobs.JobResult``'s: n_done_before
    (already in the database for this model and excerpt), n_failed_before (recorded as failed
    earlier, skipped without retry_failed), failures (this run's: path, reason), seconds,
    device (embedkit.device.provenance of the local path); n_failed, n_available,
    nothing_done."""

    model_id: str
    n_inputs: int = 0
    n_tagged: int = 0  # by this run
    n_redecided: int = 0  # of the rows done before, those decided again under this run's rule (and rewritten)
    rows: list[TrackResult] = field(default_factory=list)  # the first ``keep_rows`` results (terminal table)
    model_loaded: bool = False
    windows: int = 0
    labels: list[str] = field(default_factory=list)
    rule: DecisionRule | None = None  # the decision rule applied to every row
    file_tags: Any = None  # writeback.FileTagReport with --write-tags
    inputs: InputReport = field(default_factory=InputReport)  # files not audio, unreadable folders, URLs

    @property
    def n_done(self) -> int:
        return self.n_tagged


def _result(
    tagger, item: "_Item", p_windows: np.ndarray, ex: Excerpt, top_k: int, rule: DecisionRule, not_music=None
) -> TrackResult:
    return track_result(
        tagger,
        p_windows,
        rule,
        path=item.path,
        fingerprint=item.fingerprint,
        excerpt=str(ex),
        top_k=top_k,
        duration_s=item.duration_s,
        window_starts_s=item.starts,
        stat=item.stat,
        not_music=not_music,
    )


class _Writer:
    """Streams results to a CSV or JSONL file under a temporary name; ``commit`` renames it
    into place (atomic: readers see the previous file or the complete new one)."""

    def __init__(self, path: str | os.PathLike, labels: list[str]):
        from ..io import tmp_name

        self.path = Path(path)
        self.kind = self.path.suffix.lower()
        if self.kind not in OUTPUT_SUFFIXES:
            raise EmbedkitError(f"--out {self.path}: use a .csv or .jsonl file name")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp_name(self.path)
        self.fh = open(self.tmp, "w", encoding="utf-8", newline="")
        if self.kind == ".csv":
            self.csv = csv.writer(self.fh)
            self.csv.writerow(TrackResult.csv_header(labels))

    def write(self, r: TrackResult) -> None:
        if self.kind == ".jsonl":
            self.fh.write(json.dumps(r.to_json()) + "\n")
        else:
            self.csv.writerow(r.csv_row())

    def commit(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if not self.fh.closed:
            self.fh.close()
        Path(self.tmp).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class _Item:
    path: str
    stat: Any  # identity.FileStat
    fingerprint: str
    windows: np.ndarray | None = None
    starts: np.ndarray | None = None
    duration_s: float = 0.0
    # with track vectors kept: the file's artist / album / title and the excerpt's loudness
    # sketch, read in the decode workers (embedkit.deploy.vectors)
    tags: dict[str, Any] | None = None
    sketch: np.ndarray | None = None


def _plan(
    paths: list[str],
    model_id: str,
    excerpt: Excerpt,
    db,
    retry_failed: bool,
    workers: int,
    seen: set[str],
    top_k: int,
    rule: DecisionRule,
    labels: list[str] | None,
    vectors: bool = False,
) -> tuple[list[_Item], list[tuple[TrackResult, bool, bool]], dict[str, list[str]], list[dict], int]:
    """Fingerprint a chunk of the inputs (re-using the database's record for unchanged files)
    and split it into (to tag, already done [(stored result decided under ``rule``, is a copy of
    a track of this run, its row must be rewritten)], duplicates {fingerprint: [other paths]}, failures, n skipped as failed
    before). ``seen``: fingerprints met in earlier chunks of the same run (updated); their paths
    are duplicates of a track already handled. labels: the model's label order (None: the
    stored probabilities' own order, for a model the database never registered)."""
    from ..identity import SCHEME, FileStat, identify

    known = {}
    scheme = db.scheme if db is not None else SCHEME  # an older database keeps its own
    if db is not None:
        for r in db.done(model_id, str(excerpt), paths=paths).values():
            if r.get("inode") is not None and r.get("mtime_ns") is not None:
                # FileStat holds the resolved path; rows keep the path as given
                st = FileStat(str(Path(r["path"]).resolve()), int(r["size"]), int(r["mtime_ns"]), int(r["inode"]))
                known[st] = r["fingerprint"]

    def ident(path):
        try:  # the database is this job's record: the process cache is left alone
            return path, *identify(path, known, remember=False, scheme=scheme), None
        except AudioError as exc:
            return path, None, None, exc.problem

    with ThreadPoolExecutor(max(1, workers)) as pool:
        idents = list(pool.map(ident, paths))
    fps = [fp for _, _, fp, _ in idents if fp is not None]
    done = db.done(model_id, str(excerpt), fingerprints=fps) if db is not None and fps else {}
    if vectors and done:  # rows tagged before vectors were kept: tagged again to get theirs
        have = db.vector_fingerprints(model_id, done)
        done = {fp: row for fp, row in done.items() if fp in have}
    failed = db.failed(model_id, paths=paths) if db is not None and not retry_failed else {}
    todo: list[_Item] = []
    done_rows: list[tuple[TrackResult, bool, bool]] = []
    dups: dict[str, list[str]] = {}
    failures: list[dict] = []
    n_failed_before = 0
    earlier = set(fps) & seen  # contents handled in an earlier chunk of this run

    def stored(fp: str, path: str, copy: bool) -> tuple[TrackResult, bool, bool]:
        row = done[fp]
        r, changed = TrackResult.from_db_row({**row, "path": path}, labels or _keys(row), rule, top_k)
        return r, copy, changed and not copy  # a copy's row is its original's, rewritten already

    for path, st, fp, problem in idents:
        if problem is not None:
            failures.append({"path": path, "fingerprint": None, "reason": problem})
            continue
        if fp in earlier and fp in done:  # its row was written by this run: a copy of it
            done_rows.append(stored(fp, path, True))
            continue
        if fp in seen and fp not in earlier:
            dups.setdefault(fp, []).append(path)
            continue
        seen.add(fp)
        if fp in done:
            done_rows.append(stored(fp, path, False))
        elif path in failed and failed[path].get("fingerprint") == fp:
            n_failed_before += 1
        else:
            todo.append(_Item(path, st, fp))
    return todo, done_rows, dups, failures, n_failed_before


def tag(
    model: str | os.PathLike,
    inputs: Iterable[str | os.PathLike],
    *,
    excerpt: str | Excerpt = DEFAULT_EXCERPT,
    db: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    top_k: int = 3,
    rule: DecisionRule | None = None,
    threshold: float | None = None,
    multi: bool | None = None,
    multi_threshold: float | None = None,
    margin: float | None = None,
    max_genres: int | None = None,
    not_music: float | None = None,
    file_tags=None,
    workers: int | None = None,
    batch_size: int | None = 32,
    checkpoint: str | None = None,
    executor: Executor | None = None,
    shard_size: int = 64,
    retry_failed: bool = False,
    keep_rows: int = 50,
    tagger=None,
    stdin=None,
    progress: Callable[[int, int], None] | None = None,
    device: str | None = None,
    precision: str | None = None,
    allow_tf32: bool = False,
) -> TagResult:
    """Tag every audio file in ``inputs`` with the run / model file ``model``.

    excerpt: "first", "middle", "spread:N" or "full" (see the module doc). db: results
    database (SQLite path or SQLAlchemy URL); re-runs skip tracks it holds for this model and
    excerpt. out: also write the results of every input track (new and already tagged) to a
    .csv or .jsonl file. rule: the decision rule (default: the model's stored rule,
    ``records.model_rule``) with the overrides threshold / multi / multi_threshold / margin /
    max_genres / not_music (None keeps the stored value; the same names as the CLI flags and the HTTP
    query parameters). Rows already in the database are decided again under this rule (the same
    probabilities; a row whose recorded rule differs is rewritten). file_tags: a
    ``writeback.FileTagOptions`` to write each track's decided genres into its file as results
    arrive (needs ``db`` unless a dry run; memory stays flat whatever the library size).
    workers: lanes on the CPU (embedkit.jobs), decode threads on an accelerator (default: CPU
    count). batch_size: windows per forward (on the CPU, of one track). executor: run shards of
    ``shard_size`` files elsewhere (a dask Client; each worker loads the model once and writes
    to ``db``, which it must be able to reach). tagger: an already loaded Tagger for ``model``
    (saves the load). progress(done, total) is called from this thread as tracks finish. Bad
    files are recorded (``failures``, and in the database), never raised; EmbedkitError is
    raised for an unusable model, database or argument. device / precision / allow_tf32: where
    the network runs (``embedkit.device``; Dask workers resolve the name themselves). None: the
    CPU, or where a given ``tagger`` already is. batch_size None: 32 windows on the CPU, 8x on
    an accelerator (``device.default_batch_size``).
    """
    from ..device import default_batch_size, resolve, settle

    device_name, precision, batch_size = settle(tagger, device, allow_tf32, precision, batch_size, executor is not None)
    from .resultsdb import ResultsDB
    from .tagger import model_id_of

    t0 = time.perf_counter()
    ex = excerpt if isinstance(excerpt, Excerpt) else Excerpt.parse(excerpt)
    if top_k < 1:
        raise EmbedkitError(f"--top-k must be >= 1, got {top_k}")
    if batch_size is not None and batch_size < 1:
        raise EmbedkitError(f"--batch-size must be >= 1, got {batch_size}")
    workers = max(1, workers or os.cpu_count() or 1)
    writer_path = Path(out) if out is not None else None
    if writer_path is not None and writer_path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise EmbedkitError(f"--out {writer_path}: use a .csv or .jsonl file name")
    rule = (rule or applied_rule(tagger if tagger is not None else model)).with_overrides(
        threshold, multi, multi_threshold, margin, max_genres, not_music
    )
    if file_tags is not None and not file_tags.dry_run and db is None:
        raise EmbedkitError(
            "writing tags needs a results database (--db): it records the previous genres so `embedkit untag` can restore them"
        )
    scan = InputReport()
    paths = expand_inputs(inputs, stdin, report=scan)
    if not paths:
        raise EmbedkitError("; ".join(["no audio files found in the inputs", *scan.summary()]))
    model_id = tagger.model_id if tagger is not None else model_id_of(model)
    database = ResultsDB(db) if db is not None else None
    labels = list(tagger.labels) if tagger is not None else database.model_labels(model_id) if database else None
    keep_vectors = database is not None and _embeds(tagger, model)
    res = TagResult(model_id, n_inputs=len(paths), rule=rule, inputs=scan)
    writer = None
    files = None
    if file_tags is not None:
        from .writeback import FileTagWriter

        files = FileTagWriter(database, model_id, file_tags)
        res.file_tags = files.report
    finished = 0
    total = len(paths)  # progress counts input paths (a duplicate finishes with its first copy)
    seen: set[str] = set()
    ready = False  # the model is loaded / placed (on the first chunk with work)

    def emit(r: TrackResult, dups: dict[str, list[str]]) -> None:
        nonlocal finished, writer
        if not res.labels:
            res.labels = list(r.labels)
        if writer is None and writer_path is not None:
            writer = _Writer(writer_path, res.labels)
        same = [r, *(r.at(p) for p in dups.get(r.fingerprint, []))]
        for one in same:
            if writer is not None:
                writer.write(one)
            if len(res.rows) < keep_rows:
                res.rows.append(one)
            if files is not None:
                files.write(one)
        finished += len(same)

    try:
        # The inputs are planned and tagged a chunk at a time: memory does not grow with the
        # number of tracks (or with the database), only the paths and fingerprints are kept.
        for at in range(0, len(paths), PLAN_CHUNK):
            todo, done_rows, dups, failures, n_failed_before = _plan(
                paths[at : at + PLAN_CHUNK],
                model_id,
                ex,
                database,
                retry_failed,
                workers,
                seen,
                top_k,
                rule,
                labels,
                vectors=keep_vectors,
            )
            res.n_failed_before += n_failed_before
            finished += n_failed_before
            res.n_done_before += sum(not copy for _, copy, _ in done_rows)
            if failures:
                res.failures.extend({"path": f["path"], "reason": f["reason"]} for f in failures)
                if database is not None:
                    database.write([], [{**f, "model_id": model_id} for f in failures])
                finished += len(failures)
            # Stored rows are decided again under this run's rule (from their probabilities, so
            # never trusted from the row) and rewritten where the decision, the genres or the
            # rule differ: the database says what this run decided.
            again = [r for r, _, changed in done_rows if changed]
            if again and database is not None:
                database.write([r.db_row() for r in again])
            res.n_redecided += len(again)
            for r, _, _ in done_rows:
                emit(r, dups)
            if progress:
                progress(finished, total)
            if todo and not ready:  # load / place the model on the first chunk with work
                if tagger is None and executor is None:
                    from .tagger import load_tagger

                    tagger = load_tagger(
                        model, checkpoint=checkpoint, device=device_name, precision=precision, allow_tf32=allow_tf32
                    )
                    res.model_loaded = True
                elif tagger is not None and executor is None and tagger.torch_backed:
                    tagger.to(resolve(device_name, allow_tf32), precision)
                if tagger is not None and executor is None:
                    from ..device import provenance

                    res.device = (
                        provenance(tagger.device, tagger.precision, allow_tf32)
                        if tagger.torch_backed
                        else {"device": "cpu", "name": str(tagger.meta.get("runtime", "cpu")), "precision": "fp32"}
                    )
                    if batch_size is None:
                        batch_size = default_batch_size(tagger.device, 32)
                if tagger is not None and database is not None:
                    database.register_model(
                        model_id,
                        tagger.kind,
                        tagger.labels,
                        str(tagger.meta.get("artefact", model)),
                        tagger.meta.get("run_id"),
                    )
                ready = True

            def on_batch(rows: list[TrackResult], fails: list[dict], stored: bool = False, dups=dups) -> None:
                nonlocal finished
                # every path of a bad content is a failure (its copies were planned with it)
                copies = [{**f, "path": q} for f in fails for q in dups.get(f.get("fingerprint"), [])]
                if database is not None:  # shards elsewhere (stored) wrote their own rows already
                    database.write(
                        [] if stored else [r.db_row() for r in rows],
                        [{**f, "model_id": model_id} for f in (copies if stored else fails + copies)],
                        vectors=[] if stored else vector_rows(rows),
                    )
                fails = fails + copies
                for r in rows:
                    emit(r, dups)
                    res.n_tagged += 1
                    res.windows += r.n_windows
                res.failures.extend({"path": f["path"], "reason": f["reason"]} for f in fails)
                finished += len(fails)
                if progress:
                    progress(finished, total)

            if todo and executor is None:
                _run_local(tagger, todo, ex, workers, batch_size, top_k, rule, on_batch, vectors=keep_vectors)
            elif todo:
                _run_remote(
                    executor,
                    model,
                    checkpoint,
                    todo,
                    ex,
                    db,
                    batch_size,
                    top_k,
                    rule,
                    shard_size,
                    on_batch,
                    (device or "cpu", precision, allow_tf32),
                )
        if writer is None and writer_path is not None and res.labels:
            writer = _Writer(writer_path, res.labels)
        if writer is not None:
            writer.commit()
            writer = None
    finally:
        if writer is not None:
            writer.abort()
        if database is not None:
            database.close()
    res.seconds = time.perf_counter() - t0
    return res


def _embeds(tagger, model) -> bool:
    """Does the model give track vectors (``embedkit.deploy.vectors``)? Every torch-backed run
    kind does; an ONNX export does not. Known without loading the model."""
    if tagger is not None:
        return tagger.torch_backed and tagger.vector_space is not None
    from .tagger import resolve_artefact

    return resolve_artefact(model).suffix.lower() != ".onnx"


def _keys(row: dict[str, Any]) -> list[str]:
    """The labels of a stored row, in its probabilities' order (a model the database never
    registered: rows of an older embedkit)."""
    probs = row["probabilities"]
    return list(json.loads(probs) if isinstance(probs, str) else probs)


def _decode_item(item: _Item, sr: int, ex: Excerpt, clip_s, window_s: float, hop_s: float) -> tuple[_Item, str | None]:
    from ..identity import FileStat

    try:
        if FileStat.of(item.path) != item.stat:  # edited or replaced since it was fingerprinted
            raise AudioError(item.path, "changed while being tagged; run again to tag the new content")
        item.windows, item.starts, item.duration_s = read_excerpt(item.path, sr, ex, clip_s, window_s, hop_s)
        return item, None
    except AudioError as exc:
        return item, exc.problem


class _Tagging:
    """Tagging as a ``jobs.Job``: items are ``_Item``s; a result is a ``TrackResult``, a
    failure {path, fingerprint, reason}."""

    def __init__(self, tagger, ex: Excerpt, top_k: int, rule: DecisionRule, vectors: bool = False):
        self.tagger, self.ex, self.top_k, self.rule = tagger, ex, top_k, rule
        self.vectors = vectors and tagger.torch_backed and tagger.vector_space is not None

    def decode(self, item: _Item):
        seg = self.tagger.segment
        item, problem = _decode_item(
            item, self.tagger.sample_rate, self.ex, self.tagger.audio.clip_s, seg.segment_s, seg.hop_s
        )
        if problem is not None:
            return Failure({"path": item.path, "fingerprint": item.fingerprint, "reason": problem})
        if self.vectors:  # file I/O and an FFT: here, in parallel, not in the forward loop
            from .vectors import library_tags, sketch

            item.tags, item.sketch = library_tags(item.path), sketch(item.windows, self.tagger.sample_rate)
        return Decoded(item.windows, item)

    def forward(self, windows: np.ndarray):
        """Probabilities [K, C], or with a not-music detector {"p": [K, C], "not_music": [K]};
        with track vectors to keep (``vectors``), also "e": the window embeddings [K, D]."""
        if self.vectors:  # one forward gives both (embedkit.deploy.vectors)
            p, e, nm = self.tagger.score_and_embed(windows)
            out = {"p": p}
            if e is not None:
                out["e"] = np.asarray(e, dtype=np.float32).reshape(len(p), -1)
            if nm is not None:
                out["not_music"] = nm
            return out
        p, nm = self.tagger.score_segments(windows)
        return p if nm is None else {"p": p, "not_music": nm}

    def finish(self, item: _Item, decoded: Decoded, out) -> TrackResult:
        p_windows, nm = (out["p"], out.get("not_music")) if isinstance(out, dict) else (out, None)
        row = _result(self.tagger, item, p_windows, self.ex, self.top_k, self.rule, nm)
        if isinstance(out, dict) and "e" in out and len(out["e"]):
            from .vectors import TrackVector, track_vector

            row.vector = TrackVector(track_vector(out["e"]), self.tagger.vector_space, item.tags, item.sketch)
        # memory stays flat: nothing of a finished track is kept
        item.windows = item.starts = item.tags = item.sketch = None
        return row

    def single_threaded(self):
        return self.tagger.single_threaded()


def _run_local(
    tagger,
    todo: list[_Item],
    ex: Excerpt,
    workers: int,
    batch_size: int,
    top_k: int,
    rule: DecisionRule,
    on_batch,
    one_thread: bool | None = None,
    vectors: bool = False,
) -> None:
    """Tag ``todo`` here (``jobs.run_tracks``), handing finished tracks to ``on_batch`` in
    ``todo`` order, a transaction's worth (``batch_size`` windows) at a time. On the CPU:
    ``workers`` lanes, each taking a track from file to row; on an accelerator: decode threads
    feeding forwards batched across files."""
    from ..device import is_accelerator

    accelerator = tagger.torch_backed and is_accelerator(tagger.device)
    run_tracks(
        _Tagging(tagger, ex, top_k, rule, vectors),
        todo,
        on_batch,
        accelerator=accelerator,
        workers=workers,
        batch_size=batch_size,
        ahead=_ahead(tagger, ex, workers, batch_size) if accelerator else None,
        one_thread=one_thread,
    )


def _ahead(tagger, ex: Excerpt, workers: int, batch_size: int) -> int:
    """Decoded tracks kept ready on an accelerator: enough for two forwards while the decoders
    work on, bounded in windows (a ``full`` excerpt of a long song is hundreds of windows, so
    only 2 / thread)."""
    seg, clip_s = tagger.segment, tagger.audio.clip_s
    per_track = (
        None
        if ex.mode == "full" or clip_s is None
        else (ex.n if ex.mode == "spread" else 1) * max(1, int(clip_s // seg.hop_s))
    )
    return max(2 * workers, 4, -(-2 * batch_size // per_track) if per_track else 0)


def tag_shard(
    model: str,
    checkpoint: str | None,
    items: list[tuple[str, Any, str]],
    excerpt: str,
    db: str | None,
    batch_size: int,
    top_k: int,
    rule: DecisionRule,
    device: str = "cpu",
    precision: str = "fp32",
    allow_tf32: bool = False,
) -> tuple[list[TrackResult], list[dict]]:
    """Tag one shard (runs on a Dask worker: the model is loaded once per worker process, on
    ``device`` as resolved on that worker). items: (path, FileStat, fingerprint). Writes to
    ``db`` when given; returns (rows, failures)."""
    from .tagger import load_tagger

    tagger = cached_model(load_tagger, model, checkpoint, device, precision, allow_tf32)
    rows_out, fails_out = [], []
    database = None
    if db is not None:
        from .resultsdb import ResultsDB

        database = ResultsDB(db)
        database.register_model(
            tagger.model_id,
            tagger.kind,
            tagger.labels,
            str(tagger.meta.get("artefact", model)),
            tagger.meta.get("run_id"),
        )

    def on_batch(rows, fails):
        if database is not None:
            database.write(
                [r.db_row() for r in rows],
                [{**f, "model_id": tagger.model_id} for f in fails],
                vectors=vector_rows(rows),
            )
        rows_out.extend(rows)
        fails_out.extend(fails)

    try:
        _run_local(
            tagger,
            [_Item(p, st, fp) for p, st, fp in items],
            Excerpt.parse(excerpt),
            1,
            batch_size,
            top_k,
            rule,
            on_batch,
            one_thread=True,  # this worker thread is one lane of the cluster
            vectors=database is not None,
        )
    finally:
        if database is not None:
            database.close()
    return rows_out, fails_out


def _run_remote(
    executor,
    model,
    checkpoint,
    todo: list[_Item],
    ex: Excerpt,
    db,
    batch_size: int,
    top_k: int,
    rule: DecisionRule,
    shard_size: int,
    on_batch,
    device=("cpu", "fp32", False),
) -> None:
    """Shards on ``executor`` (``jobs.run_shards``: a dask Client or any concurrent.futures
    Executor; each worker loads the model once); the workers write the database themselves,
    so ``on_batch`` only reports."""
    from .resultsdb import database_url

    url = database_url(db) if db is not None else None
    target = str(Path(model).absolute())
    shards = (
        (
            None,
            (
                target,
                checkpoint,
                [(it.path, it.stat, it.fingerprint) for it in todo[i : i + shard_size]],
                str(ex),
                url,
                batch_size,
                top_k,
                rule,
                *device,
            ),
        )
        for i in range(0, len(todo), shard_size)
    )
    run_shards(executor, tag_shard, shards, lambda _, out: on_batch(*out, stored=url is not None))
