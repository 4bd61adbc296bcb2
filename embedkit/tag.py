"""Tag a music library with a trained model: ``embedkit tag MODEL INPUT...``.

    inputs (files, folders, path lists, stdin), a chunk of PLAN_CHUNK at a time -> content
    fingerprints -> skip what the results database already holds for this model -> lanes
    (embedkit.lanes, one per core): decode only the excerpt (seeking) -> windows
    (embedkit.segments) -> the track's forwards (Tagger.predict_segments) -> per track: top
    genre, top-k, all probabilities (+ window shares with ``full``) -> database upserts / CSV /
    JSONL / terminal table (on an accelerator: forwards batched across files instead)

Which audio is listened to (``--excerpt``), with clip = the run's clip length (``audio.clip_s``,
30 s by default) and windows cut by the run's segment config:

- ``first``: [0, clip): what an ingest backend usually feeds; for a 30 s file exactly the
  windows training and ``embedkit predict`` saw.
- ``middle``: the clip centred in the song.
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

import contextlib
import csv
import io
import json
import os
import sys
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .device import BackOff
from .errors import AudioError, EmbedkitError

LIST_SUFFIXES = (".txt", ".csv", ".tsv", ".lst", ".m3u", ".m3u8")
#: native seconds decoded beyond each excerpt edge for the resampler (as audio.load does)
MARGIN_S = 0.25
OUTPUT_SUFFIXES = (".csv", ".jsonl")
#: input paths fingerprinted and planned at a time (bounds a run's memory)
PLAN_CHUNK = 1024


# ---------------------------------------------------------------------------------------------
# Excerpts


@dataclass(frozen=True)
class Excerpt:
    """Which part of a song is listened to: mode "first", "middle", "spread" (n clips) or "full"."""

    mode: str = "first"
    n: int = 1

    @classmethod
    def parse(cls, text: str) -> "Excerpt":
        s = str(text).strip().lower()
        if s in ("first", "middle", "full"):
            return cls(s)
        if s.startswith("spread:"):
            n = s[7:]
            if n.isdigit() and int(n) >= 1:
                return cls("spread", int(n))
        raise EmbedkitError(f"--excerpt must be first, middle, spread:N (N >= 1) or full; got {text!r}")

    def __str__(self) -> str:
        return f"spread:{self.n}" if self.mode == "spread" else self.mode

    def clip_starts(self, duration_s: float, clip_s: float | None) -> list[float] | None:
        """Start times (s) of the clips listened to in a song of ``duration_s``; None: the
        whole song (``full``, or a run without a clip length)."""
        if self.mode == "full" or clip_s is None:
            return None
        room = max(0.0, duration_s - clip_s)
        if self.mode == "first" or room == 0:
            return [0.0]
        if self.mode == "middle":
            return [room / 2]
        return [float(s) for s in np.linspace(0.0, room, self.n)] if self.n > 1 else [0.0]


def read_excerpt(
    path: str, sample_rate: int, excerpt: Excerpt, clip_s: float | None, window_s: float, hop_s: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Decode only what ``excerpt`` listens to and cut it into windows.

    Returns (windows float32 [K, L] at ``sample_rate``, start_s [K] in song time, duration_s
    of the song (the decoded length when the whole file was decoded; else the header's)).
    Raises AudioError naming the file (unreadable, silent, shorter than one window...).
    """
    from . import audio
    from .audio import SILENCE_PEAK
    from .config import SegmentConfig
    from .segments import segment

    seg = SegmentConfig(window_s, hop_s)
    if excerpt.mode == "full" or clip_s is None:
        y, sr = audio.decode(path)
        regions = [(0.0, audio.resample(y, sr, sample_rate))]
        duration = len(y) / sr
    elif excerpt.mode == "first":
        y, sr = audio.decode(path, max_seconds=clip_s + MARGIN_S)
        kept = audio.resample(y, sr, sample_rate)[: int(round(clip_s * sample_rate))]
        # a file that ended inside the read is that long; a longer one: its header says (cheap)
        duration = (
            len(y) / sr if len(y) < int(np.ceil((clip_s + MARGIN_S) * sr)) else float(audio.probe(path)["duration_s"])
        )
        regions = [(0.0, kept)]
    else:
        duration = float(audio.probe(path)["duration_s"])
        regions = []
        for start in excerpt.clip_starts(duration, clip_s):
            left = min(start, MARGIN_S)
            y, sr = audio.decode(path, max_seconds=left + clip_s + MARGIN_S, start_s=start - left)
            r = audio.resample(y, sr, sample_rate)
            off = int(round(left * sample_rate))
            regions.append((start, r[off : off + int(round(clip_s * sample_rate))]))
    frames, starts = [], []
    for start, y in regions:
        f, s, _ = segment(y, sample_rate, seg)
        frames.append(f)
        starts.append(start + s)
    windows = np.concatenate(frames) if frames else np.zeros((0, int(round(window_s * sample_rate))), np.float32)
    if len(windows) == 0:
        raise AudioError(path, f"too short: {duration:.2f} s is less than one {window_s:g} s window")
    if float(np.max(np.abs(windows))) < SILENCE_PEAK:
        raise AudioError(path, "silent (every sample listened to is zero)")
    return windows, np.concatenate(starts), duration


