"""Extraction engine: track table -> decode (parallel) -> batched backbone -> Parquet shards.

Rows belong to audio content (``embedkit.identity``): each track's file is fingerprinted first
(threads; files whose size, mtime and inode match the store's record are not read), and only
contents the store has not seen are extracted, once each, whatever their names. When nothing
is left to do the backbone is never built.

Work is cut into shards of ``shard_size`` contents (sorted by fingerprint); each shard is written
atomically, so an interrupted run resumes at the first missing shard. On the CPU, ``workers``
lanes (``embedkit.jobs``) each take one track from file to embeddings (decode, windows, its
segments forwarded on their own in chunks of ``batch_size``, torch at one thread), and the main
thread writes each shard as its last track finishes. On an accelerator a pool of threads decodes
two shards ahead while the main thread forwards batches across each shard's tracks. Both are
``embedkit.jobs.run_tracks`` with each shard a group (one write per shard; batches never span
shards). The same ``extract_shard`` function runs a shard anywhere (pass any executor with
``submit``, e.g. a ``dask.distributed.Client`` from ``embedkit.jobs.dask_client``; a worker
thread is one lane; ``jobs.run_shards``); both paths cut the same shards and batches, so they
produce identical rows.

    >>> from embedkit.datasets import load_dataset              # doctest: +SKIP
    >>> res = extract(load_dataset("gtzan_mini"), "melstats")    # doctest: +SKIP
    >>> meta, X = res.store.read()                               # X float32 [600, 218]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .audio import decoding as audio
from .audio.segments import segment
from .backbones import get_spec, identify_weights, load_backbone
from .backbones.base import Backbone
from .config import PreprocessConfig
from .device import default_batch_size, is_accelerator
from .device import provenance as device_provenance
from .device import resolve as resolve_device
from .errors import AudioError, EmbedkitError, StoreError
from .identity import FileStat, identify_many
from .io import atomic_write_text
from .jobs import (
    Decoded,
    Failure,
    JobResult,
    WindowBatcher,
    cached_model,
    concat_outputs,
    run_shards,
    run_tracks,
    torch_single_threaded,
)
from .store import Store

FAILURE_COLUMNS = ("track_id", "path", "label", "reason", "fingerprint")


@dataclass
class ExtractResult(JobResult):
    """What ``extract`` did. The counters every job reports (n_done_before, n_failed_before,
    failures, seconds, device; n_failed, n_available, nothing_done) are ``jobs.JobResult``'s."""

    store: Store
    n_tracks: int  # tracks in the dataset
    # tracks whose audio was already in the store (done or failed earlier) = n_done_before + n_failed_before
    n_skipped: int
    n_extracted: int  # dataset tracks whose embeddings this run produced (tracks sharing one audio count each)
    n_segments: int  # segments written by this run
    notes: list[str] = field(default_factory=list)  # this run's length adjustments (padding...)
    n_shared: int = 0  # dataset tracks whose audio is the same as another track's of the dataset

    @property
    def n_inputs(self) -> int:
        return self.n_tracks

    @property
    def n_done(self) -> int:
        return self.n_extracted


def _shard_key(fingerprints: list[str]) -> str:
    return hashlib.sha256("\n".join(fingerprints).encode()).hexdigest()[:16]


def _decode(
    path: str, sample_rate: int, prep: PreprocessConfig, notes: list[str] | None
) -> tuple[np.ndarray, np.ndarray]:
    y = audio.load(path, sample_rate, prep.audio, min_duration_s=prep.segments.segment_s, notes=notes)
    frames, starts, _ = segment(y, sample_rate, prep.segments)
    if len(frames) == 0:
        raise AudioError(path, f"shorter than one {prep.segments.segment_s:g} s segment after the length policy")
    return frames, starts


