"""Splits, track-level aggregation and metrics.json.

Shared by every trainer (heads, scratch CNN, fine-tuning) so their runs are comparable:
the same folds for the same seed, the same vote rules and the same ``metrics.json`` schema.

metrics.json (schema 2) keys: the fields of ``runs.RunRecord`` (run_id, kind ("head" | "cnn" |
"finetune"), name, backbone, head, pretrained, trains_backbone, needs_extraction, protocol {type,
k, seed, grouped, test_size}, dataset {source, n_tracks, n_segments, class_counts, synthetic},
spec, preprocess, config, train_seconds, inference_ms_per_track, n_params, model_bytes,
weights_id), then labels, track_accuracy (= mean-probability vote), track_accuracy_vote,
track_accuracy_mean_prob, segment_accuracy, *_std (CV), folds [...], per_class {label: {precision,
recall, f1, support}}, confusion [[true x pred]] (mean-probability vote, pooled over folds),
misclassified [{track_id, path, true, pred, confidence}], learning_curves (optional),
versions, created, and each trainer's own extras. Schema 1 (before the record) lacks the three
approach fields; ``RunRecord.from_metrics`` derives them.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import DatasetError

SCHEMA_VERSION = 2


@dataclass
class Fold:
    """Track ids of one split. ``val`` is carved from the training part (for early stopping /
    hyper-parameter search) and is never the test part."""

    name: str
    train: list[str]
    test: list[str]
    val: list[str] = field(default_factory=list)

    def restricted(self, track_ids) -> "Fold":
        """The fold without the tracks not in ``track_ids`` (e.g. files dropped as unusable)."""
        keep = set(track_ids)
        return Fold(
            self.name,
            [t for t in self.train if t in keep],
            [t for t in self.test if t in keep],
            [t for t in self.val if t in keep],
        )


def _track_table(tracks: pd.DataFrame) -> pd.DataFrame:
    t = tracks.drop_duplicates("track_id").set_index("track_id").sort_index()
    return t


def _check_classes(labels: pd.Series, min_per_class: int, what: str) -> None:
    counts = labels.value_counts()
    if len(counts) < 2:
        raise DatasetError(
            f"only one class ({counts.index[0] if len(counts) else 'none'}): need at least two labels to train a classifier"
        )
    small = counts[counts < min_per_class]
    if len(small):
        raise DatasetError(
            f"class {small.index[0]!r} has {int(small.iloc[0])} track(s), fewer than the {min_per_class} that {what} needs"
        )


def _with_content_groups(t: pd.DataFrame) -> pd.DataFrame:
    """Tracks whose files hold the same audio (equal ``fingerprint``) are one group, joined with
    the dataset's own groups (artists), so a duplicated clip never sits on both sides of a split."""
    if "fingerprint" not in t or not t["fingerprint"].notna().any() or not t["fingerprint"].dropna().duplicated().any():
        return t
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(t)
    # Connect every track to a node for its fingerprint and one for its group: the connected
    # components are the groups that must not be split.
    keys = [f"fp:{f}" if pd.notna(f) else f"track:{i}" for i, f in enumerate(t["fingerprint"])]
    if "group" in t and t["group"].notna().all():
        keys2 = [f"group:{g}" for g in t["group"]]
    else:
        keys2 = keys
    nodes = {k: n + j for j, k in enumerate(dict.fromkeys(keys + keys2))}
    rows = list(range(n)) * 2
    cols = [nodes[k] for k in keys] + [nodes[k] for k in keys2]
    size = n + len(nodes)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(size, size))
    _, comp = connected_components(graph, directed=False)
    t = t.copy()
    t["group"] = [f"content-group-{c}" for c in comp[:n]]
    return t


def _grouped(t: pd.DataFrame) -> bool:
    return "group" in t and t["group"].notna().all() and t["group"].nunique() < len(t)


