"""Parquet embedding store.

Layout (one store per backbone + weights + preprocessing config)::

    <cache>/<backbone>/<weights_id>-<hash of preprocessing + backbone front end>/
        store.json                 spec, weights id, preprocessing, versions
        store.lock                 held by the extract run writing the store (OS-released)
        segments/part-<key>.parquet one row per segment (written atomically)
        failures/part-<key>.parquet one row per file that could not be used, with the reason
        decoder.log                native decoder messages of CLI runs (when there were any)

Each shard is written to a temporary name and renamed into place, so a killed run leaves either
a complete shard or none; resuming skips every track already present in a shard (a shard that
cannot be read is renamed ``*.corrupt`` and its tracks are redone). The shard
files are a plain Parquet dataset: ``pd.read_parquet(dir/'segments')``,
``pyarrow.dataset.dataset(...)`` and DuckDB's ``read_parquet('.../segments/*.parquet')`` read it.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backbones.base import BackboneSpec
from .config import PreprocessConfig, stable_hash
from .errors import StoreError
from .io import atomic_write_text, tmp_name, versions

META_KEY = b"embedkit"
SEGMENT_COLUMNS = ["track_id", "path", "label", "split", "group", "segment", "start_s", "end_s"]


def _canonical(obj):
    # 30 and 30.0 are the same clip length; without this a library call with ints and the CLI
    # (floats) would hash to two different stores.
    if isinstance(obj, dict):
        return {k: _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, int) and not isinstance(obj, bool):
        return float(obj)
    return obj


def store_key(weights_id: str, prep: PreprocessConfig, spec: BackboneSpec | None = None) -> str:
    """Directory name of the store for these weights, this preprocessing and (when given) the
    backbone's input contract: rate, size and front-end parameters change the embedding as
    surely as the weights do (melstats has no weights at all)."""
    payload = _canonical(prep.to_dict())
    if spec is not None:
        payload = {"preprocess": payload, "backbone": _canonical(_contract(spec))}
    return f"{weights_id}-{stable_hash(payload)}"


def _contract(spec: BackboneSpec) -> dict[str, Any]:
    return {"sample_rate": spec.sample_rate, "embedding_dim": spec.embedding_dim, "frontend": spec.frontend}


@dataclass
class Store:
    """Handle on one store directory."""

    root: Path

    @property
    def segments_dir(self) -> Path:
        return self.root / "segments"

    @property
    def failures_dir(self) -> Path:
        return self.root / "failures"

    @property
    def meta_path(self) -> Path:
        return self.root / "store.json"

    @property
    def lock_path(self) -> Path:
        return self.root / "store.lock"

    @contextlib.contextmanager
    def lock(self):
        """Exclusive writer lock: a second extract run on the same store fails at once with a
        clear message instead of interleaving shards with the first. The OS drops the lock when
        its holder dies, so a killed run never leaves a stale lock."""
        from filelock import FileLock, Timeout

        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.lock_path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise StoreError(f"{self.root}: another embedkit run is writing this store; wait for it to finish") from None
        try:
            yield self
        finally:
            lock.release()

    # -- metadata -------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        if not self.meta_path.exists():
            raise StoreError(f"{self.root}: not an embedkit store (no store.json)")
        return json.loads(self.meta_path.read_text())

    @property
    def spec(self) -> dict[str, Any]:
        return self.meta()["backbone"]

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.meta()["preprocess"])

    @classmethod
    def create(cls, cache: str | os.PathLike, spec: BackboneSpec, weights_id: str, prep: PreprocessConfig) -> "Store":
        root = Path(cache) / spec.name / store_key(weights_id, prep, spec)
        store = cls(root)
        meta = {
            "backbone": spec.to_dict(),
            "weights_id": weights_id,
            "preprocess": prep.to_dict(),
            "versions": versions(),
        }
        if store.meta_path.exists():
            from .runs import check_match

            old = store.meta()
            key = lambda m, b: {"name": b.get("name"), "weights_id": m["weights_id"], "preprocess": m["preprocess"], **{k: b.get(k) for k in _contract(spec)}}  # noqa: E731
            check_match(root, "store was built with another backbone/weights/preprocessing", key(old, old["backbone"]), key(meta, meta["backbone"]))
        else:
            store.segments_dir.mkdir(parents=True, exist_ok=True)
            store.failures_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(store.meta_path, json.dumps(meta, indent=2, sort_keys=True))
        store.segments_dir.mkdir(parents=True, exist_ok=True)
        store.failures_dir.mkdir(parents=True, exist_ok=True)
        return store

    def schema_metadata(self) -> dict[bytes, bytes]:
        return {META_KEY: json.dumps(self.meta(), sort_keys=True).encode()}

    # -- shards ---------------------------------------------------------------------------
    def shard_files(self, kind: str = "segments") -> list[Path]:
        d = self.segments_dir if kind == "segments" else self.failures_dir
        return sorted(d.glob("part-*.parquet")) if d.exists() else []

    def clean_partial(self) -> int:
        """Remove temporary files left by a killed run; returns how many. Call it only while
        holding ``lock()``: another writer's temporaries look the same."""
        n = 0
        for d in (self.segments_dir, self.failures_dir):
            for tmp in d.glob("*.tmp*"):
                tmp.unlink(missing_ok=True)
                n += 1
        return n

    def _read_ids(self, f: Path) -> list[str]:
        import pyarrow.parquet as pq

        try:
            return pq.read_table(f, columns=["track_id"]).column(0).to_pylist()
        except Exception as exc:
            # Shards are renamed into place complete, so this is damage from outside (disk
            # error, hand editing). Move it aside so its tracks are extracted again.
            bad = f.with_name(f.name + ".corrupt")
            os.replace(f, bad)
            import warnings

            from .errors import EmbedkitWarning

            warnings.warn(f"{f}: unreadable shard ({type(exc).__name__}) moved to {bad.name}; its tracks will be redone", EmbedkitWarning, stacklevel=3)
            return []

    def done_track_ids(self) -> tuple[set[str], set[str]]:
        """(extracted track ids, failed track ids) from the shards on disk."""
        done: set[str] = set()
        failed: set[str] = set()
        for f in self.shard_files("segments"):
            done.update(self._read_ids(f))
        for f in self.shard_files("failures"):
            failed.update(self._read_ids(f))
        return done, failed

    def output_columns(self) -> list[str] | None:
        """Embedding-like columns (fixed-size lists) the existing shards hold, None if empty."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        files = self.shard_files("segments")
        if not files:
            return None
        schema = pq.read_schema(files[0])
        return [f.name for f in schema if pa.types.is_fixed_size_list(f.type)]

    def write_shard(self, kind: str, table, key: str) -> Path:
        import pyarrow.parquet as pq

        d = self.segments_dir if kind == "segments" else self.failures_dir
        final = d / f"part-{key}.parquet"
        tmp = tmp_name(final)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **self.schema_metadata()})
        try:
            pq.write_table(table, tmp, compression="zstd")
            with open(tmp, "rb+") as fh:  # data on disk before the rename makes it visible
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return final

    def drop_failures(self) -> int:
        files = self.shard_files("failures")
        for f in files:
            f.unlink()
        return len(files)

    # -- reading --------------------------------------------------------------------------
    def read_table(self, columns: list[str] | None = None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        files = self.shard_files("segments")
        if not files:
            raise StoreError(f"{self.root}: store holds no extracted segments")
        try:
            table = pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
            msg = str(exc).strip().splitlines()[0]
            raise StoreError(f"{self.root}: cannot read the segment shards ({msg})") from None
        sort = [(c, "ascending") for c in ("track_id", "segment") if columns is None or c in columns]
        return table.sort_by(sort) if sort else table

    def read(self, output: str = "embedding"):
        """(segment metadata DataFrame sorted by track/segment, float32 matrix [N, D])."""
        table = self.read_table()
        if output not in table.column_names:
            raise StoreError(f"{self.root}: store has no {output!r} column (has {', '.join(table.column_names)})")
        col = table.column(output).combine_chunks()
        dim = col.type.list_size
        # flatten() honours a sliced array's offset; .values would not.
        X = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
        meta = table.select([c for c in SEGMENT_COLUMNS if c in table.column_names]).to_pandas()
        return meta, np.ascontiguousarray(X, dtype=np.float32)

    def failures(self):
        import pandas as pd
        import pyarrow.parquet as pq

        files = self.shard_files("failures")
        if not files:
            return pd.DataFrame(columns=["track_id", "path", "label", "reason"])
        return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)


def find_store(cache: str | os.PathLike, backbone: str, prep: PreprocessConfig | None = None) -> Store:
    """Locate the store of ``backbone`` under ``cache``: the one matching ``prep`` if given,
    else the only one. Raises StoreError with what exists and how to fix it."""
    base = Path(cache) / backbone
    candidates = sorted(p for p in base.glob("*/store.json")) if base.exists() else []
    if not candidates:
        raise StoreError(f"no embedding store for backbone {backbone!r} under {cache}: run `embedkit extract DATA --backbone {backbone}` first")
    stores = [Store(p.parent) for p in candidates]
    if prep is not None:
        match = [s for s in stores if s.meta()["preprocess"] == prep.to_dict()]
        if match:
            return max(match, key=lambda s: s.meta_path.stat().st_mtime)
        raise StoreError(f"no store for {backbone!r} under {cache} matches the requested preprocessing")
    if len(stores) > 1:
        listing = ", ".join(str(s.root) for s in stores)
        raise StoreError(f"several stores for {backbone!r} ({listing}); pass --store DIR to choose")
    return stores[0]