def decode_track(path: str, sample_rate: int, prep: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """Canonical decode of one file for one backbone: (segments float32 [K, L] at sample_rate,
    start seconds [K]). Length adjustments are not reported. Raises AudioError naming the file."""
    return _decode(path, sample_rate, prep, [])


def _decode_safe(path: str, sample_rate: int, prep: PreprocessConfig, stat: tuple[int, int, int] | None = None):
    """((frames, starts) | None, failure reason | None, notes); never raises for one bad file.
    stat: (size, mtime_ns, inode) when the file was fingerprinted; a file that no longer has it
    after decoding changed under us, and its audio is not the fingerprinted one."""
    notes: list[str] = []
    try:
        out = _decode(path, sample_rate, prep, notes)
        if stat is not None:
            st = FileStat.of(path)
            # size and mtime only: a Dask worker on another host may see other inode numbers
            if (st.size, st.mtime_ns) != tuple(stat[:2]):
                return None, "file changed while it was being extracted; run extract again", notes
        return out, None, notes
    except AudioError as exc:
        return None, exc.problem, notes
    except MemoryError:
        raise
    except Exception as exc:  # never let one odd file kill a batch job
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return None, f"unexpected decode error: {type(exc).__name__}: {first}", notes


def _forward(backbone: Backbone, outputs: tuple[str, ...], batch: np.ndarray) -> dict[str, np.ndarray]:
    """One forward: {"embedding": [B, D], output: [B, ...]} in float32."""
    out = backbone.outputs(batch) if outputs else {"embedding": backbone.embed(batch)}
    return {k: np.asarray(out[k], dtype=np.float32) for k in ("embedding", *outputs)}


class _Extraction:
    """Extraction as a ``jobs.Job``: items (row in its shard, path, stat); a result or a
    failure is (row, (outputs, start seconds, samples per segment) | None, reason | None,
    notes)."""

    def __init__(self, backbone: Backbone, prep: PreprocessConfig, outputs: tuple[str, ...]):
        self.backbone, self.prep, self.outputs = backbone, prep, outputs

    def decode(self, item):
        i, path, stat = item
        fr, err, notes = _decode_safe(path, self.backbone.spec.sample_rate, self.prep, stat)
        if err is not None:
            return Failure((i, None, err, notes))
        frames, starts = fr
        return Decoded(frames, (i, starts, notes))

    def forward(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return _forward(self.backbone, self.outputs, batch)

    def finish(self, item, decoded: Decoded, out):
        i, starts, notes = decoded.info
        return i, (out, starts, decoded.windows.shape[1]), None, notes

    def single_threaded(self):
        return torch_single_threaded()


def _items(rows: pd.DataFrame) -> list[tuple[int, str, tuple[int, int, int] | None]]:
    return [(i, p, st) for i, (p, st) in enumerate(zip(rows.path, _stats(rows)))]


def _in_row_order(results: list, failures: list) -> list:
    """A shard's results and failures (``_Extraction``) -> [(result | None, reason | None,
    notes)] in row order."""
    return [r[1:] for r in sorted(results + failures, key=lambda r: r[0])]


def _embed_stream(
    backbone: Backbone, frame_iter, batch_size: int, outputs: tuple[str, ...]
) -> dict[str, np.ndarray] | None:
    """The segments of consecutive tracks embedded as extraction batches them on an
    accelerator (``jobs.WindowBatcher``: the consecutive ``batch_size`` chunks of all the
    tracks' segments, whatever the track boundaries). {output: [N, D]} or None when no
    segments."""
    batcher = WindowBatcher(lambda x: _forward(backbone, outputs, x), batch_size)
    parts = [out for frames in frame_iter for _, out in batcher.add(None, frames)]
    parts += [out for _, out in batcher.flush()]
    parts = [p for p in parts if p is not None]
    return concat_outputs(parts) if parts else None


def _build_tables(rows: pd.DataFrame, results: list, backbone: Backbone, outputs: tuple[str, ...]):
    """One shard's per-track results (row order; see ``_in_row_order``) -> (segments table |
    None, failures table | None, failure dicts, notes)."""
    import pyarrow as pa

    sr = backbone.spec.sample_rate
    ok_idx, counts, starts, outs, fails, notes = [], [], [], [], [], []
    seg_len = 0

    def fail(r, reason: str) -> None:
        fails.append(
            {"track_id": r.track_id, "path": r.path, "label": r.label, "reason": reason, "fingerprint": r.fingerprint}
        )

    for i, (res, err, ns) in enumerate(results):
        notes.extend(ns)
        r = rows.iloc[i]
        if err is not None:
            fail(r, err)
            continue
        out, st, seg_len = res
        emb = out["embedding"]
        if emb.shape != (len(st), backbone.spec.embedding_dim):
            raise EmbedkitError(
                f"backbone {backbone.spec.name} returned embeddings of shape {emb.shape}, expected ({len(st)}, {backbone.spec.embedding_dim})"
            )
        # a backbone producing NaN for a track: record it, keep the others
        if not all(np.isfinite(v).all() for v in out.values()):
            fail(r, f"backbone {backbone.spec.name} produced NaN/inf")
            continue
        ok_idx.append(i)
        counts.append(len(st))
        starts.append(st)
        outs.append(out)
    seg_table = None
    if ok_idx:
        sub = rows.iloc[ok_idx]
        seg_idx = np.concatenate([np.arange(c) for c in counts])
        start_s = np.concatenate(starts)

        def rep(col: str):
            # from_pandas: NaN (pandas' missing string) becomes null, like None
            vals = np.repeat(sub[col].to_numpy(dtype=object), counts)
            return pa.array(vals, pa.string(), from_pandas=True)

        cols = {c: rep(c) for c in ("track_id", "path", "label", "split", "group", "fingerprint")}
        cols["segment"] = pa.array(seg_idx.astype(np.int32))
        cols["start_s"] = pa.array(start_s.astype(np.float64))
        # Same end as segments.segment(): round(segment_s * sr) samples after the start.
        cols["end_s"] = pa.array((start_s + seg_len / sr).astype(np.float64))
        for k in ("embedding", *outputs):
            v = np.concatenate([np.asarray(o[k], dtype=np.float32) for o in outs])
            cols[k] = pa.FixedSizeListArray.from_arrays(
                pa.array(np.ascontiguousarray(v).reshape(-1), pa.float32()), v.shape[1]
            )
        seg_table = pa.table(cols)
    fail_table = (
        pa.Table.from_pylist(fails, schema=pa.schema([(c, pa.string()) for c in FAILURE_COLUMNS])) if fails else None
    )
    return seg_table, fail_table, fails, notes


def _write_shard(store: Store, rows: pd.DataFrame, results: list, backbone: Backbone, outputs: tuple[str, ...]):
    """Write one shard's per-track results; (segments written, failure dicts, notes)."""
    seg_table, fail_table, fails, notes = _build_tables(rows, results, backbone, outputs)
    key = _shard_key(list(rows.fingerprint))
    # Failures first: if killed between the two writes, the shard's good tracks are redone,
    # never lost, and the failed ones are not retried needlessly.
    if fail_table is not None:
        store.write_shard("failures", fail_table, key)
    if seg_table is not None:
        store.write_shard("segments", seg_table, key)
    return (seg_table.num_rows if seg_table is not None else 0), fails, notes


def _backbone_on(
    name: str, checkpoint: str | None = None, device: str = "cpu", precision: str = "fp32", allow_tf32: bool = False
) -> Backbone:
    """A backbone loaded by name and placed (``jobs.cached_model``'s loader)."""
    return load_backbone(name, checkpoint=checkpoint).to(resolve_device(device, allow_tf32), precision)


def extract_shard(
    store_root: str,
    rows: pd.DataFrame,
    backbone_name: str,
    checkpoint: str | None,
    prep_dict: dict,
    batch_size: int = 32,
    outputs: tuple[str, ...] = (),
    device: str = "cpu",
    precision: str = "fp32",
    allow_tf32: bool = False,
) -> tuple[int, list[dict]]:
    """Extract and write one shard; self-contained so it can run on any worker process/host
    that sees ``store_root`` (a shared filesystem for a multi-host cluster). ``device`` is a
    name resolved on the worker ("auto": that worker's accelerator, if it has one).

    Returns (segments written, failures)."""
    n, fails, _notes, _dev = _extract_shard(
        store_root, rows, backbone_name, checkpoint, prep_dict, batch_size, outputs, device, precision, allow_tf32
    )
    return n, fails


def _extract_shard(
    store_root,
    rows,
    backbone_name,
    checkpoint,
    prep_dict,
    batch_size,
    outputs,
    device="cpu",
    precision="fp32",
    allow_tf32=False,
):
    prep = PreprocessConfig.from_dict(prep_dict)
    backbone = cached_model(_backbone_on, backbone_name, checkpoint, device, precision, allow_tf32)
    done: list = []
    run_tracks(
        _Extraction(backbone, prep, outputs),
        [_items(rows)],
        lambda results, failures: done.append(_in_row_order(results, failures)),
        accelerator=is_accelerator(backbone.device),
        batch_size=batch_size,
        grouped=True,
        one_thread=True,  # this worker thread is one lane of the cluster
    )
    nseg, fails, notes = _write_shard(Store(Path(store_root)), rows, done[0], backbone, outputs)
    return nseg, fails, notes, device_provenance(backbone.device, backbone.precision, allow_tf32)


def _stats(rows: pd.DataFrame) -> list[tuple[int, int, int] | None]:
    if "size" not in rows:
        return [None] * len(rows)
    return [(int(a), int(b), int(c)) for a, b, c in zip(rows["size"], rows["mtime_ns"], rows["inode"])]


def _check_tracks(tracks: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in ("track_id", "path", "label") if c not in tracks.columns]
    if missing:
        raise EmbedkitError(
            f"track table lacks column(s) {', '.join(missing)}; build it with embedkit.datasets.load_dataset"
        )
    tracks = tracks.copy()
    for col in ("split", "group"):
        if col not in tracks.columns:
            tracks[col] = None
    tracks["track_id"] = tracks["track_id"].astype(str)
    dup = tracks["track_id"][tracks["track_id"].duplicated()]
    if len(dup):
        raise EmbedkitError(f"track table lists track id {dup.iloc[0]} more than once")
    return tracks


def _check_outputs(store: Store, outputs: tuple[str, ...]) -> tuple[str, ...]:
    """Keep every shard of a store with the same columns: refuse outputs the existing shards
    lack (their tracks would be silently incomplete) and keep producing the ones they have."""
    have = store.output_columns()
    if have is None:
        return outputs
    missing = [o for o in ("embedding", *outputs) if o not in have]
    if missing:
        raise StoreError(
            f"{store.root}: existing shards were extracted without output(s) {', '.join(missing)}; "
            "use another --cache (or delete this store) to extract them"
        )
    return tuple(c for c in have if c != "embedding")


def extract(
    tracks: pd.DataFrame,
    backbone: str | Backbone,
    cache: str | os.PathLike = "cache",
    checkpoint: str | None = None,
    prep: PreprocessConfig = PreprocessConfig(),
    workers: int | None = None,
    batch_size: int | None = 32,
    shard_size: int = 16,
    outputs: tuple[str, ...] = (),
    executor: Executor | None = None,
    retry_failed: bool = False,
    progress: Callable[[int, int], None] | None = None,
    device: str | None = None,
    precision: str | None = None,
    allow_tf32: bool = False,
) -> ExtractResult:
    """Extract embeddings of every track whose audio content is not yet in the store.

    tracks: table from ``datasets.load_dataset`` (track_id, path, label[, split][, group]). Each
        file is fingerprinted (``embedkit.identity``); contents already in the store (from any
        dataset, under any name) are skipped, the same content twice is extracted once. The
        table is recorded in the store as its last dataset (what ``fit`` uses without DATA).
    backbone: registry name or a loaded Backbone.
    workers: lanes (CPU) or decode threads (accelerator) of the local pipeline (default: CPU count).
    batch_size: segments per forward pass (on the CPU, of one track: results never depend on
        ``workers`` or on the other tracks). shard_size: tracks per written shard (the unit of
        resumption); batches never span shards.
    executor: run whole shards remotely instead (any object with ``submit`` returning futures,
        e.g. a ``dask.distributed.Client``); workers load the backbone by registry name.
    progress: callback(tracks_done_this_run, tracks_pending), called from this thread; an
        exception it raises (e.g. KeyboardInterrupt) stops the run with every finished shard kept.
    device: "cpu" | "auto" | "cuda[:N]" | "mps" (``embedkit.device.resolve``); None: the CPU, or
        where a given Backbone already is. The store does not depend on it (its key has no device; store.json notes the devices used).
        batch_size None: 32 on the CPU, 8x on an accelerator (``device.default_batch_size``).
    precision: "fp32" | "fp16" | "bf16" (None: fp32, or a given Backbone's): autocast inference (opt-in; embeddings then
        differ from fp32, and the store mixes them if runs change it: use another --cache).
    allow_tf32: let CUDA use TF32 matmuls (faster, ~1e-3 relative difference from the CPU).
    Raises StoreError when another run holds the store, EmbedkitError for bad arguments,
    DeviceError when the device or precision cannot be used here.
    """
    t0 = time.perf_counter()
    from .device import settle

    given = backbone if isinstance(backbone, Backbone) else None
    device_name, precision, batch_size = settle(given, device, allow_tf32, precision, batch_size, executor is not None)
    if (batch_size is not None and batch_size < 1) or shard_size < 1 or (workers is not None and workers < 1):
        raise EmbedkitError(
            f"batch_size, shard_size and workers must be >= 1 (got {batch_size}, {shard_size}, {workers})"
        )
    if prep.audio.clip_s is not None and prep.audio.clip_s < prep.segments.segment_s:
        raise EmbedkitError(
            f"clip length {prep.audio.clip_s:g} s is shorter than one {prep.segments.segment_s:g} s segment"
        )
    tracks = _check_tracks(tracks)
    bb = backbone if isinstance(backbone, Backbone) else None
    spec = bb.spec if bb is not None else get_spec(backbone)  # unknown names fail here, listing valid ones
    unknown = [o for o in outputs if o not in spec.outputs]
    if unknown:
        raise EmbedkitError(
            f"backbone {spec.name} has no output(s) {unknown}; available: {list(spec.outputs) or 'none'}"
        )
    if bb is not None:
        weights_id = bb.weights_id
    else:
        # The store key without building the network (a checkpoint hash), so that a re-run
        # with nothing left to do costs no model load; families that cannot tell are loaded.
        ident = identify_weights(backbone, checkpoint)
        if ident is None:
            bb = (
                load_backbone(backbone, checkpoint=checkpoint)
                if executor is None
                else cached_model(_backbone_on, backbone, checkpoint)
            )
            weights_id, spec = bb.weights_id, bb.spec
        else:
            weights_id, spec = ident
    store = Store.create(cache, spec, weights_id, prep, precision)
    with store.lock():
        store.clean_partial()
        if store.is_legacy():
            store.upgrade()
        if retry_failed:
            store.drop_failures()
        done, failed = store.done_fingerprints()  # first: sets unreadable shards aside
        outputs = _check_outputs(store, tuple(outputs))
        tracks, unreadable = _fingerprint(tracks, store, workers)
        store.record_dataset(tracks, str(tracks.attrs.get("source") or _anonymous_source(tracks)))
        fps = tracks.fingerprint
        todo = (
            tracks[~fps.isin(done | failed)]
            .drop_duplicates("fingerprint")
            .sort_values("fingerprint")
            .reset_index(drop=True)
        )
        result = ExtractResult(store, len(tracks) + len(unreadable), 0, 0, 0, failures=list(unreadable))
        result.n_done_before = int(fps.isin(done).sum())
        result.n_failed_before = int((fps.isin(failed) & ~fps.isin(done)).sum())
        result.n_skipped = result.n_done_before + result.n_failed_before
        result.n_shared = int(fps.duplicated(keep=False).sum())
        shards = [todo.iloc[i : i + shard_size] for i in range(0, len(todo), shard_size)]
        n_done = 0
        new_done: set[str] = set()
        if shards and bb is None and executor is None:
            bb = load_backbone(backbone, checkpoint=checkpoint)
            if bb.weights_id != weights_id:  # the registry's identify() disagrees with the loader
                raise EmbedkitError(
                    f"backbone {spec.name}: weights id {bb.weights_id} of the loaded model differs from {weights_id}"
                )
        if shards and executor is None:
            dev = resolve_device(device_name, allow_tf32)
            bb.to(dev, precision)
            if batch_size is None:
                batch_size = default_batch_size(dev, 32)
            result.device = device_provenance(bb.device, bb.precision, allow_tf32)
            store.record_device(result.device)
        if progress:
            progress(0, len(todo))

        def account(nseg: int, fails: list[dict], notes: list[str], rows: pd.DataFrame):
            nonlocal n_done
            result.n_segments += nseg
            result.failures.extend(fails)
            result.notes.extend(notes)
            new_done.update(set(rows.fingerprint) - {f["fingerprint"] for f in fails})
            n_done += len(rows)
            if progress:
                progress(n_done, len(todo))

        try:
            if executor is not None and shards:
                _run_executor(
                    executor,
                    shards,
                    store,
                    spec.name,
                    checkpoint,
                    prep,
                    batch_size,
                    outputs,
                    account,
                    (device or "cpu", precision, allow_tf32),
                )
            elif shards:
                _run_local(shards, store, bb, prep, batch_size, outputs, workers, account)
        finally:
            result.n_extracted = int(fps.isin(new_done).sum())
        result.seconds = time.perf_counter() - t0
        record_timing(store.root, result.seconds, len(new_done))
    return result


def _anonymous_source(tracks: pd.DataFrame) -> str:
    """A name for a track table built by hand (no ``attrs["source"]``): its paths' hash."""
    return "tracks:" + hashlib.sha256("\n".join(sorted(tracks.path)).encode()).hexdigest()[:16]


def _fingerprint(tracks: pd.DataFrame, store: Store, workers: int | None) -> tuple[pd.DataFrame, list[dict]]:
    """Tracks with fingerprint, size, mtime_ns and inode columns, and a failure dict for each
    file that cannot be read at all (those are not recorded in the store: they have no content,
    and the next run looks at them again)."""
    res = identify_many(list(tracks.path), store.known_fingerprints(), workers, store.scheme)
    ok = [not isinstance(r, AudioError) for r in res]
    bad = [
        {"track_id": t.track_id, "path": t.path, "label": t.label, "reason": r.problem, "fingerprint": None}
        for t, r in zip(tracks.itertuples(), res)
        if isinstance(r, AudioError)
    ]
    good = [r for r in res if not isinstance(r, AudioError)]
    out = tracks[ok].copy()
    out["fingerprint"] = [fp for _, fp in good]
    out["real_path"] = [st.path for st, _ in good]
    out["size"] = [st.size for st, _ in good]
    out["mtime_ns"] = [st.mtime_ns for st, _ in good]
    out["inode"] = [st.inode for st, _ in good]
    out.attrs = dict(tracks.attrs)
    return out.reset_index(drop=True), bad


TIMING_FILE = "extract_timing.json"


def read_timing(store_root: Path) -> dict | None:
    """The store's accumulated {"seconds", "tracks"} of extraction, None if unrecorded or unreadable."""
    f = Path(store_root) / TIMING_FILE
    with contextlib.suppress(json.JSONDecodeError, OSError):
        return json.loads(f.read_text())
    return None


def record_timing(store_root: Path, seconds: float, n_tracks: int) -> dict[str, float]:
    """Accumulate extraction wall time and tracks per store (``extract_timing.json``), so a
    head fitted later, or a cached re-run, still knows what extraction cost per track."""
    t = {"seconds": 0.0, "tracks": 0, **(read_timing(store_root) or {})}
    if n_tracks > 0:
        t = {"seconds": float(t["seconds"]) + seconds, "tracks": int(t["tracks"]) + n_tracks}
        atomic_write_text(Path(store_root) / TIMING_FILE, json.dumps(t))
    return t


def _run_executor(
    executor, shards, store, name, checkpoint, prep, batch_size, outputs, account, device=("cpu", "fp32", False)
) -> None:
    """Every shard on ``executor`` (``jobs.run_shards``: each worker loads the backbone once
    and writes its shards; ``account`` as each finishes)."""
    root = str(store.root.resolve())
    prep_dict = prep.to_dict()
    seen: list[dict] = []

    def done(rows: pd.DataFrame, out) -> None:
        nseg, fails, notes, info = out
        if info not in seen:  # each worker's device, once
            seen.append(info)
            store.record_device(info)
        account(nseg, fails, notes, rows)

    run_shards(
        executor,
        _extract_shard,
        ((rows, (root, rows, name, checkpoint, prep_dict, batch_size, outputs, *device)) for rows in shards),
        done,
    )


def _run_local(shards, store, bb, prep, batch_size, outputs, workers, account) -> None:
    """Every shard here (``jobs.run_tracks``, a shard per group), written in order as its last
    track finishes. On the CPU, ``workers`` lanes each take a track from file to embeddings; on
    an accelerator, decode threads run up to two shards ahead of forwards batched across each
    shard's tracks."""
    n_workers = max(1, workers or os.cpu_count() or 1)
    pending = iter(shards)

    def write(results: list, failures: list) -> None:
        rows = next(pending)
        account(*_write_shard(store, rows, _in_row_order(results, failures), bb, outputs), rows)

    run_tracks(
        _Extraction(bb, prep, outputs),
        [_items(rows) for rows in shards],
        write,
        accelerator=is_accelerator(bb.device),
        workers=n_workers,
        batch_size=batch_size,
        grouped=True,
        ahead=max(2 * n_workers, 2 * max(len(rows) for rows in shards)),
    )