# ---------------------------------------------------------------------------------------------
# Inputs


def expand_inputs(inputs: Iterable[str | os.PathLike], stdin=None) -> list[str]:
    """Audio paths from files, folders (recursive, audio extensions), path lists (.txt, .m3u,
    .csv with a ``path`` column or paths in the first column; relative entries are relative to
    the list) and ``-`` (one path per line on stdin). Order kept, duplicates dropped. A path
    that does not exist is kept: it becomes a recorded failure, not an abort."""
    from .audio import AUDIO_EXTENSIONS

    out: dict[str, None] = {}

    def add(p: Path) -> None:
        out.setdefault(str(p.absolute()), None)

    for item in inputs:
        s = str(item)
        if s == "-":
            for line in stdin or sys.stdin:
                if line.strip():
                    add(Path(line.strip()).expanduser())
            continue
        p = Path(s).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix.lower() in AUDIO_EXTENSIONS and q.is_file())
            for q in found:
                add(q)
        elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
            for q in _read_list(p):
                add(q)
        else:
            add(p)
    return list(out)


def _read_list(p: Path) -> list[Path]:
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise EmbedkitError(f"{p}: cannot read the path list ({exc})") from None
    entries: list[str] = []
    if p.suffix.lower() in (".csv", ".tsv"):
        rows = list(csv.reader(io.StringIO(text), delimiter="\t" if p.suffix.lower() == ".tsv" else ","))
        if rows:
            header = [h.strip().lower() for h in rows[0]]
            col = header.index("path") if "path" in header else 0
            body = rows[1:] if "path" in header else rows
            entries = [r[col].strip() for r in body if len(r) > col and r[col].strip()]
    else:
        entries = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return [q if q.is_absolute() else p.parent / q for q in (Path(e).expanduser() for e in entries)]


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class TagResult:
    model_id: str
    n_inputs: int = 0
    n_tagged: int = 0  # by this run
    n_done_before: int = 0  # already in the database for this model and excerpt
    n_failed_before: int = 0  # recorded as failed earlier (skipped without retry_failed)
    failures: list[dict[str, str]] = field(default_factory=list)  # this run's: path, reason
    rows: list[dict[str, Any]] = field(default_factory=list)  # up to ``keep_rows`` result rows (terminal table)
    seconds: float = 0.0
    model_loaded: bool = False
    windows: int = 0
    labels: list[str] = field(default_factory=list)
    device: dict[str, Any] = field(default_factory=dict)  # embedkit.device.provenance of the run (local path)

    @property
    def n_failed(self) -> int:
        return len(self.failures)


