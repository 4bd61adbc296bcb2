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
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from .audio.decoding import AUDIO_EXTENSIONS, not_audio_note, scan_kind
from .errors import DatasetError, EmbedkitWarning, first_line

if TYPE_CHECKING:
    from .taxonomy import TagLabels

COLUMNS = ["track_id", "path", "label", "split", "group"]
_SPLIT_NAMES = {
    "training": "train",
    "train": "train",
    "validation": "val",
    "val": "val",
    "valid": "val",
    "test": "test",
}
FMA_SUBSETS = ("small", "medium", "large")


def _finish(df: pd.DataFrame, source: str) -> pd.DataFrame:
    if df.empty:
        raise DatasetError(f"{source}: no audio files found")
    dup = df["path"][df["path"].duplicated()]
    if len(dup):
        labels = sorted(set(df.loc[df["path"] == dup.iloc[0], "label"]))
        raise DatasetError(
            f"{source}: duplicate path {dup.iloc[0]} listed with different labels/splits/groups ({', '.join(labels)}); {len(dup)} duplicate(s) in all"
        )
    dup = df["track_id"][df["track_id"].duplicated()]
    if len(dup):
        raise DatasetError(f"{source}: duplicate track id {dup.iloc[0]}")
    for col in ("split", "group"):
        if col not in df:
            df[col] = None
    df = df[COLUMNS].astype({"track_id": str, "path": str, "label": str, "split": object, "group": object})
    for col in ("split", "group"):  # one missing marker (None), not pandas' str-dtype NaN
        df[col] = df[col].where(df[col].notna(), None)
    df = df.sort_values("track_id")
    df.attrs["source"] = source
    return df.reset_index(drop=True)


