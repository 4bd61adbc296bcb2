"""Extraction engine: track table -> decode (parallel) -> batched backbone -> Parquet shards.

Work is cut into shards of ``shard_size`` tracks. Each shard is decoded by a pool of workers
while the backbone runs on the previous one in the main thread, and written atomically, so an
interrupted run resumes at the first missing shard. The same ``extract_shard`` function runs a
shard anywhere (a local pool or a distributed engine: pass any executor with ``submit``, e.g. a
``dask.distributed.Client``); the local pipelined path produces identical rows.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from . import audio
from .backbones import get_spec, load_backbone
from .backbones.base import Backbone
from .config import PreprocessConfig
from .errors import AudioError, EmbedkitError
from .segments import segment
from .store import Store


@dataclass
class ExtractResult:
    store: Store
    n_tracks: int  # tracks in the dataset
    n_skipped: int  # already in the store (done or failed earlier)
    n_extracted: int  # extracted by this run
    n_segments: int  # segments written by this run
    failures: list[dict] = field(default_factory=list)  # this run's failures
    seconds: float = 0.0

    @property
    def n_failed(self) -> int:
        return len(self.failures)


def _shard_key(track_ids: list[str]) -> str:
    return hashlib.sha256("\n".join(track_ids).encode()).hexdigest()[:16]


def decode_track(path: str, sample_rate: int, prep: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """Canonical decode of one file for one backbone: (segments [K, L], start seconds [K]).
    Raises AudioError naming the file and the problem."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # padding is recorded by the caller, not printed per file
        y = audio.load(path, sample_rate, prep.audio, min_duration_s=prep.segments.segment_s)
    frames, starts, _ = segment(y, sample_rate, prep.segments)
    if len(frames) == 0:
        raise AudioError(path, f"shorter than one {prep.segments.segment_s:g} s segment")
    return frames, starts


def _decode_safe(path: str, sample_rate: int, prep: PreprocessConfig):
    try:
        return decode_track(path, sample_rate, prep), None
    except AudioError as exc:
        return None, exc.problem
    except Exception as exc:  # never let one odd file kill a batch job
        return None, f"unexpected decode error: {type(exc).__name__}: {exc}"


def _embed_all(backbone: Backbone, frames: np.ndarray, batch_size: int, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
    chunks: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(frames), batch_size):
        batch = frames[i : i + batch_size]
        out = backbone.outputs(batch) if outputs else {"embedding": backbone.embed(batch)}
        for k in ("embedding", *outputs):
            chunks.setdefault(k, []).append(np.asarray(out[k], dtype=np.float32))
    return {k: np.concatenate(v) for k, v in chunks.items()}


def _build_tables(rows: pd.DataFrame, decoded: list, backbone: Backbone, batch_size: int, prep: PreprocessConfig, outputs: tuple[str, ...]):
    """Turn one shard's decoded audio into (segments table | None, failures table | None)."""
    import pyarrow as pa

    ok_idx, frames, starts, fails = [], [], [], []
    for i, (fr, err) in enumerate(decoded):
        r = rows.iloc[i]
        if err is not None:
            fails.append({"track_id": r.track_id, "path": r.path, "label": r.label, "reason": err})
        else:
            ok_idx.append(i)
            frames.append(fr[0])
            starts.append(fr[1])
    seg_table = None
    if frames:
        counts = [len(f) for f in frames]
        allf = np.concatenate(frames)
        out = _embed_all(backbone, allf, batch_size, outputs)
        emb = out["embedding"]
        bad = ~np.isfinite(emb).all(axis=1)
        if bad.any():  # a backbone producing NaN for a track: record it, keep the others
            seg_track = np.repeat(np.arange(len(counts)), counts)
            bad_tracks = set(seg_track[bad].tolist())
            keep_tracks = [j for j in range(len(counts)) if j not in bad_tracks]
            starts = [starts[j] for j in keep_tracks]
            for j in sorted(bad_tracks):
                r = rows.iloc[ok_idx[j]]
                fails.append({"track_id": r.track_id, "path": r.path, "label": r.label, "reason": "backbone produced NaN/inf"})
            mask = np.isin(seg_track, keep_tracks)
            out = {k: v[mask] for k, v in out.items()}
            ok_idx = [ok_idx[j] for j in keep_tracks]
            counts = [counts[j] for j in keep_tracks]
        if ok_idx:
            sub = rows.iloc[ok_idx]
            seg_idx = np.concatenate([np.arange(c) for c in counts])
            start_s = np.concatenate(starts)
            cols = {
                "track_id": pa.array(np.repeat(sub.track_id.to_numpy(), counts).tolist(), pa.string()),
                "path": pa.array(np.repeat(sub.path.to_numpy(), counts).tolist(), pa.string()),
                "label": pa.array(np.repeat(sub.label.to_numpy(), counts).tolist(), pa.string()),
                "split": pa.array(np.repeat(sub.split.to_numpy(), counts).tolist(), pa.string()),
                "group": pa.array(np.repeat(sub.group.to_numpy(), counts).tolist(), pa.string()),
                "segment": pa.array(seg_idx.astype(np.int32)),
                "start_s": pa.array(start_s.astype(np.float64)),
                "end_s": pa.array((start_s + prep.segments.segment_s).astype(np.float64)),
            }
            for k, v in out.items():
                cols[k] = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1), pa.float32()), v.shape[1])
            seg_table = pa.table(cols)
    fail_table = pa.Table.from_pylist(fails, schema=pa.schema([(c, pa.string()) for c in ("track_id", "path", "label", "reason")])) if fails else None
    return seg_table, fail_table, fails