def _track_row(tagger, item: "_Item", p_windows: np.ndarray, excerpt: Excerpt, top_k: int) -> dict[str, Any]:
    from . import __version__

    p = tagger.track_probabilities(p_windows)
    labels = tagger.labels
    order = np.argsort(-p, kind="stable")
    top = int(order[0])
    share = None
    if excerpt.mode == "full":
        counts = np.bincount(p_windows.argmax(axis=1), minlength=len(labels))
        share = {l: float(counts[i] / len(p_windows)) for i, l in enumerate(labels)}
    decide = getattr(tagger.calibration, "decide", None)  # embedkit.calibration: top label or "uncertain"
    return {
        "fingerprint": item.fingerprint,
        "model_id": tagger.model_id,
        "path": item.path,
        "size": item.stat.size,
        "mtime": item.stat.mtime_ns / 1e9,
        "mtime_ns": item.stat.mtime_ns,
        "inode": item.stat.inode,
        "duration_s": float(item.duration_s),
        "excerpt": str(excerpt),
        "n_windows": int(len(p_windows)),
        "top_label": labels[top],
        "top_p": float(p[top]),
        "decision": str(decide(p)) if decide else labels[top],
        "topk": [[labels[i], float(p[i])] for i in order[:top_k]],
        "probabilities": {l: float(p[i]) for i, l in enumerate(labels)},
        "window_share": share,
        "model_kind": tagger.kind,
        "run_id": tagger.meta.get("run_id"),
        "embedkit_version": __version__,
        "window_starts_s": [float(s) for s in item.starts],
    }


class _Writer:
    """Streams result rows to a CSV or JSONL file under a temporary name; ``commit`` renames it
    into place (atomic: readers see the previous file or the complete new one)."""

    def __init__(self, path: str | os.PathLike, labels: list[str]):
        from .io import tmp_name

        self.path = Path(path)
        self.kind = self.path.suffix.lower()
        if self.kind not in OUTPUT_SUFFIXES:
            raise EmbedkitError(f"--out {self.path}: use a .csv or .jsonl file name")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp_name(self.path)
        self.fh = open(self.tmp, "w", encoding="utf-8", newline="")
        self.labels = labels
        if self.kind == ".csv":
            self.csv = csv.writer(self.fh)
            self.csv.writerow(
                [
                    "path",
                    "fingerprint",
                    "model_id",
                    "excerpt",
                    "n_windows",
                    "top_label",
                    "top_p",
                    "decision",
                    "topk",
                    *[f"p_{l}" for l in labels],
                    *[f"share_{l}" for l in labels],
                ]
            )

    def write(self, row: dict[str, Any], path: str | None = None) -> None:
        path = path or row["path"]
        if self.kind == ".jsonl":
            keep = {
                k: row.get(k)
                for k in (
                    "path",
                    "fingerprint",
                    "model_id",
                    "excerpt",
                    "duration_s",
                    "n_windows",
                    "top_label",
                    "top_p",
                    "decision",
                    "topk",
                    "probabilities",
                    "window_share",
                    "window_starts_s",
                )
            }
            self.fh.write(json.dumps({**keep, "path": path}) + "\n")
            return
        share = row.get("window_share") or {}
        topk = ";".join(f"{l}:{p:.4f}" for l, p in row["topk"])
        self.csv.writerow(
            [
                path,
                row["fingerprint"],
                row["model_id"],
                row["excerpt"],
                row["n_windows"],
                row["top_label"],
                f"{row['top_p']:.6f}",
                row["decision"],
                topk,
                *[f"{row['probabilities'][l]:.6f}" for l in self.labels],
                *[f"{share[l]:.6f}" if l in share else "" for l in self.labels],
            ]
        )

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


