"""Dataset descriptions -> one track table.

Three input forms give the same pandas DataFrame with columns
``track_id`` (str, unique), ``path`` (absolute str), ``label`` (str), ``split`` (str or None:
"train"/"val"/"test"), ``group`` (str or None, e.g. artist; splits never cut a group).

- a folder ``<label>/<file>`` (track_id = path relative to the folder, without extension);
- a CSV manifest ``path,label[,split][,group]`` (relative paths resolved against the CSV);
- FMA's ``tracks.csv`` (three-row header) with ``audio_dir`` pointing at ``fma_small/``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .audio import AUDIO_EXTENSIONS
from .errors import DatasetError

COLUMNS = ["track_id", "path", "label", "split", "group"]
_SPLIT_NAMES = {"training": "train", "train": "train", "validation": "val", "val": "val", "valid": "val", "test": "test"}
FMA_SUBSETS = ("small", "medium", "large")


def _finish(df: pd.DataFrame, source: str) -> pd.DataFrame:
    if df.empty:
        raise DatasetError(f"{source}: no audio files found")
    dup = df["path"][df["path"].duplicated()]
    if len(dup):
        raise DatasetError(f"{source}: duplicate path {dup.iloc[0]} ({len(dup)} duplicates)")
    dup = df["track_id"][df["track_id"].duplicated()]
    if len(dup):
        raise DatasetError(f"{source}: duplicate track id {dup.iloc[0]}")
    for col in ("split", "group"):
        if col not in df:
            df[col] = None
    df = df[COLUMNS].astype({"track_id": str, "path": str, "label": str}).sort_values("track_id")
    df.attrs["source"] = source
    return df.reset_index(drop=True)


def from_folder(root: str | os.PathLike) -> pd.DataFrame:
    """``root/<label>/<file>``: every audio file one level below a label folder."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    rows = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(label_dir.rglob("*")):
            if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS:
                rel = f.relative_to(root)
                rows.append({"track_id": rel.with_suffix("").as_posix(), "path": str(f), "label": label_dir.name})
    if not rows:
        raise DatasetError(f"{root}: no audio files in <label>/<file> layout (extensions {', '.join(AUDIO_EXTENSIONS)})")
    return _finish(pd.DataFrame(rows), str(root))


def from_manifest(csv_path: str | os.PathLike) -> pd.DataFrame:
    """CSV (or TSV) with columns path,label[,split][,group]."""
    csv_path = Path(csv_path).resolve()
    sep = "\t" if csv_path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        df = pd.read_csv(csv_path, sep=sep, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise DatasetError(f"{csv_path}: cannot read manifest ({exc})") from None
    missing = [c for c in ("path", "label") if c not in df.columns]
    if missing:
        raise DatasetError(f"{csv_path}: manifest lacks column(s) {', '.join(missing)} (has {', '.join(df.columns)})")
    empty = df.index[(df["path"].str.strip() == "") | (df["label"].str.strip() == "")]
    if len(empty):
        raise DatasetError(f"{csv_path}: row {int(empty[0]) + 2} has an empty path or label")
    base = csv_path.parent
    paths = [str((base / p).resolve()) if not os.path.isabs(p) else str(Path(p).resolve()) for p in df["path"]]
    out = pd.DataFrame({"path": paths, "label": df["label"].str.strip()})
    out["track_id"] = [Path(p).with_suffix("").as_posix() for p in df["path"]]
    if "split" in df:
        bad = sorted(set(df["split"]) - set(_SPLIT_NAMES) - {""})
        if bad:
            raise DatasetError(f"{csv_path}: unknown split value(s) {bad}; use train/val/test")
        out["split"] = [(_SPLIT_NAMES[s] if s else None) for s in df["split"]]
    if "group" in df:
        out["group"] = [g if g else None for g in df["group"]]
    return _finish(out, str(csv_path))


def fma_audio_path(audio_dir: str | os.PathLike, track_id: int) -> Path:
    """FMA convention: fma_small/000/000002.mp3."""
    tid = f"{int(track_id):06d}"
    return Path(audio_dir) / tid[:3] / f"{tid}.mp3"


def from_fma(tracks_csv: str | os.PathLike, audio_dir: str | os.PathLike, subset: str = "small") -> pd.DataFrame:
    """FMA metadata: tracks.csv (three header rows) + fma_<subset>/ audio folder.

    Keeps tracks with ('set','subset') <= subset, label ('track','genre_top'), split
    ('set','split'), group ('artist','id'). Tracks whose mp3 is absent are dropped (FMA ships
    the metadata for every subset in one file).
    """
    if subset not in FMA_SUBSETS:
        raise DatasetError(f"unknown FMA subset {subset!r}; use one of {FMA_SUBSETS}")
    tracks_csv = Path(tracks_csv)
    try:
        raw = pd.read_csv(tracks_csv, index_col=0, header=[0, 1], low_memory=False)
    except Exception as exc:
        raise DatasetError(f"{tracks_csv}: cannot read FMA tracks.csv ({exc})") from None
    need = [("set", "subset"), ("set", "split"), ("track", "genre_top"), ("artist", "id")]
    missing = [f"{a}.{b}" for a, b in need if (a, b) not in raw.columns]
    if missing:
        raise DatasetError(f"{tracks_csv}: not an FMA tracks.csv (missing {', '.join(missing)})")
    rank = {s: i for i, s in enumerate(FMA_SUBSETS)}
    keep = raw[("set", "subset")].map(rank).le(rank[subset]) & raw[("track", "genre_top")].notna()
    sel = raw[keep]
    audio_dir = Path(audio_dir).resolve()
    if not audio_dir.is_dir():
        raise DatasetError(f"{audio_dir}: FMA audio directory not found")
    rows = []
    for tid, r in sel.iterrows():
        p = fma_audio_path(audio_dir, tid)
        if p.exists():
            rows.append(
                {
                    "track_id": f"{int(tid):06d}",
                    "path": str(p),
                    "label": str(r[("track", "genre_top")]),
                    "split": _SPLIT_NAMES.get(str(r[("set", "split")]), None),
                    "group": str(r[("artist", "id")]),
                }
            )
    if not rows:
        raise DatasetError(f"{tracks_csv}: no {subset}-subset track has its mp3 under {audio_dir}")
    return _finish(pd.DataFrame(rows), str(tracks_csv))


def load_dataset(data: str | os.PathLike, audio_dir: str | os.PathLike | None = None, subset: str = "small") -> pd.DataFrame:
    """Dispatch on the form of ``data``: folder, FMA tracks.csv (needs audio_dir), or manifest."""
    p = Path(data)
    if not p.exists():
        raise DatasetError(f"{p}: no such file or directory")
    if p.is_dir():
        return from_folder(p)
    if p.suffix.lower() in (".csv", ".tsv", ".tab"):
        with open(p, encoding="utf-8", errors="replace") as fh:
            head = [fh.readline() for _ in range(3)]
        if head[0].startswith(",") and "track" in head[0] and "genre_top" in head[1]:
            if audio_dir is None:
                raise DatasetError(f"{p}: FMA tracks.csv needs --audio-dir pointing at fma_{subset}/")
            return from_fma(p, audio_dir, subset)
        return from_manifest(p)
    raise DatasetError(f"{p}: expected a folder, a CSV/TSV manifest or an FMA tracks.csv")