def make_folds(
    tracks: pd.DataFrame,
    protocol: str = "holdout",
    k: int = 5,
    test_size: float = 0.2,
    seed: int = 0,
    val_size: float = 0.0,
) -> list[Fold]:
    """Split tracks (track_id, label, [split], [group]) into folds, stratified by label.

    protocol: "holdout" (one stratified test part of ``test_size``), "cv" (stratified K-fold),
    "split" (the dataset's own split column: train / val / test).
    Groups (e.g. artist), when every track has one and some repeat, never straddle train and
    test; nor do tracks with the same audio (equal ``fingerprint`` column, when present). ``val_size`` > 0 carves a stratified validation part out of each training part.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

    t = _with_content_groups(_track_table(tracks))
    ids = t.index.to_numpy()
    y = t["label"].to_numpy()
    grouped = _grouped(t)
    folds: list[Fold] = []
    if protocol == "split":
        if "split" not in t or t["split"].isna().all():
            raise DatasetError("protocol 'split' needs a split column (train/val/test) in the dataset")
        tr = t.index[t["split"] == "train"].tolist()
        te = t.index[t["split"] == "test"].tolist()
        va = t.index[t["split"] == "val"].tolist()
        if not tr or not te:
            raise DatasetError("dataset split column needs both 'train' and 'test' tracks")
        _check_classes(t.loc[tr, "label"], 1, "training")
        only_test = sorted(set(t.loc[te, "label"]) - set(t.loc[tr, "label"]))
        if only_test:
            raise DatasetError(f"label(s) {only_test} appear only in the test split; the model cannot predict them")
        folds.append(Fold("split", tr, te, va))
        return _add_val(folds, t, val_size, seed) if not va and val_size > 0 else folds
    if protocol == "cv":
        from .runs import check_cv

        check_cv(k)
        _check_classes(t["label"], k, f"{k}-fold cross-validation")
        splitter = (
            StratifiedGroupKFold(k, shuffle=True, random_state=seed)
            if grouped
            else StratifiedKFold(k, shuffle=True, random_state=seed)
        )
        parts = splitter.split(ids, y, t["group"].to_numpy() if grouped else None)
        for i, (a, b) in enumerate(parts):
            folds.append(Fold(f"fold{i}", sorted(ids[a]), sorted(ids[b])))
    elif protocol == "holdout":
        if not 0 < test_size < 1:
            raise DatasetError("test size must be between 0 and 1")
        _check_classes(t["label"], 2, "a stratified holdout")
        if grouped:
            splitter = StratifiedGroupKFold(max(2, round(1 / test_size)), shuffle=True, random_state=seed)
            a, b = next(splitter.split(ids, y, t["group"].to_numpy()))
            folds.append(Fold("holdout", sorted(ids[a]), sorted(ids[b])))
        else:
            a, b = train_test_split(ids, test_size=test_size, stratify=y, random_state=seed)
            folds.append(Fold("holdout", sorted(a), sorted(b)))
    else:
        raise DatasetError(f"unknown protocol {protocol!r}; use holdout, cv or split")
    for f in folds:
        only_test = sorted(set(t.loc[f.test, "label"]) - set(t.loc[f.train, "label"]))
        if only_test:
            raise DatasetError(f"label(s) {only_test} appear only in the test part of {f.name}")
    return _add_val(folds, t, val_size, seed) if val_size > 0 else folds


def with_validation(folds: list[Fold], tracks: pd.DataFrame, val_size: float, seed: int) -> list[Fold]:
    """``folds`` with a validation part of ``val_size`` carved out of each training part that
    has none: the folds ``make_folds(..., val_size=val_size)`` returns, from folds made without."""
    if val_size <= 0:
        return list(folds)
    t = _track_table(tracks)
    carved = _add_val([f for f in folds if not f.val], t, val_size, seed)
    by_name = {f.name: f for f in carved}
    return [by_name.get(f.name, f) for f in folds]


def _add_val(folds: list[Fold], t: pd.DataFrame, val_size: float, seed: int) -> list[Fold]:
    from sklearn.model_selection import GroupShuffleSplit, train_test_split

    out = []
    for f in folds:
        tr = np.array(f.train)
        labels = t.loc[tr, "label"].to_numpy()
        if _grouped(t.loc[tr]):
            a, b = next(
                GroupShuffleSplit(1, test_size=val_size, random_state=seed).split(
                    tr, labels, t.loc[tr, "group"].to_numpy()
                )
            )
        else:
            counts = pd.Series(labels).value_counts()
            strat = labels if counts.min() >= 2 and round(val_size * len(tr)) >= len(counts) else None
            a, b = train_test_split(np.arange(len(tr)), test_size=val_size, stratify=strat, random_state=seed)
        out.append(Fold(f.name, sorted(tr[a]), f.test, sorted(tr[b])))
    return out


def protocol_dict(protocol: str, k: int, seed: int, test_size: float, tracks: pd.DataFrame) -> dict[str, Any]:
    t = _track_table(tracks)
    return {
        "type": protocol,
        "k": k if protocol == "cv" else 1,
        "seed": seed,
        "test_size": test_size if protocol == "holdout" else None,
        "grouped": bool(_grouped(t)),
        # what the groups are, when the dataset says (a library labelled by its tags: artists)
        **({"group_by": str(tracks.attrs["group_by"])} if _grouped(t) and tracks.attrs.get("group_by") else {}),
    }


# ---------------------------------------------------------------------------------------------
# Aggregation: segment predictions -> track predictions


def aggregate(segment_track_ids: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segment probabilities [N, C] -> (track ids [T] sorted, mean probability [T, C],
    majority-vote class index [T]). Vote ties go to the class with the higher mean probability."""
    seg_ids = np.asarray(segment_track_ids)
    uniq, inv = np.unique(seg_ids, return_inverse=True)
    n_t, n_c = len(uniq), proba.shape[1]
    sums = np.zeros((n_t, n_c), dtype=np.float64)
    np.add.at(sums, inv, proba)
    counts = np.bincount(inv, minlength=n_t)[:, None]
    mean = sums / counts
    votes = np.zeros((n_t, n_c), dtype=np.float64)
    np.add.at(votes, (inv, proba.argmax(axis=1)), 1.0)
    # Tie-break by mean probability: add a term smaller than one vote.
    vote = (votes + 1e-6 * mean).argmax(axis=1)
    return uniq, mean, vote