def _plan(
    paths: list[str], model_id: str, excerpt: Excerpt, db, retry_failed: bool, workers: int, seen: set[str]
) -> tuple[list[_Item], list[dict], dict[str, list[str]], list[dict], int]:
    """Fingerprint a chunk of the inputs (re-using the database's record for unchanged files)
    and split it into (to tag, already done rows, duplicates {fingerprint: [other paths]},
    failures, n skipped as failed before). ``seen``: fingerprints met in earlier chunks of the
    same run (updated); their paths are duplicates of a track already handled."""
    from .identity import SCHEME, FileStat, identify

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
    failed = db.failed(model_id, paths=paths) if db is not None and not retry_failed else {}
    todo: list[_Item] = []
    done_rows: list[dict] = []
    dups: dict[str, list[str]] = {}
    failures: list[dict] = []
    n_failed_before = 0
    earlier = set(fps) & seen  # contents handled in an earlier chunk of this run
    for path, st, fp, problem in idents:
        if problem is not None:
            failures.append({"path": path, "fingerprint": None, "reason": problem})
            continue
        if fp in earlier and fp in done:  # its row was written by this run: a copy of it
            done_rows.append({**done[fp], "path": path, "_duplicate": True})
            continue
        if fp in seen and fp not in earlier:
            dups.setdefault(fp, []).append(path)
            continue
        seen.add(fp)
        if fp in done:
            done_rows.append({**done[fp], "path": path})
        elif path in failed and failed[path].get("fingerprint") == fp:
            n_failed_before += 1
        else:
            todo.append(_Item(path, st, fp))
    return todo, done_rows, dups, failures, n_failed_before


