"""Parquet embedding store.

Layout (one store per backbone + weights + preprocessing config)::

    <cache>/<backbone>/<weights_id>-<hash of preprocessing + backbone front end>/
        store.json                 spec, weights id, preprocessing, versions, layout
        store.lock                 held by the extract run writing the store (OS-released)
        segments/part-<key>.parquet one row per segment (written atomically)
        failures/part-<key>.parquet one row per audio content that could not be used, with the reason
        datasets/<key>.parquet     each dataset extracted into the store: its tracks, their
                                   labels/splits/groups, file stats and fingerprints
        datasets/index.json        the datasets recorded, and which one was extracted last
        decoder.log                native decoder messages of CLI runs (when there were any)

The identity rule: rows belong to audio content, not to a path. Every segment and failure row
carries the ``fingerprint`` of the bytes it came from (``embedkit.identity``); "already done"
means that fingerprint is in the store (the store directory already fixes backbone, weights and
preprocessing). Two datasets with the same relative paths and different audio never share rows;
the same audio under two names is extracted once; a file replaced in place gets new rows and
its old ones are no longer returned for it. The ``track_id``/``path``/``label`` columns of a row
say where its audio was first seen; readers (``read_tracks``) take track ids, labels, splits
and groups from the dataset they are asked for, joined on the fingerprint.

Each shard is written to a temporary name and renamed into place, so a killed run leaves either
a complete shard or none; resuming skips every content already present in a shard (a shard that
cannot be read is renamed ``*.corrupt`` and its tracks are redone). Shard keys hash the
fingerprints of their tracks. The shard
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
from .errors import EmbedkitError, StoreError, first_line
from .identity import SCHEME, artefact_scheme
from .io import atomic_write_text, tmp_name, versions

META_KEY = b"embedkit"
SEGMENT_COLUMNS = ["track_id", "path", "label", "split", "group", "fingerprint", "segment", "start_s", "end_s"]
#: 1: embedkit 0.1.0 (rows keyed by relative path); 2: rows keyed by content fingerprint.
LAYOUT = 2
DATASET_COLUMNS = [
    "track_id",
    "path",
    "label",
    "split",
    "group",
    "fingerprint",
    "real_path",
    "size",
    "mtime_ns",
    "inode",
]


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


def store_key(
    weights_id: str, prep: PreprocessConfig, spec: BackboneSpec | None = None, precision: str = "fp32"
) -> str:
    """Directory name of the store for these weights, this preprocessing and (when given) the
    backbone's input contract: rate, size and front-end parameters change the embedding as
    surely as the weights do (melstats has no weights at all). A reduced inference precision
    (bf16 / fp16 autocast) changes the embeddings too (by up to ~2 % on musicnn), so it gets a
    store of its own: fp32 and bf16 rows never mix. The device does not (fp32 results agree)."""
    payload = _canonical(prep.to_dict())
    if spec is not None:
        payload = {"preprocess": payload, "backbone": _canonical(_contract(spec))}
    if precision != "fp32":
        payload = {"key": payload, "precision": precision}
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
    def datasets_dir(self) -> Path:
        return self.root / "datasets"

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
            raise StoreError(
                f"{self.root}: another embedkit run is writing this store; wait for it to finish"
            ) from None
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
    def scheme(self) -> str:
        """The fingerprint scheme of this store's rows (``embedkit.identity``): every file is
        compared against them in it, whatever scheme is the default now."""
        return artefact_scheme(self.meta().get("fingerprints"))

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.meta()["preprocess"])

    @classmethod
    def create(
        cls,
        cache: str | os.PathLike,
        spec: BackboneSpec,
        weights_id: str,
        prep: PreprocessConfig,
        precision: str = "fp32",
    ) -> "Store":
        root = Path(cache) / spec.name / store_key(weights_id, prep, spec, precision)
        store = cls(root)
        meta = {
            "backbone": spec.to_dict(),
            "weights_id": weights_id,
            "preprocess": prep.to_dict(),
            "precision": precision,
            "versions": versions(),
            "layout": LAYOUT,
            "fingerprints": SCHEME,  # a store made before schemes records none: embedkit.identity.LEGACY
        }
        if store.meta_path.exists():
            from .runs import check_match

            old = store.meta()
            key = lambda m, b: {
                "name": b.get("name"),
                "weights_id": m["weights_id"],
                "preprocess": m["preprocess"],
                "precision": m.get("precision", "fp32"),
                **{k: b.get(k) for k in _contract(spec)},
            }  # noqa: E731
            check_match(
                root,
                "store was built with another backbone/weights/preprocessing",
                key(old, old["backbone"]),
                key(meta, meta["backbone"]),
            )
        else:
            store.segments_dir.mkdir(parents=True, exist_ok=True)
            store.failures_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(store.meta_path, json.dumps(meta, indent=2, sort_keys=True))
        store.segments_dir.mkdir(parents=True, exist_ok=True)
        store.failures_dir.mkdir(parents=True, exist_ok=True)
        return store

    def schema_metadata(self) -> dict[bytes, bytes]:
        # "devices" is provenance, not content: shards stay byte-identical whatever device ran
        meta = {k: v for k, v in self.meta().items() if k != "devices"}
        return {META_KEY: json.dumps(meta, sort_keys=True).encode()}

    def record_device(self, info: dict[str, Any]) -> None:
        """Note in store.json the device a run extracted on (``embedkit.device.provenance``):
        ``devices["last"]`` and every distinct one under ``devices["used"]``. Not part of the
        store key: a store is device-free and any device may extend it."""
        meta = self.meta()
        devices = dict(meta.get("devices") or {})
        used = [d for d in devices.get("used", []) if d != info]
        devices.update(last=info, used=[*used, info])
        meta["devices"] = devices
        atomic_write_text(self.meta_path, json.dumps(meta, indent=2, sort_keys=True))

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

    def _read_ids(self, f: Path, column: str = "fingerprint") -> list[str]:
        import pyarrow.parquet as pq

        try:
            return pq.read_table(f, columns=[column]).column(0).to_pylist()
        except Exception as exc:
            try:
                names = pq.read_schema(f).names
            except Exception:
                names = None
            if names is not None and column not in names:  # readable, but not of this layout
                raise StoreError(
                    f"{f}: shard has no {column!r} column (copied from an embedkit 0.1.0 store?); move it out of {self.root}"
                ) from None
            # Shards are renamed into place complete, so this is damage from outside (disk
            # error, hand editing). Move it aside so its tracks are extracted again.
            bad = f.with_name(f.name + ".corrupt")
            os.replace(f, bad)
            import warnings

            from .errors import EmbedkitWarning

            warnings.warn(
                f"{f}: unreadable shard ({type(exc).__name__}) moved to {bad.name}; its tracks will be redone",
                EmbedkitWarning,
                stacklevel=3,
            )
            return []

    def done_fingerprints(self) -> tuple[set[str], set[str]]:
        """(fingerprints with segments, fingerprints recorded as failed) from the shards on disk."""
        self.check_layout()
        done: set[str] = set()
        failed: set[str] = set()
        for f in self.shard_files("segments"):
            done.update(self._read_ids(f))
        for f in self.shard_files("failures"):
            failed.update(self._read_ids(f))
        return done, failed

    # -- layout (0.1.0 stores) ------------------------------------------------------------
    def is_legacy(self) -> bool:
        """True for a store written by embedkit 0.1.0: rows without content fingerprints."""
        return int(self.meta().get("layout", 1)) < LAYOUT

    def check_layout(self) -> None:
        if self.is_legacy():
            name = self.meta()["backbone"]["name"]
            raise StoreError(
                f"{self.root}: written by embedkit 0.1.0, its rows have no content fingerprints; "
                f"run `embedkit extract DATA --backbone {name} --cache {self.root.parent.parent}` once to upgrade it in place (or delete the folder)"
            )

    def upgrade(self) -> dict[str, int]:
        """Give a 0.1.0 store's rows the fingerprints of the files they name, in place; call it
        holding ``lock()``. A file is trusted to hold the audio of its rows only when it is still
        there and was not modified after the shard was written; the rows of any other file are
        dropped (its audio will be extracted again). Records the rows' tracks as one dataset, so
        ``fit`` without DATA keeps meaning what it meant. Returns {"kept", "dropped"} track counts."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from .identity import FileStat, identify

        counts = {"kept": 0, "dropped": 0}
        seen: dict[str, tuple[FileStat, str] | None] = {}
        tracks = []
        for kind in ("segments", "failures"):
            for f in self.shard_files(kind):
                table = pq.read_table(f)
                if "fingerprint" in table.column_names:  # upgraded by an interrupted earlier upgrade
                    if kind == "segments":
                        tracks.append(
                            table.select(["track_id", "path", "label", "split", "group", "fingerprint"])
                            .to_pandas()
                            .drop_duplicates("track_id")
                        )
                    continue
                written_ns = f.stat().st_mtime_ns
                fps = []
                for p in table.column("path").to_pylist():
                    if p not in seen:
                        try:
                            st = FileStat.of(p)
                            seen[p] = identify(p, scheme=self.scheme) if st.mtime_ns <= written_ns else None
                        except EmbedkitError:
                            seen[p] = None
                        counts["kept" if seen[p] else "dropped"] += 1
                    fps.append(seen[p][1] if seen[p] else None)
                # where a current shard has it (after group / after reason), so the shards concatenate
                at = table.column_names.index("group") + 1 if "group" in table.column_names else table.num_columns
                table = table.add_column(at, "fingerprint", pa.array(fps, pa.string()))
                table = table.filter(pc.is_valid(table.column("fingerprint")))
                if table.num_rows:
                    self.write_shard(kind, table, f.stem.removeprefix("part-"))
                else:
                    f.unlink()
                if kind == "segments":
                    cols = [
                        c
                        for c in ("track_id", "path", "label", "split", "group", "fingerprint")
                        if c in table.column_names
                    ]
                    tracks.append(table.select(cols).to_pandas().drop_duplicates("track_id"))
        meta = self.meta()
        meta["layout"] = LAYOUT
        atomic_write_text(self.meta_path, json.dumps(meta, indent=2, sort_keys=True))
        if tracks:
            import pandas as pd

            t = pd.concat(tracks, ignore_index=True).drop_duplicates("track_id")
            # a file not looked at in this run gets a stat that never matches: hashed when next seen
            stats = [seen[p][0] if seen.get(p) else FileStat(p, -1, -1, -1) for p in t["path"]]
            t["real_path"], t["size"], t["mtime_ns"], t["inode"] = (
                [s.path for s in stats],
                [s.size for s in stats],
                [s.mtime_ns for s in stats],
                [s.inode for s in stats],
            )
            self.record_dataset(t, f"{self.root} (upgraded 0.1.0 store)")
        return counts

    # -- datasets -------------------------------------------------------------------------
    def _index(self) -> dict[str, Any]:
        try:
            return json.loads((self.datasets_dir / "index.json").read_text())
        except (OSError, ValueError):
            return {"last": None, "datasets": {}}

    def record_dataset(self, tracks, source: str) -> str:
        """Record a dataset extracted into this store (call holding ``lock()``): its tracks with
        label/split/group, file stats and fingerprints (columns DATASET_COLUMNS). It becomes the
        store's last dataset. Returns its key (a hash of ``source``)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from .config import stable_hash
        from .io import atomic_write

        key = stable_hash({"source": source}, 16)
        t = tracks[DATASET_COLUMNS].copy()
        for c in ("split", "group"):
            t[c] = t[c].astype(object).where(t[c].notna(), None)
        table = pa.Table.from_pandas(t, preserve_index=False).replace_schema_metadata({b"source": source.encode()})
        f = self.datasets_dir / f"{key}.parquet"
        index = self._index()
        if index.get("last") == key and f.exists():
            try:  # a no-op re-run: nothing to write (and no fsync to wait for)
                if pq.read_table(f).equals(table, check_metadata=True):
                    return key
            except Exception:
                pass
        atomic_write(f, lambda fh: pq.write_table(table, fh))
        index["datasets"][key] = {"source": source, "n_tracks": len(t)}
        index["last"] = key
        atomic_write_text(self.datasets_dir / "index.json", json.dumps(index, indent=2, sort_keys=True))
        return key

    def datasets(self) -> dict[str, dict[str, Any]]:
        """{key: {"source", "n_tracks"}} of every dataset extracted into this store."""
        return dict(self._index()["datasets"])

    def dataset_tracks(self, key: str | None = None):
        """Track table (DATASET_COLUMNS, attrs["source"]) of a recorded dataset: by default the
        one extracted last. Raises StoreError when none is recorded."""
        import pyarrow.parquet as pq

        self.check_layout()
        index = self._index()
        key = key or index.get("last")
        f = self.datasets_dir / f"{key}.parquet"
        if not key or not f.exists():
            raise StoreError(
                f"{self.root}: no dataset is recorded in this store; name the tracks: `embedkit fit DATA ...`"
            )
        try:
            table = pq.read_table(f)
        except Exception as exc:
            raise StoreError(
                f"{f}: unreadable dataset record ({type(exc).__name__}); run `embedkit extract DATA` again or name DATA"
            ) from None
        t = table.to_pandas()
        t.attrs["source"] = (table.schema.metadata or {}).get(b"source", b"").decode() or index["datasets"].get(
            key, {}
        ).get("source", "")
        return t

    def fingerprinted(self, tracks):
        """``tracks`` with a ``fingerprint`` column in this store's scheme: as given when it has
        one, else computed (files unchanged since the store's record are not read; unreadable
        ones get None). A table fingerprinted in another scheme (a pipeline's, on a store made
        before blake3) is fingerprinted again, so it finds this store's rows."""
        from .identity import has_scheme, with_fingerprints

        return (
            tracks
            if has_scheme(tracks, self.scheme)
            else with_fingerprints(tracks, self.known_fingerprints(), self.scheme)
        )

    def known_fingerprints(self) -> dict:
        """{FileStat: fingerprint} of every recorded dataset's files: a re-run over unchanged
        files (same size, mtime_ns and inode) reads none of their bytes."""
        import pyarrow.parquet as pq

        from .identity import FileStat

        known = {}
        for f in sorted(self.datasets_dir.glob("*.parquet")) if self.datasets_dir.exists() else []:
            try:
                d = pq.read_table(f, columns=["real_path", "size", "mtime_ns", "inode", "fingerprint"]).to_pydict()
            except Exception:
                continue  # only a cache: those files are hashed again
            for p, sz, mt, ino, fp in zip(d["real_path"], d["size"], d["mtime_ns"], d["inode"], d["fingerprint"]):
                if fp is not None:
                    known[FileStat(p, int(sz), int(mt), int(ino))] = fp
        return known

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
            raise StoreError(f"{self.root}: cannot read the segment shards ({first_line(exc)})") from None
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

    def read_tracks(self, tracks, output: str = "embedding"):
        """The rows of ``tracks`` (a track table with a ``fingerprint`` column): (segment
        DataFrame sorted by track/segment, float32 [N, D]). Rows are found by fingerprint;
        track_id, path, label, split and group come from ``tracks``, so two tracks with the same
        audio both get its rows and a track whose audio is not in the store gets none."""
        import pyarrow as pa
        import pyarrow.compute as pc

        self.check_layout()
        tracks = self.fingerprinted(tracks)
        fps = [f for f in tracks["fingerprint"].dropna().unique()]
        table = self.read_table(columns=None)
        if output not in table.column_names:
            raise StoreError(f"{self.root}: store has no {output!r} column (has {', '.join(table.column_names)})")
        table = table.filter(pc.is_in(table.column("fingerprint"), value_set=pa.array(fps, pa.string())))
        rows = table.select(["fingerprint", "segment", "start_s", "end_s"]).to_pandas()
        rows["_row"] = np.arange(len(rows))
        rows = rows.drop_duplicates(["fingerprint", "segment"])  # a content written twice (defensive)
        cols = [c for c in ("track_id", "path", "label", "split", "group", "fingerprint") if c in tracks]
        seg = (
            tracks[cols].merge(rows, on="fingerprint", how="inner").sort_values(["track_id", "segment"], kind="stable")
        )
        col = table.column(output).combine_chunks()
        dim = col.type.list_size
        X = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)[seg["_row"].to_numpy()]
        seg = seg.drop(columns="_row").reset_index(drop=True)
        for c in ("split", "group"):
            if c not in seg:
                seg[c] = None
        return seg[SEGMENT_COLUMNS], np.ascontiguousarray(X, dtype=np.float32)

    def failures(self):
        import pandas as pd
        import pyarrow.parquet as pq

        files = self.shard_files("failures")
        if not files:
            return pd.DataFrame(columns=["track_id", "path", "label", "reason", "fingerprint"])
        return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)


def find_store(cache: str | os.PathLike, backbone: str, prep: PreprocessConfig | None = None) -> Store:
    """Locate the store of ``backbone`` under ``cache``: the one matching ``prep`` if given,
    else the only one. Raises StoreError with what exists and how to fix it."""
    base = Path(cache) / backbone
    candidates = sorted(p for p in base.glob("*/store.json")) if base.exists() else []
    if not candidates:
        raise StoreError(
            f"no embedding store for backbone {backbone!r} under {cache}: run `embedkit extract DATA --backbone {backbone}` first"
        )
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