class Evaluation:
    """Accumulates test predictions over folds and produces the metrics.json fields."""

    def __init__(self, labels: list[str]):
        self.labels = list(labels)
        self.folds: list[dict[str, Any]] = []
        self._rows: list[pd.DataFrame] = []
        self._means: list[np.ndarray] = []  # track mean probabilities [T, C] per fold

    def add_fold(
        self,
        name: str,
        segment_track_ids,
        proba: np.ndarray,
        track_labels: dict[str, str],
        paths: dict[str, str] | None = None,
        extra: dict | None = None,
    ) -> dict[str, Any]:
        """Add one fold's segment-level class probabilities (columns in ``self.labels`` order)."""
        proba = np.asarray(proba, dtype=np.float64)
        seg_ids = np.asarray(segment_track_ids)
        lab_idx = {l: i for i, l in enumerate(self.labels)}
        seg_true = np.array([lab_idx[track_labels[t]] for t in seg_ids])
        ids, mean, vote = aggregate(seg_ids, proba)
        true = np.array([lab_idx[track_labels[t]] for t in ids])
        pred_mean = mean.argmax(axis=1)
        rec = {
            "fold": name,
            "n_test_tracks": int(len(ids)),
            "track_accuracy_vote": float((vote == true).mean()),
            "track_accuracy_mean_prob": float((pred_mean == true).mean()),
            "segment_accuracy": float((proba.argmax(axis=1) == seg_true).mean()),
            **(extra or {}),
        }
        self.folds.append(rec)
        self._means.append(mean)
        self._rows.append(
            pd.DataFrame(
                {
                    "fold": name,
                    "track_id": ids,
                    "path": [(paths or {}).get(t, "") for t in ids],
                    "true": true,
                    "pred_mean": pred_mean,
                    "pred_vote": vote,
                    "confidence": mean.max(axis=1),
                }
            )
        )
        return rec

    def predictions(self) -> pd.DataFrame:
        df = pd.concat(self._rows, ignore_index=True)
        df["true_label"] = [self.labels[i] for i in df["true"]]
        df["pred_label"] = [self.labels[i] for i in df["pred_mean"]]
        return df

    def track_probabilities(self) -> tuple[pd.DataFrame, np.ndarray]:
        """(predictions() rows, their mean probabilities [T, C] in ``labels`` order): the
        out-of-fold track probabilities the calibration is fitted on."""
        return self.predictions(), np.concatenate(self._means, axis=0)

    def metrics(self, n_misclassified: int = 10) -> dict[str, Any]:
        from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

        if not self.folds:
            raise ValueError("no folds evaluated")
        df = self.predictions()
        out: dict[str, Any] = {"labels": self.labels, "folds": self.folds}
        for key in ("track_accuracy_vote", "track_accuracy_mean_prob", "segment_accuracy"):
            vals = np.array([f[key] for f in self.folds])
            out[key] = float(vals.mean())
            if len(vals) > 1:
                out[key + "_std"] = float(vals.std(ddof=0))
        out["track_accuracy"] = out["track_accuracy_mean_prob"]
        if "track_accuracy_mean_prob_std" in out:
            out["track_accuracy_std"] = out["track_accuracy_mean_prob_std"]
        idx = list(range(len(self.labels)))
        p, r, f1, s = precision_recall_fscore_support(df["true"], df["pred_mean"], labels=idx, zero_division=0)
        out["per_class"] = {
            l: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f1[i]), "support": int(s[i])}
            for i, l in enumerate(self.labels)
        }
        out["macro_f1"] = float(np.mean(f1))
        out["confusion"] = confusion_matrix(df["true"], df["pred_mean"], labels=idx).tolist()
        wrong = df[df["true"] != df["pred_mean"]].sort_values("confidence", ascending=False).head(n_misclassified)
        out["misclassified"] = [
            {
                "track_id": r.track_id,
                "path": r.path,
                "true": r.true_label,
                "pred": r.pred_label,
                "confidence": float(r.confidence),
                "fold": r.fold,
            }
            for r in wrong.itertuples()
        ]
        return out