def tag(
    model: str | os.PathLike,
    inputs: Iterable[str | os.PathLike],
    *,
    excerpt: str | Excerpt = "first",
    db: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    top_k: int = 3,
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
    excerpt. out: also write the rows of every input track (new and already tagged) to a .csv or
    .jsonl file. workers: lanes on the CPU (embedkit.lanes), decode threads on an accelerator
    (default: CPU count). batch_size: windows per forward (on the CPU, of one track).
    executor: run shards of ``shard_size`` files elsewhere (a dask Client; each worker loads
    the model once and writes to ``db``, which it must be able to reach). tagger: an already
    loaded Tagger for ``model`` (saves the load). progress(done, total) is called from this
    thread as tracks finish. Bad files are recorded (``failures``, and in the database), never
    raised; EmbedkitError is raised for an unusable model, database or argument.
    device / precision / allow_tf32: where the network runs (``embedkit.device``; Dask workers
    resolve the name themselves). None: the CPU, or where a given ``tagger`` already is.
    batch_size None: 32 windows on the CPU, 8x on an accelerator (``device.default_batch_size``).
    """
    from .device import default_batch_size, resolve, settle

    device_name, precision, batch_size = settle(tagger, device, allow_tf32, precision, batch_size, executor is not None)
    from .tagdb import ResultsDB
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
    paths = expand_inputs(inputs, stdin)
    if not paths:
        raise EmbedkitError("no audio files found in the inputs")
    model_id = tagger.model_id if tagger is not None else model_id_of(model)
    database = ResultsDB(db) if db is not None else None
    res = TagResult(model_id, n_inputs=len(paths))
    writer = None
    finished = 0
    total = len(paths)  # progress counts input paths (a duplicate finishes with its first copy)
    seen: set[str] = set()
    ready = False  # the model is loaded / placed (on the first chunk with work)

    def emit(row: dict[str, Any], dups: dict[str, list[str]]) -> None:
        nonlocal finished, writer
        if not res.labels:
            res.labels = list(row["probabilities"])
        if writer is None and writer_path is not None:
            writer = _Writer(writer_path, res.labels)
        same = [row["path"], *dups.get(row["fingerprint"], [])]
        for p in same:
            if writer is not None:
                writer.write(row, p)
            if len(res.rows) < keep_rows:
                res.rows.append({**row, "path": p})
        finished += len(same)

    try:
        # The inputs are planned and tagged a chunk at a time: memory does not grow with the
        # number of tracks (or with the database), only the paths and fingerprints are kept.
        for at in range(0, len(paths), PLAN_CHUNK):
            todo, done_rows, dups, failures, n_failed_before = _plan(
                paths[at : at + PLAN_CHUNK], model_id, ex, database, retry_failed, workers, seen
            )
            res.n_failed_before += n_failed_before
            finished += n_failed_before
            res.n_done_before += sum(not r.pop("_duplicate", False) for r in done_rows)
            if failures:
                res.failures.extend({"path": f["path"], "reason": f["reason"]} for f in failures)
                if database is not None:
                    database.write([], [{**f, "model_id": model_id} for f in failures])
                finished += len(failures)
            for row in done_rows:
                emit(row, dups)
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
                    from .device import provenance

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

            def on_batch(rows: list[dict], fails: list[dict], stored: bool = False, dups=dups) -> None:
                nonlocal finished
                if database is not None and not stored:
                    database.write([_db_row(r) for r in rows], [{**f, "model_id": model_id} for f in fails])
                for r in rows:
                    emit(r, dups)
                    res.n_tagged += 1
                    res.windows += r["n_windows"]
                for f in fails:
                    res.failures.append({"path": f["path"], "reason": f["reason"]})
                    finished += 1
                if progress:
                    progress(finished, total)

            if todo and executor is None:
                _run_local(tagger, todo, ex, workers, batch_size, top_k, on_batch)
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


def _db_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "window_starts_s"}


def _decode_item(item: _Item, sr: int, ex: Excerpt, clip_s, window_s: float, hop_s: float) -> tuple[_Item, str | None]:
    from .identity import FileStat

    try:
        if FileStat.of(item.path) != item.stat:  # edited or replaced since it was fingerprinted
            raise AudioError(item.path, "changed while being tagged; run again to tag the new content")
        item.windows, item.starts, item.duration_s = read_excerpt(item.path, sr, ex, clip_s, window_s, hop_s)
        return item, None
    except AudioError as exc:
        return item, exc.problem


def _run_local(tagger, todo: list[_Item], ex: Excerpt, workers: int, batch_size: int, top_k: int, on_batch) -> None:
    """Tag ``todo`` here, handing finished tracks to ``on_batch`` in ``todo`` order, a
    transaction's worth (``batch_size`` windows) at a time. On the CPU: ``workers`` lanes
    (embedkit.lanes), each taking a track from file to row; on an accelerator: decode threads
    feeding forwards batched across files (``_run_batched``)."""
    from .device import is_accelerator

    if tagger.torch_backed and is_accelerator(tagger.device):
        return _run_batched(tagger, todo, ex, workers, batch_size, top_k, on_batch)
    from .lanes import ordered_map

    sr, seg, clip_s = tagger.sample_rate, tagger.segment, tagger.audio.clip_s

    def one(item: _Item) -> tuple[dict | None, dict | None]:
        item, problem = _decode_item(item, sr, ex, clip_s, seg.segment_s, seg.hop_s)
        if problem is not None:
            return None, {"path": item.path, "fingerprint": item.fingerprint, "reason": problem}
        w = item.windows
        p = np.concatenate([tagger.predict_segments(w[i : i + batch_size]) for i in range(0, len(w), batch_size)])
        row = _track_row(tagger, item, p, ex, top_k)
        item.windows = item.starts = None  # memory stays flat: nothing of a finished track is kept
        return row, None

    rows: list[dict] = []
    fails: list[dict] = []
    n_windows = 0
    lanes = min(workers, len(todo))
    # one track (a single file, the last of a library): one lane with the network's own threads
    with tagger.single_threaded() if lanes > 1 else contextlib.nullcontext():
        for row, fail in ordered_map(one, todo, lanes):
            if fail is not None:
                fails.append(fail)
            else:
                rows.append(row)
                n_windows += row["n_windows"]
            if n_windows >= batch_size or len(fails) >= batch_size:
                on_batch(rows, fails)
                rows, fails, n_windows = [], [], 0
    if rows or fails:
        on_batch(rows, fails)


def _run_batched(tagger, todo: list[_Item], ex: Excerpt, workers: int, batch_size: int, top_k: int, on_batch) -> None:
    """Decode threads run ahead (bounded), this thread batches windows across files into
    forwards of ``batch_size`` windows on the accelerator and hands finished tracks to
    ``on_batch``."""
    from .lanes import ordered_map

    sr, seg, clip_s = tagger.sample_rate, tagger.segment, tagger.audio.clip_s
    # Decoded tracks kept ready: enough for two forwards while the decoders work on, bounded
    # in windows (a ``full`` excerpt of a long song is hundreds of windows, so only 2 / thread).
    per_track = (
        None
        if ex.mode == "full" or clip_s is None
        else (ex.n if ex.mode == "spread" else 1) * max(1, int(clip_s // seg.hop_s))
    )
    ahead = max(2 * workers, 4, -(-2 * batch_size // per_track) if per_track else 0)
    pending: list[_Item] = []
    n_pending = 0
    fails: list[dict] = []
    backoff = BackOff(log=_log_backoff)

    def flush() -> None:
        nonlocal pending, n_pending, fails
        rows = []
        if pending:
            x = np.concatenate([it.windows for it in pending])
            # forwards of batch_size windows; an accelerator out of memory halves them (logged)
            p = np.concatenate(
                [
                    q
                    for i in range(0, len(x), batch_size)
                    for q in backoff(tagger.predict_segments, x[i : i + batch_size])
                ]
            )
            at = 0
            for it in pending:
                k = len(it.windows)
                rows.append(_track_row(tagger, it, p[at : at + k], ex, top_k))
                at += k
                it.windows = it.starts = None  # memory stays flat: nothing of a finished track is kept
        on_batch(rows, fails)
        pending, n_pending, fails = [], 0, []

    def decode(item: _Item) -> tuple[_Item, str | None]:
        return _decode_item(item, sr, ex, clip_s, seg.segment_s, seg.hop_s)

    for item, problem in ordered_map(decode, todo, workers, ahead):
        if problem is not None:
            fails.append({"path": item.path, "fingerprint": item.fingerprint, "reason": problem})
        else:
            pending.append(item)
            n_pending += len(item.windows)
        if n_pending >= batch_size or len(fails) >= batch_size:
            flush()
    if pending or fails:
        flush()


def _log_backoff(msg: str) -> None:
    import warnings

    warnings.warn(msg, stacklevel=2)


_TAGGERS: dict[tuple, Any] = {}


def tag_shard(
    model: str,
    checkpoint: str | None,
    items: list[tuple[str, Any, str]],
    excerpt: str,
    db: str | None,
    batch_size: int,
    top_k: int,
    device: str = "cpu",
    precision: str = "fp32",
    allow_tf32: bool = False,
) -> tuple[list[dict], list[dict]]:
    """Tag one shard (runs on a Dask worker: the model is loaded once per worker process, on
    ``device`` as resolved on that worker). items: (path, FileStat, fingerprint). Writes to
    ``db`` when given; returns (rows, failures)."""
    from .tagger import load_tagger

    key = (str(model), checkpoint, device, precision, allow_tf32)
    if key not in _TAGGERS:
        _TAGGERS[key] = load_tagger(
            model, checkpoint=checkpoint, device=device, precision=precision, allow_tf32=allow_tf32
        )
    tagger = _TAGGERS[key]
    rows_out, fails_out = [], []
    database = None
    if db is not None:
        from .tagdb import ResultsDB

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
            database.write([_db_row(r) for r in rows], [{**f, "model_id": tagger.model_id} for f in fails])
        rows_out.extend(rows)
        fails_out.extend(fails)

    try:
        _run_local(
            tagger, [_Item(p, st, fp) for p, st, fp in items], Excerpt.parse(excerpt), 1, batch_size, top_k, on_batch
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
    shard_size: int,
    on_batch,
    device=("cpu", "fp32", False),
) -> None:
    """Shards on ``executor`` (a dask Client or any concurrent.futures Executor); the workers
    write the database themselves, so ``on_batch`` only reports."""
    from .tagdb import database_url

    url = database_url(db) if db is not None else None
    kw = {"pure": False} if _is_dask(executor) else {}
    target = str(Path(model).absolute())
    futures = [
        executor.submit(
            tag_shard,
            target,
            checkpoint,
            [(it.path, it.stat, it.fingerprint) for it in todo[i : i + shard_size]],
            str(ex),
            url,
            batch_size,
            top_k,
            *device,
            **kw,
        )
        for i in range(0, len(todo), shard_size)
    ]
    for fut in _as_completed(executor, futures):
        rows, fails = fut.result()
        on_batch(rows, fails, stored=url is not None)


def _is_dask(executor) -> bool:
    return type(executor).__module__.startswith("distributed")


def _as_completed(executor, futures) -> Iterator:
    if _is_dask(executor):
        from distributed import as_completed

        return iter(as_completed(futures))
    from concurrent.futures import as_completed

    return as_completed(futures)
