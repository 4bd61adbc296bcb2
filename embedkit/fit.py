"""Train and evaluate a head on a backbone's embedding store: ``embedkit fit``.

    store (segments x D float32) -> folds by track (embedkit.evaluate.make_folds)
    -> per fold: [search on the validation tracks] -> fit on the training tracks -> predict the
       test segments -> track votes (Evaluation)
    -> runs/<run-id>/{metrics.json, head.skops, predictions.csv}

Invariants: the folds are made of track ids, so the segments of one track (and, when the
dataset knows them, the tracks of one group/artist) are never on both sides; the scaler, PCA
and the hyper-parameter search see only the training part of a fold (the search scores the
fold's validation tracks, carved out of its training part). The run directory is built under a
temporary name and renamed into place, so a failed fit leaves nothing behind.

The bundle holds the model evaluated on the holdout / split protocol; after cross-validation it
holds a model refitted on every track (with the hyper-parameters most folds chose), and the
metrics are the CV estimate of that procedure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from .backbones.fused import is_fused
from .embeddings import dataset_tracks, extraction_cost, open_store, read_embeddings  # noqa: F401  (public here too)
from .errors import ConfigError
from .fusion import FusedStores, head_run_name
from .heads import (
    BUNDLE_FILE,
    HEADS,
    SEARCH_SPACE,
    HeadBundle,
    default_pca,
    fusion_pipeline,
    head_config,
    load_bundle,
    make_head,
    n_params,
    save_bundle,
)
from .runs import PROTOCOLS, choose_protocol  # noqa: F401  (PROTOCOLS: fit's public protocol names)


@dataclass
class FitResult:
    run_dir: Path
    metrics: dict[str, Any]
    bundle: HeadBundle


# ---------------------------------------------------------------------------------------------
# inputs


def _track_table(seg: pd.DataFrame, source: str) -> pd.DataFrame:
    cols = [c for c in ("track_id", "path", "label", "split", "group") if c in seg]
    t = seg[cols].drop_duplicates("track_id").reset_index(drop=True)
    for c in ("split", "group"):
        if c not in t:
            t[c] = None
    t.attrs["source"] = source
    first = Path(t["path"].iloc[0]) if len(t) else None
    t.attrs["synthetic"] = bool(
        first is not None and len(first.parents) > 1 and (first.parents[1] / "SYNTHETIC").exists()
    )
    return t


# ---------------------------------------------------------------------------------------------
# training


@contextlib.contextmanager
def _thread_limit(threads: int | None):
    """Limit BLAS/OpenMP (numpy, LightGBM) and torch to ``threads`` for the duration."""
    if not threads:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(before)


def _proba_in(labels: list[str], model, P: np.ndarray) -> np.ndarray:
    """Columns of P (model.classes_ order) rearranged to ``labels``; unseen labels get 0."""
    classes = [str(c) for c in model.classes_]
    out = np.zeros((len(P), len(labels)))
    for j, c in enumerate(classes):
        out[:, labels.index(c)] = P[:, j]
    return out


def _track_accuracy(seg_ids: np.ndarray, y: np.ndarray, P: np.ndarray, labels: list[str]) -> tuple[float, float]:
    """(mean-probability track accuracy, segment log-loss) on one part, for the search."""
    from .evaluate import aggregate

    ids, mean, _ = aggregate(seg_ids, P)
    truth = pd.Series(y, index=seg_ids).groupby(level=0).first().loc[ids].to_numpy()
    acc = float((np.asarray(labels)[mean.argmax(axis=1)] == truth).mean())
    idx = np.array([labels.index(v) for v in y])
    logloss = float(-np.log(np.clip(P[np.arange(len(y)), idx], 1e-12, 1)).mean())
    return acc, logloss


class _Trainer:
    """Fits one head configuration on row subsets of the store's matrix."""

    def __init__(
        self,
        head: str,
        X: np.ndarray,
        y: np.ndarray,
        seg_ids: np.ndarray,
        groups: np.ndarray,
        labels: list[str],
        pca: int | None,
        seed: int,
        params: dict | None,
        threads: int | None,
        fusion: dict | None = None,
    ):
        self.head, self.X, self.y, self.seg_ids, self.groups = head, X, y, seg_ids, groups
        self.labels, self.pca, self.seed, self.params, self.threads = labels, pca, seed, dict(params or {}), threads
        self.fusion = fusion

    def make(self, rows: np.ndarray, extra: dict | None = None):
        params = {**self.params, **(extra or {})}
        if self.threads:
            params.setdefault("n_jobs", self.threads)
        pca = self.pca
        if pca:  # PCA cannot have more components than rows or dimensions; >= D is pointless
            pca = min(pca, len(rows) - 1)
            if pca >= self.X.shape[1] or pca < 1:
                pca = None
        return (
            fusion_pipeline(self.head, params, pca, self.seed, self.fusion)
            if self.fusion
            else make_head(self.head, params, pca, self.seed)
        )

    def fit(self, rows: np.ndarray, extra: dict | None = None):
        model = self.make(rows, extra)
        with _thread_limit(self.threads):
            model.fit(self.X[rows], self.y[rows], head__groups=self.groups[rows])
        return model

    def proba(self, model, rows: np.ndarray) -> np.ndarray:
        with _thread_limit(self.threads):
            return _proba_in(self.labels, model, model.predict_proba(self.X[rows]))

    def search(self, fit_rows: np.ndarray, val_rows: np.ndarray) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Best grid point by validation-track accuracy (ties: lower segment log-loss).
        Hand-written rather than GridSearchCV: the score is per track, and sklearn's scorers do
        not receive the track ids of the rows they score."""
        scores = []
        for cand in SEARCH_SPACE[self.head]:
            m = self.fit(fit_rows, cand)
            acc, ll = _track_accuracy(self.seg_ids[val_rows], self.y[val_rows], self.proba(m, val_rows), self.labels)
            scores.append({"params": cand, "val_track_accuracy": acc, "val_log_loss": ll})
        best = max(scores, key=lambda s: (s["val_track_accuracy"], -s["val_log_loss"]))
        return dict(best["params"]), scores


def fit_head(
    backbone: str | None = None,
    head: str = "lr",
    *,
    cache: str | os.PathLike = "cache",
    store=None,
    tracks: pd.DataFrame | None = None,
    data: str | os.PathLike | None = None,
    audio_dir: str | os.PathLike | None = None,
    labels_from_tags=None,
    runs: str | os.PathLike = "runs",
    run_dir: str | os.PathLike | None = None,
    name: str | None = None,
    protocol: str = "auto",
    cv: int | None = None,
    test_size: float = 0.2,
    seed: int = 0,
    pca: int | None = None,
    search: bool = False,
    params: dict[str, Any] | None = None,
    output: str = "embedding",
    threads: int | None = None,
    folds: list | None = None,
    progress: Callable[[int, int], None] | None = None,
    fusion: str = "concat",
    weighting: str | list[float] = "equal",
) -> FitResult:
    """Train ``head`` on a backbone's stored embeddings, evaluate per track, write a run.

    backbone / store / cache: which embeddings (``open_store``).
    tracks (a track table) or data (a dataset path; audio_dir: FMA's audio folder for a
        tracks.csv; labels_from_tags: a ``taxonomy.TagLabels``, labels from the files' genre
        tags): the tracks to use, with their labels; by default the dataset extracted last into
        the store (never a mixture of datasets).
    protocol: "auto" (dataset split when present, else holdout), "holdout" (``test_size``),
        "split"; ``cv=K`` for stratified K-fold. Groups (artists) are respected when known.
    pca: components (None: the head's default, 0: none). search: pick hyper-parameters from
        ``heads.SEARCH_SPACE`` on 20 % validation tracks of each training part.
    params: head hyper-parameter overrides. threads: CPU threads (None: library defaults).
    folds: ready-made folds (the pipeline makes them once for every approach) instead of making
        them from the protocol; tracks missing from the store are left out of them.
    run_dir: exact run directory (default ``runs/<new run id>``). progress(done, total) per fit.
    fusion / weighting: for a fused backbone ("a+b", ``embedkit.fusion``; each part's store
        under ``cache``): "concat" (one head on the joined windows, parts weighted by
        ``weighting``: "equal" | "none" | numbers) or "stack" (``heads.fused.StackedHead``).
    Returns FitResult(run_dir, metrics, bundle).
    """
    from .evaluate import Evaluation, dataset_summary, make_folds, protocol_dict, with_validation, write_metrics
    from .runs import RunRecord, check_cv, spec_pretrained
    from .runs import run_id as new_run_id

    if head not in HEADS:
        raise ConfigError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}", field="head")
    check_cv(cv)
    if pca is not None and pca < 0:
        raise ConfigError(f"pca must be >= 0 (0 disables PCA), got {pca}", field="pca")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}", field="threads")
    fcfg = None
    if is_fused(backbone):
        from .backbones.fused import part_dims
        from .fusion import FusionConfig, check_fusion, open_stores

        if store is not None and not isinstance(store, FusedStores):
            raise ConfigError(
                "--store names one backbone's store; a fused backbone reads each part's store under --cache",
                field="store",
            )
        check_fusion(fusion, weighting)
        st = store if store is not None else open_stores(backbone, cache)
        smeta = {
            "backbone": st.spec(),
            "preprocess": st.preprocess(),
            "weights_id": st.weights_id(),
            "devices": st.metas[0].get("devices"),
        }
        # part weights belong to the concatenation; a stack weighs its parts by what it learns
        w = weighting if fusion == "concat" else None
        fcfg = FusionConfig(tuple(st.parts), tuple(part_dims(smeta["backbone"])), fusion, w)
    else:
        st = open_store(backbone, cache, store)
        smeta = st.meta()
    spec = smeta["backbone"]
    backbone = spec["name"]
    if data is not None and tracks is None:
        from .datasets import load_dataset

        tracks = load_dataset(data, audio_dir=audio_dir, labels_from_tags=labels_from_tags)
    if fcfg is not None:
        from .fusion import read_fused

        seg, X = read_fused(st, tracks, output)
    else:
        seg, X = read_embeddings(st, output, tracks)
    source = str(seg.attrs.get("source") or os.path.commonpath(list(seg["path"].unique())))
    table = _track_table(seg, source)
    if tracks is not None:  # what the dataset says of itself (tags: taxonomy, artists; a retrain: its labels)
        table.attrs.update({k: tracks.attrs[k] for k in ("taxonomy", "group_by", "labels_from") if k in tracks.attrs})
    if tracks is not None and tracks.attrs.get("synthetic"):
        table.attrs["synthetic"] = True
    proto = choose_protocol(table, cv, protocol)
    k = cv or 5
    if folds is None:
        folds = make_folds(table, proto, k, test_size, seed, val_size=0.2 if search else 0.0)
    else:  # the pipeline's folds, without the tracks the store lacks
        folds = with_validation([f.restricted(table["track_id"]) for f in folds], table, 0.2 if search else 0.0, seed)
    labels = sorted(table["label"].astype(str).unique())
    track_labels = dict(zip(table["track_id"], table["label"].astype(str)))
    paths = dict(zip(table["track_id"], table["path"]))
    fp_of = dict(zip(seg["track_id"], seg["fingerprint"]))
    seg_ids = seg["track_id"].to_numpy()
    y = seg["label"].astype(str).to_numpy()
    pinfo = protocol_dict(proto, k, seed, test_size, table)
    # Early stopping inside the heads holds out whole groups: artists when known, else tracks.
    groups = seg["group"].astype(str).to_numpy() if pinfo["grouped"] else seg_ids
    rows_of = {t: np.asarray(r) for t, r in seg.groupby("track_id", sort=False).indices.items()}
    rows = lambda ids: np.sort(np.concatenate([rows_of[t] for t in ids])) if len(ids) else np.zeros(0, dtype=int)  # noqa: E731
    pca_n = default_pca(head, X.shape[1]) if pca is None else (pca or None)
    if fcfg is not None and fcfg.fusion == "stack":
        pca_n = None  # each part's head takes its own default (heads.fused.StackedHead)
    trainer = _Trainer(
        head, X, y, seg_ids, groups, labels, pca_n, seed, params, threads, fcfg.head_fusion() if fcfg else None
    )

    name = name or head_run_name(backbone, head, fcfg.fusion if fcfg else "concat")
    ev = Evaluation(labels)
    n_fits = len(folds) + (1 if proto == "cv" else 0)
    if progress:
        progress(0, n_fits)
    train_seconds, infer_ms, chosen, model = 0.0, [], [], None
    for i, fold in enumerate(folds):
        # fold.val (the dataset's val split, or the part carved out for --search) is training
        # data: the search scores it, then the chosen configuration trains on train + val.
        train_ids = sorted([*fold.train, *fold.val])
        tr, te = rows(train_ids), rows(fold.test)
        extra: dict[str, Any] = {"n_train_tracks": len(train_ids), "n_test_tracks": len(fold.test)}
        t0 = time.perf_counter()
        best: dict[str, Any] = {}
        if search and fold.val:
            best, scores = trainer.search(rows(fold.train), rows(fold.val))
            extra.update(n_val_tracks=len(fold.val), search=scores)
        model = trainer.fit(tr, best)
        fit_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        P = trainer.proba(model, te)
        ms = 1000.0 * (time.perf_counter() - t1) / len(fold.test)
        train_seconds += fit_s
        infer_ms.append(ms)
        chosen.append(best)
        extra.update(train_seconds=fit_s, inference_ms_per_track=ms, params=best)
        ev.add_fold(fold.name, seg_ids[te], P, track_labels, paths, extra)
        if progress:
            progress(i + 1, n_fits)

    final_seconds = 0.0
    if proto == "cv":  # the deployable model: every track, the parameters most folds chose
        final_params = Counter(json.dumps(c, sort_keys=True) for c in chosen).most_common(1)[0][0]
        t0 = time.perf_counter()
        model = trainer.fit(np.arange(len(y)), json.loads(final_params))
        final_seconds = time.perf_counter() - t0
        trained_ids = sorted(table["track_id"])
        if progress:
            progress(n_fits, n_fits)
    else:
        trained_ids = sorted([*folds[0].train, *folds[0].val])

    m = ev.metrics()
    config = {
        **head_config(model),
        "search": bool(search),
        "search_space": SEARCH_SPACE[head] if search else None,
        "output": output,
        "threads": threads,
    }
    if fcfg is not None:
        config["fusion"] = fcfg.to_dict()
    scores = {
        k2: m[k2]
        for k2 in ("track_accuracy", "track_accuracy_vote", "track_accuracy_mean_prob", "segment_accuracy", "macro_f1")
        if k2 in m
    }
    scores.update({k2: m[k2] for k2 in m if k2.endswith("_std")})
    scores["protocol"] = pinfo
    run_id = Path(run_dir).name if run_dir is not None else new_run_id("head", name)
    bundle = HeadBundle(
        model=model,
        labels=labels,
        head=head,
        spec=spec,
        preprocess=smeta["preprocess"],
        weights_id=smeta.get("weights_id", "none"),
        output=output,
        config=config,
        scores=scores,
        run_id=run_id,
        trained_on={
            "n_tracks": len(trained_ids),
            "n_segments": int(sum(len(rows_of[t]) for t in trained_ids)),
            "track_ids": trained_ids,
            "fingerprints": sorted(set(fp_of[t] for t in trained_ids)),
            "what": "all tracks (after CV)" if proto == "cv" else f"the training part of the {proto}",
        },
    )
    if fcfg is not None:
        from .fusion import extraction_cost as fused_cost

        cost = fused_cost(st)
    else:
        cost = extraction_cost(st)
    n_segments = len(seg)
    record = RunRecord(
        run_id=run_id,
        kind="head",
        name=name,
        backbone=backbone,
        head=head,
        pretrained=spec_pretrained(spec, backbone),
        weights=str(spec.get("weights", "")),
        trains_backbone=False,
        needs_extraction=True,
        protocol=pinfo,
        dataset={**dataset_summary(table, n_segments), "missing_from_store": seg.attrs.get("missing_from_store", 0)},
        spec=spec,
        preprocess=smeta["preprocess"],
        config=config,
        train_seconds=train_seconds,
        inference_ms_per_track=float(np.mean(infer_ms)),
        n_params=n_params(model),
        weights_id=bundle.weights_id,
        device=dict(
            (smeta.get("devices") or {}).get("last") or {}
        ),  # where the embeddings were extracted (the head runs on the CPU)
    )
    metrics: dict[str, Any] = {
        **record.to_dict(),
        **m,
        "final_fit_seconds": final_seconds,
        "extract_ms_per_track": cost["ms_per_track"] if cost else None,
        "extraction": cost,
        "bundle": BUNDLE_FILE,
        "store": str(st.root) if fcfg is None else None,
    }
    if fcfg is not None:
        metrics["stores"] = {p: str(s.root) for p, s in zip(st.parts, st.stores)}
    if head == "lgbm" and hasattr(model.named_steps["head"], "n_leaves_"):
        metrics["n_leaves"] = model.named_steps["head"].n_leaves_
    # the not-music detector reads what the head reads: each track's windows of X
    features = {str(t): X[r] for t, r in rows_of.items()}
    # ... and, for its modulation term, the same windows of the training audio
    from .calibration import training_depths

    depths = training_depths(
        {str(t): paths[t] for t in rows_of if t in paths}, spec.get("sample_rate"), smeta.get("preprocess")
    )
    out = _write_run(
        Path(run_dir) if run_dir is not None else Path(runs) / run_id,
        bundle,
        metrics,
        ev,
        write_metrics,
        features,
        output,
        depths,
    )
    return FitResult(out, json.loads((out / "metrics.json").read_text()), bundle)


def _write_run(
    final: Path,
    bundle: HeadBundle,
    metrics: dict[str, Any],
    ev,
    write_metrics,
    features=None,
    output="embedding",
    depths: tuple[dict[str, np.ndarray] | None, str] = (None, "no training audio given"),
) -> Path:
    """Build the run directory under a temporary name, then rename it into place."""
    from .calibration import calibrate_run

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        metrics["model_bytes"] = save_bundle(tmp / BUNDLE_FILE, bundle)
        ev.predictions().to_csv(tmp / "predictions.csv", index=False)
        metrics["calibration"] = calibrate_run(
            ev, tmp, features, f"backbone {output} (the head's input)", depths[0], depths[1]
        )
        write_metrics(tmp, metrics)
        if final.exists():  # an unfinished run of the same id (the caller decided to redo it)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    bundle.path = str(final / BUNDLE_FILE)
    return final


# ---------------------------------------------------------------------------------------------
# prediction with a saved bundle


def predict_store(
    bundle_path: str | os.PathLike,
    *,
    cache: str | os.PathLike = "cache",
    store=None,
    tracks: pd.DataFrame | None = None,
    data: str | os.PathLike | None = None,
    audio_dir: str | os.PathLike | None = None,
) -> tuple[pd.DataFrame, HeadBundle]:
    """Per-track predictions of a saved head on a store's embeddings (the bundle's backbone
    store under ``cache`` unless ``store`` is given) for ``tracks`` (or the dataset at
    ``data``, as in ``fit_head``), by default the dataset extracted last into the store
    (``read_embeddings``). Refuses a store made with another backbone, weights or
    preprocessing. Returns (DataFrame track_id, path, label, pred, pred_vote, confidence,
    p_<label>..., in_training), bundle)."""
    b = load_bundle(bundle_path)
    if is_fused(b.spec.get("name")):  # every part's store under cache (embedkit.fusion)
        from .fusion import open_stores, read_fused

        if store is not None:
            raise ConfigError(
                "--store names one backbone's store; a fused head reads each part's store under --cache", field="store"
            )
        fs = open_stores(b.spec["name"], cache)
        smeta = {"backbone": fs.spec(), "preprocess": fs.preprocess(), "weights_id": fs.weights_id()}
    else:
        st = open_store(None if store is not None else b.spec["name"], cache, store)
        smeta = st.meta()
    b = load_bundle(
        bundle_path,
        expect_spec=smeta["backbone"],
        expect_preprocess=smeta["preprocess"],
        expect_weights_id=smeta.get("weights_id", "none"),
    )
    if data is not None and tracks is None:
        from .datasets import load_dataset

        tracks = load_dataset(data, audio_dir=audio_dir)
    if is_fused(b.spec.get("name")):
        seg, X = read_fused(fs, tracks, b.output)
    else:
        seg, X = read_embeddings(st, b.output, tracks)
    df = b.predict_tracks(seg["track_id"].to_numpy(), X)
    info = seg.drop_duplicates("track_id").set_index("track_id")
    df.insert(1, "path", info.loc[df["track_id"], "path"].to_numpy())
    df.insert(2, "label", info.loc[df["track_id"], "label"].to_numpy())
    df.attrs["source"] = seg.attrs.get("source", "")
    # Training audio is known by content: a track of another dataset with the same name is not it.
    if "fingerprints" in b.trained_on:
        df["in_training"] = info.loc[df["track_id"], "fingerprint"].isin(set(b.trained_on["fingerprints"])).to_numpy()
    else:  # a bundle written before fingerprints
        df["in_training"] = df["track_id"].isin(set(b.trained_on.get("track_ids", [])))
    return df, b