# ---------------------------------------------------------------------------------------------
# Run directories


def dataset_summary(tracks: pd.DataFrame, n_segments: int | None = None, synthetic: bool = False) -> dict[str, Any]:
    t = _track_table(tracks)
    return {
        "source": str(tracks.attrs.get("source", "")),
        "n_tracks": int(len(t)),
        "n_segments": int(n_segments) if n_segments is not None else None,
        "class_counts": {str(k): int(v) for k, v in t["label"].value_counts().sort_index().items()},
        "synthetic": bool(synthetic or tracks.attrs.get("synthetic", False)),
        # labels from the files' own genre tags: the taxonomy record (embedkit.taxonomy)
        **({"taxonomy": tracks.attrs["taxonomy"]} if tracks.attrs.get("taxonomy") else {}),
        # a retrained run: the results database whose labels were added to the source's
        **({"labels_from": tracks.attrs["labels_from"]} if tracks.attrs.get("labels_from") else {}),
    }


def write_metrics(run_dir: str | os.PathLike, metrics: dict[str, Any]) -> Path:
    """Write metrics.json atomically (a run directory is complete once this file exists)."""
    from .io import atomic_write_text, jsonable, versions

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = {
        "schema": SCHEMA_VERSION,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "versions": versions(),
        **metrics,
    }
    path = run_dir / "metrics.json"
    atomic_write_text(path, json.dumps(metrics, indent=2, default=jsonable))
    return path


def find_metrics_files(paths: list[str | os.PathLike]) -> list[Path]:
    """metrics.json files in ``paths``: metrics files, run dirs, or parents of run dirs."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file() and p.name == "metrics.json":
            found.append(p)
        elif (p / "metrics.json").exists():
            found.append(p / "metrics.json")
        elif p.is_dir():
            found.extend(sorted(p.glob("*/metrics.json")))
    return found


def load_runs(paths: list[str | os.PathLike]) -> list[dict[str, Any]]:
    """metrics.json of every run found in ``paths`` (run dirs, metrics files, or parents)."""
    runs = []
    for f in find_metrics_files(paths):
        m = json.loads(f.read_text())
        m.setdefault("run_dir", str(f.parent))
        runs.append(m)
    return runs