def from_folder(root: str | os.PathLike) -> pd.DataFrame:
    """``root/<label>/<file>``: every audio file below a label folder, by the folder scans' one
    rule (``decoding.scan_kind``: an audio extension, or audio content under another name).
    Files that are not audio are left out with one warning counting them by kind (also in
    ``attrs["not_audio"]``: (path, kind)), audio files beside the label folders with another;
    hidden folders (``.git``, ``.Trash``) are not entered."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    rows, not_audio = [], []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(label_dir.rglob("*")):
            if f.is_dir() or any(part.startswith(".") for part in f.relative_to(label_dir).parts[:-1]):
                continue
            kind = scan_kind(f)
            if kind is not None:
                not_audio.append((str(f), kind))
                continue
            rel = f.relative_to(root)
            rows.append({"track_id": rel.with_suffix("").as_posix(), "path": str(f), "label": label_dir.name})
    if not rows:
        raise DatasetError(
            f"{root}: no audio files in <label>/<file> layout (extensions {', '.join(AUDIO_EXTENSIONS)})"
        )
    if not_audio:
        warnings.warn(f"{root}: {not_audio_note(not_audio, 'in the label folders')}", EmbedkitWarning, stacklevel=2)
    loose = [f.name for f in sorted(root.iterdir()) if not f.name.startswith(".") and scan_kind(f) is None]
    if loose:
        warnings.warn(
            f"{root}: {len(loose)} audio file(s) outside a label folder not used (e.g. {loose[0]}); "
            "a folder dataset is <label>/<file>",
            EmbedkitWarning,
            stacklevel=2,
        )
    df = _finish(pd.DataFrame(rows), str(root))
    df.attrs["not_audio"] = not_audio
    return df


def from_manifest(csv_path: str | os.PathLike) -> pd.DataFrame:
    """CSV (or TSV) with columns path,label[,split][,group]."""
    csv_path = Path(csv_path).resolve()
    sep = "\t" if csv_path.suffix.lower() in (".tsv", ".tab") else ","
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: manifest not found")
    try:
        df = pd.read_csv(csv_path, sep=sep, dtype=str, keep_default_na=False, skipinitialspace=True)
    except Exception as exc:
        raise DatasetError(f"{csv_path}: cannot read manifest ({first_line(exc)})") from None
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in ("path", "label") if c not in df.columns]
    if missing:
        raise DatasetError(
            f"{csv_path}: manifest lacks column(s) {', '.join(missing)} (has {', '.join(df.columns) or 'none'}); expected path,label[,split][,group]"
        )
    df = df.apply(lambda col: col.str.strip())
    empty = df.index[(df["path"] == "") | (df["label"] == "")]
    if len(empty):
        raise DatasetError(f"{csv_path}: row {int(empty[0]) + 2} has an empty path or label")
    base = csv_path.parent
    paths = [str((base / p).resolve()) if not os.path.isabs(p) else str(Path(p).resolve()) for p in df["path"]]
    out = pd.DataFrame({"path": paths, "label": df["label"]})
    out["track_id"] = [Path(p).with_suffix("").as_posix() for p in df["path"]]
    if "split" in df:
        splits = df["split"].str.lower()
        bad = sorted(set(splits) - set(_SPLIT_NAMES) - {""})
        if bad:
            raise DatasetError(f"{csv_path}: unknown split value(s) {bad}; use train/val/test")
        out["split"] = [(_SPLIT_NAMES[s] if s else None) for s in splits]
    if "group" in df:
        out["group"] = [g if g else None for g in df["group"]]
    return _finish(_drop_repeated_rows(out, csv_path), str(csv_path))


def _drop_repeated_rows(df: pd.DataFrame, source: Path) -> pd.DataFrame:
    """A path listed twice with the same label/split/group is a harmless repeat: keep one (with
    a warning) so it is not weighted twice. Conflicting repeats are left for _finish to refuse."""
    cols = [c for c in ("path", "label", "split", "group") if c in df]
    repeated = df.duplicated(subset=cols)
    if repeated.any():
        first = df.loc[repeated, "path"].iloc[0]
        warnings.warn(
            f"{source}: {int(repeated.sum())} repeated row(s) ignored (e.g. {first})", EmbedkitWarning, stacklevel=3
        )
        df = df[~repeated]
    return df


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
    rows, absent = [], 0
    for tid, r in sel.iterrows():
        p = fma_audio_path(audio_dir, tid)
        if not p.exists():
            absent += 1
            continue
        rows.append(
            {
                "track_id": f"{int(tid):06d}",
                "path": str(p),
                "label": str(r[("track", "genre_top")]),
                "split": _SPLIT_NAMES.get(str(r[("set", "split")]).strip().lower(), None),
                "group": _id_str(r[("artist", "id")]),
            }
        )
    if not rows:
        raise DatasetError(
            f"{tracks_csv}: no {subset}-subset track has its mp3 under {audio_dir} (expected e.g. {fma_audio_path(audio_dir, sel.index[0]) if len(sel) else audio_dir / 'ddd/dddddd.mp3'})"
        )
    if absent:
        warnings.warn(
            f"{audio_dir}: {absent} of {len(sel)} {subset}-subset tracks have no mp3 there; skipped",
            EmbedkitWarning,
            stacklevel=2,
        )
    return _finish(pd.DataFrame(rows), str(tracks_csv))


def _id_str(v) -> str | None:
    """Artist ids print as "12", not "12.0" (pandas reads an id column with gaps as float)."""
    if pd.isna(v):
        return None
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def audio_files(root: Path) -> list[Path]:
    """Every audio file under ``root`` (any depth), dot files and dot folders left out."""
    return sorted(
        f
        for f in root.rglob("*")
        if f.is_file()
        and f.suffix.lower() in AUDIO_EXTENSIONS
        and not any(part.startswith(".") for part in f.relative_to(root).parts)
    )


def from_tags(root: str | os.PathLike, labels: "TagLabels | None" = None) -> pd.DataFrame:
    """A folder of music in any layout, labelled by the files' own genre tags (``embedkit.tags``)
    through the taxonomy of ``labels`` (``embedkit.taxonomy``: normalising, genre map,
    ``min_tracks`` floor). group = the artist (else album artist) key, so splits never cut an
    artist; a track with neither is a group of its own.

    Only labelled tracks are rows. ``attrs``: ``taxonomy`` (the record: mapping, classes, what
    was dropped and why), ``untagged`` (paths without a genre tag, whose tags cannot be read, or
    whose genre embedkit wrote, a prediction rather than a label: what gets tagged next),
    ``not_used`` ([path, reason] of tagged tracks left out).
    """
    from .errors import TagWriteError
    from .tags import read_library_tags
    from .taxonomy import TagLabels, Taxonomy, artist_key

    labels = labels or TagLabels()
    root = Path(root).resolve()
    if not root.is_dir():
        raise DatasetError(f"{root}: --labels-from-tags needs a folder of music")
    files = audio_files(root)
    if not files:
        raise DatasetError(f"{root}: no audio files (extensions {', '.join(AUDIO_EXTENSIONS)})")
    genre_map = labels.load_map()  # a bad map fails before any file is read
    values: list[list[str] | None] = []
    artists: list[str | None] = []
    predicted = set()  # genres embedkit wrote (`tag --write-tags`): its own predictions, not labels
    for f in files:
        try:
            t = read_library_tags(f)
        except TagWriteError:  # unreadable tags, or a format without tags: not training data
            values.append(None)
            artists.append(None)
            continue
        if t.written_by_embedkit:
            predicted.add(str(f))
        values.append(None if t.written_by_embedkit else t.genres)
        artists.append(artist_key(t.artist) or artist_key(t.album_artist))
    if not any(values):
        raise DatasetError(
            f"{root}: none of its {len(files)} audio file(s) has a genre tag; tag some, or use a <label>/<file> folder or a CSV manifest"
        )
    tax = Taxonomy.build(values, genre_map, labels.min_tracks)
    rows, untagged, not_used = [], [], []
    for f, v, a in zip(files, values, artists):
        label, why = tax.label_of(v)
        if label is None:
            if why == "untagged":
                untagged.append(str(f))
            else:
                not_used.append([str(f), why])
            continue
        tid = f.relative_to(root).with_suffix("").as_posix()
        rows.append({"track_id": tid, "path": str(f), "label": label, "group": f"artist:{a}" if a else f"track:{tid}"})
    record = tax.record(values)
    if predicted:
        n_untagged = record["tracks_not_used"].pop("untagged", 0) - len(predicted)
        record["tracks_not_used"] = dict(
            sorted(
                {
                    **record["tracks_not_used"],
                    **({"untagged": n_untagged} if n_untagged else {}),
                    "genre written by embedkit (a prediction, not a label)": len(predicted),
                }.items()
            )
        )
    classes = sorted({r["label"] for r in rows})
    if len(classes) < 2:
        raise DatasetError(
            f"{root}: {len(classes)} class(es) left after the genre map and --min-tracks {labels.min_tracks} "
            f"({', '.join(f'{k}: {n}' for k, n in record['classes'].items()) or 'none'}); a classifier needs 2"
        )
    df = _finish(pd.DataFrame(rows), str(root))
    df.attrs.update(taxonomy=record, untagged=untagged, not_used=not_used, group_by="artist")
    return df


def load_dataset(
    data: str | os.PathLike,
    audio_dir: str | os.PathLike | None = None,
    subset: str = "small",
    labels_from_tags: "TagLabels | None" = None,
) -> pd.DataFrame:
    """Dispatch on the form of ``data``: folder, FMA tracks.csv (needs audio_dir), or manifest;
    ``labels_from_tags`` (a ``taxonomy.TagLabels``): a folder in any layout labelled by its
    files' genre tags (``from_tags``)."""
    p = Path(data)
    if not p.exists():
        raise DatasetError(f"{p}: no such file or directory")
    if labels_from_tags is not None:
        return from_tags(p, labels_from_tags)
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
