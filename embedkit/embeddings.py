"""A dataset's embeddings read from the stores: which store (``open_store``), which tracks
(``dataset_tracks``), their segment rows and matrix (``read_embeddings``), and what extracting
them cost (``extraction_cost``). Below ``fit`` and ``fusion``, which both read through it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import ConfigMismatchError, DatasetError, EmbedkitError, StoreError


def open_store(backbone: str | None = None, cache: str | os.PathLike = "cache", store=None):
    """The store to use: ``store`` (a Store or its directory) when given - it must hold
    ``backbone``'s embeddings - else the one store of ``backbone`` under ``cache``."""
    from .store import Store, find_store

    if store is None:
        if not backbone:
            raise EmbedkitError("name a backbone (--backbone) or a store (--store)")
        return find_store(cache, backbone)
    st = store if isinstance(store, Store) else Store(Path(store))
    name = st.meta()["backbone"]["name"]  # StoreError when it is not a store
    if backbone and name != backbone:
        raise ConfigMismatchError(f"{st.root}: store holds {name} embeddings, not {backbone}")
    return st


def dataset_tracks(st, tracks: pd.DataFrame | None = None) -> pd.DataFrame:
    """The tracks to train or predict on, with their fingerprints: ``tracks`` when given (files
    fingerprinted, unchanged ones from the store's record without reading them; unreadable ones
    are left out), else the dataset extracted last into the store (the store's record: labels,
    splits and groups as they were then; no audio is read)."""
    if tracks is None:
        return st.dataset_tracks()
    return st.fingerprinted(tracks)


def read_embeddings(
    st, output: str = "embedding", tracks: pd.DataFrame | None = None
) -> tuple[pd.DataFrame, np.ndarray]:
    """(segment table, X float32 [N, D]) of the tracks of a dataset in a store: ``tracks`` when
    given, else the dataset extracted last into the store (``dataset_tracks``). Rows are joined
    on the content fingerprint; track ids, labels, splits and groups come from the dataset.
    Refuses NaN/inf rows."""
    t = dataset_tracks(st, tracks)
    seg, X = st.read_tracks(t, output)
    if not len(seg):
        raise DatasetError(
            f"none of the {len(t)} tracks of {t.attrs.get('source') or 'the dataset'} is in the store {st.root}: run `embedkit extract` on it first"
        )
    seg.attrs["missing_from_store"] = int(len(t) - seg["track_id"].nunique())
    seg.attrs["source"] = t.attrs.get("source", "")
    bad_rows = _nonfinite_rows(X)
    if len(bad_rows):
        bad_tracks = seg["track_id"].iloc[bad_rows].unique()
        raise StoreError(
            f"{st.root}: {len(bad_rows)} segment(s) of {len(bad_tracks)} track(s) have NaN/inf embeddings (first: {bad_tracks[0]}); delete the store and extract again"
        )
    return seg, X


def _nonfinite_rows(X: np.ndarray, block: int = 8192) -> np.ndarray:
    # Row blocks: np.isfinite on the whole matrix would allocate N x D booleans.
    out = [a + np.flatnonzero(~np.isfinite(X[a : a + block]).all(axis=1)) for a in range(0, len(X), block)]
    return np.concatenate(out) if out else np.zeros(0, dtype=int)


def extraction_cost(st) -> dict[str, float] | None:
    """Cumulative extraction wall time / tracks of a store, when recorded (store.json
    "extraction" or the extract_timing.json that ``extract`` accumulates), as {"seconds", "tracks", "ms_per_track"}."""
    from .extract import read_timing

    rec = st.meta().get("extraction") or read_timing(st.root)
    if not rec or not rec.get("tracks"):
        return None
    return {
        "seconds": float(rec["seconds"]),
        "tracks": int(rec["tracks"]),
        "ms_per_track": 1000.0 * float(rec["seconds"]) / int(rec["tracks"]),
    }