def _write(store: Store, key: str, seg_table, fail_table) -> int:
    # Failures first: if killed between the two writes, the shard's good tracks are redone,
    # never lost, and the failed ones are not retried needlessly.
    if fail_table is not None:
        store.write_shard("failures", fail_table, key)
    if seg_table is not None:
        store.write_shard("segments", seg_table, key)
        return seg_table.num_rows
    return 0


@lru_cache(maxsize=4)
def _cached_backbone(name: str, checkpoint: str | None) -> Backbone:
    return load_backbone(name, checkpoint=checkpoint)


def extract_shard(store_root: str, rows: pd.DataFrame, backbone_name: str, checkpoint: str | None, prep_dict: dict, batch_size: int = 32, outputs: tuple[str, ...] = ()) -> tuple[int, list[dict]]:
    """Extract and write one shard; self-contained so it can run on any worker process/host.

    Returns (segments written, failures)."""
    prep = PreprocessConfig.from_dict(prep_dict)
    backbone = _cached_backbone(backbone_name, checkpoint)
    store = Store(Path(store_root))
    decoded = [_decode_safe(p, backbone.spec.sample_rate, prep) for p in rows.path]
    seg_table, fail_table, fails = _build_tables(rows, decoded, backbone, batch_size, prep, outputs)
    return _write(store, _shard_key(list(rows.track_id)), seg_table, fail_table), fails


def extract(
    tracks: pd.DataFrame,
    backbone: str | Backbone,
    cache: str | os.PathLike = "cache",
    checkpoint: str | None = None,
    prep: PreprocessConfig = PreprocessConfig(),
    workers: int | None = None,
    batch_size: int = 32,
    shard_size: int = 16,
    outputs: tuple[str, ...] = (),
    executor: Executor | None = None,
    retry_failed: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ExtractResult:
    """Extract embeddings of every track not yet in the store.

    tracks: table from ``datasets.load_dataset``. backbone: registry name or a loaded Backbone.
    workers: decode threads for the local pipeline (default: CPU count).
    executor: run whole shards remotely instead (any object with ``submit`` returning futures,
        e.g. a ``dask.distributed.Client``); needs ``backbone`` as a registry name.
    progress: callback(tracks_done_this_run, tracks_pending).
    """
    t0 = time.perf_counter()
    bb = backbone if isinstance(backbone, Backbone) else None
    if bb is None and executor is None:
        bb = load_backbone(backbone, checkpoint=checkpoint)
    spec = bb.spec if bb is not None else get_spec(backbone)
    if bb is not None:
        weights_id = bb.weights_id
    else:
        weights_id = _cached_backbone(backbone, checkpoint).weights_id  # weights hash for the store key
    unknown = [o for o in outputs if o not in spec.outputs]
    if unknown:
        raise EmbedkitError(f"backbone {spec.name} has no output(s) {unknown}; available: {list(spec.outputs) or 'none'}")
    store = Store.create(cache, spec, weights_id, prep)
    store.clean_partial()
    if retry_failed:
        store.drop_failures()
    done, failed = store.done_track_ids()
    todo = tracks[~tracks.track_id.isin(done | failed)].sort_values("track_id").reset_index(drop=True)
    result = ExtractResult(store, len(tracks), len(tracks) - len(todo), 0, 0)
    shards = [todo.iloc[i : i + shard_size] for i in range(0, len(todo), shard_size)]
    n_done = 0
    if progress:
        progress(0, len(todo))

    def account(nseg: int, fails: list[dict], n_rows: int):
        nonlocal n_done
        result.n_segments += nseg
        result.failures.extend(fails)
        result.n_extracted += n_rows - len(fails)
        n_done += n_rows
        if progress:
            progress(n_done, len(todo))

    if executor is not None:
        name = backbone if isinstance(backbone, str) else spec.name
        futures = [
            (executor.submit(extract_shard, str(store.root), rows, name, checkpoint, prep.to_dict(), batch_size, outputs), len(rows))
            for rows in shards
        ]
        for fut, n in futures:
            nseg, fails = fut.result()
            account(nseg, fails, n)
    elif shards:
        n_workers = max(1, workers or os.cpu_count() or 1)
        sr = spec.sample_rate
        with ThreadPoolExecutor(n_workers, thread_name_prefix="embedkit-decode") as pool:
            # Keep two shards in flight: decoding of shard i+1 overlaps the model on shard i.
            pending: deque = deque()
            it = iter(shards)

            def submit_next():
                rows = next(it, None)
                if rows is not None:
                    pending.append((rows, [pool.submit(_decode_safe, p, sr, prep) for p in rows.path]))

            for _ in range(2):
                submit_next()
            while pending:
                rows, futs = pending.popleft()
                submit_next()
                decoded = [f.result() for f in futs]
                seg_table, fail_table, fails = _build_tables(rows, decoded, bb, batch_size, prep, outputs)
                nseg = _write(store, _shard_key(list(rows.track_id)), seg_table, fail_table)
                account(nseg, fails, len(rows))
    result.seconds = time.perf_counter() - t0
    return result
