"""Learning from a person's library: train on its own genre tags, tag the rest, move labels in and
out of the results database, and audit the tags that disagree with the audio.

    res = run_library("~/Music", RunPlan(), labels=TagLabels("map.toml"), db="library.sqlite")
    export_labels("library.sqlite", "labels.csv"); import_labels("library.sqlite", "fixes.csv")
    audit("library.sqlite", "runs/<id>", out="audit.csv")

- ``run_library``: ``embedkit run DATA --labels-from-tags``: the whole comparison on the tracks
  that carry a genre tag (``datasets.from_tags``: taxonomy, artist groups), then the best run
  tags the files without one into the results database: they are what gets tagged next.
- Labels live in the database's ``labels`` table (``resultsdb``): one row per (audio content,
  source, reviewer); a path given in a CSV is resolved to its content fingerprint, so the label
  follows the song wherever it moves.
- ``audit``: for each track the model has tagged whose file carries a genre tag, the tag mapped
  into the model's classes (the run's taxonomy record, else the normalised name); a disagreement
  scores ``1 - p(tagged class)`` under the calibrated probabilities, highest first.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import DatabaseError, EmbedkitError, first_line

LABEL_COLUMNS = (
    "fingerprint",
    "path",
    "label",
    "source",
    "reviewer",
    "model_id",
    "decision",
    "created_at",
    "updated_at",
)
AUDIT_COLUMNS = ("rank", "path", "fingerprint", "tag", "tag_class", "decision", "p_decision", "p_tag", "score")


def existing_db(db: str | os.PathLike) -> str:
    """``db`` when it is a URL or an existing file; a command that only reads a results database
    must not create an empty one by a typo."""
    s = str(db)
    if "://" not in s and not Path(s).expanduser().is_file():
        raise DatabaseError(f"{s}: no such results database")
    return s


# ---------------------------------------------------------------------------------------------
# Train on the library's own tags, tag the rest


@dataclass
class LibraryResult:
    """What ``run_library`` did: the pipeline's result, the run that tagged the untagged files
    (the best by track accuracy), and that tagging (None when every file had a tag)."""

    pipeline: Any  # pipeline.PipelineResult
    best: Any = None  # pipeline.RunOutcome
    tagged: Any = None  # batch.TagResult
    untagged: list[str] = field(default_factory=list)

    @property
    def taxonomy(self) -> dict[str, Any]:
        return dict(self.pipeline.tracks.attrs.get("taxonomy") or {})


def run_library(
    data: str | os.PathLike,
    plan,
    *,
    labels=None,
    db: str | os.PathLike | None = "library.sqlite",
    log: Callable[[str], None] | None = None,
    tag_workers: int | None = None,
    **run_kwargs,
) -> LibraryResult:
    """``pipeline.run_all`` on ``data`` labelled by its files' genre tags (``labels``: a
    ``taxonomy.TagLabels``, default options), then the best run tags the untagged files into
    ``db`` (None: not tagged). run_kwargs go to ``run_all`` (cache, runs, report, threads...)."""
    from ..pipeline import run_all
    from ..taxonomy import TagLabels
    from .batch import tag

    log = log or (lambda s: None)
    res = run_all(data, plan, labels_from_tags=labels or TagLabels(), log=log, **run_kwargs)
    out = LibraryResult(res, untagged=list(res.tracks.attrs.get("untagged") or []))
    tax = out.taxonomy
    log(
        "taxonomy: "
        + ", ".join(f"{c} ({n})" for c, n in tax.get("classes", {}).items())
        + "".join(f"; dropped {c}: {why}" for c, why in tax.get("dropped_classes", {}).items())
    )
    if res.runs:
        out.best = max(res.runs, key=lambda r: r.metrics.get("track_accuracy", 0.0))
    if out.untagged and db is not None and out.best is not None:
        log(f"tagging {len(out.untagged)} untagged file(s) with {out.best.name} into {db}")
        out.tagged = tag(out.best.run_dir, out.untagged, db=db, workers=tag_workers)
    return out


# ---------------------------------------------------------------------------------------------
# Labels: CSV in and out


def follow_writes(rdb) -> Callable[[str], str]:
    """fingerprint -> the fingerprint of the same file after embedkit's later tag writes into it
    (``tag_journal``: a write changes the bytes, not the audio), so a label given before
    ``tag --write-tags`` follows the file; a fingerprint never written is itself."""
    import sqlalchemy as sa

    if "tag_journal" not in sa.inspect(rdb.engine).get_table_names():
        return lambda fp: fp
    q = "SELECT fingerprint, after FROM tag_journal WHERE status = 'written' AND after IS NOT NULL ORDER BY id"
    with rdb.engine.connect() as c:
        nxt = {fp: after for fp, after in c.execute(sa.text(q)) if fp and after and fp != after}

    def follow(fp: str) -> str:
        seen = {fp}
        while fp in nxt and nxt[fp] not in seen:
            fp = nxt[fp]
            seen.add(fp)
        return fp

    return follow


def current_labels(rdb) -> dict[str, dict[str, Any]]:
    """{fingerprint now: its latest label row} (``ResultsDB.current_labels`` through
    ``follow_writes``; the row's ``fingerprint`` stays the one labelled)."""
    follow = follow_writes(rdb)
    out: dict[str, dict[str, Any]] = {}
    for r in rdb.label_rows():  # oldest change first: the latest wins
        out[follow(r["fingerprint"])] = r
    return out


def export_labels(db: str | os.PathLike, out: str | os.PathLike) -> int:
    """Every label row of ``db`` to a CSV (``LABEL_COLUMNS``); returns the number of rows."""
    from ..io import atomic_write_text
    from .resultsdb import ResultsDB

    with ResultsDB(existing_db(db)) as rdb:
        rows = rdb.label_rows()
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LABEL_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in LABEL_COLUMNS})
    atomic_write_text(Path(out), buf.getvalue())
    return len(rows)


@dataclass
class ImportResult:
    n_rows: int = 0  # rows read
    n_written: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)  # (CSV line, reason): not imported


def import_labels(
    db: str | os.PathLike, csv_path: str | os.PathLike, *, source: str = "import", reviewer: str | None = None
) -> ImportResult:
    """Labels from a CSV with ``label`` and ``fingerprint`` or ``path`` (resolved to the content
    fingerprint in the database's scheme); optional ``reviewer`` / ``source`` columns. All rows
    are written in one transaction, or none: a row whose file is missing is listed in
    ``problems`` and the rest go in. A CSV without the columns is an EmbedkitError."""
    from ..identity import fingerprint
    from .resultsdb import ResultsDB

    p = Path(csv_path)
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = [c.strip().lower() for c in (reader.fieldnames or [])]
            raw = list(reader)
    except FileNotFoundError:
        raise EmbedkitError(f"{p}: labels CSV not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise EmbedkitError(f"{p}: cannot read the labels CSV ({first_line(exc)})") from None
    if "label" not in cols or not ({"path", "fingerprint"} & set(cols)):
        raise EmbedkitError(
            f"{p}: a labels CSV needs a label column and a path or fingerprint column (has {', '.join(cols) or 'none'})"
        )
    res = ImportResult()
    rows = []
    with ResultsDB(db) as rdb:
        for line, r in enumerate(raw, start=2):
            r = {str(k).strip().lower(): (v or "").strip() for k, v in r.items() if k is not None}
            res.n_rows += 1
            label = r.get("label", "")
            if not label:
                res.problems.append((line, "empty label"))
                continue
            fp, path = r.get("fingerprint") or None, r.get("path") or None
            if fp is None and path is None:
                res.problems.append((line, "no path and no fingerprint"))
                continue
            if fp is None:
                try:
                    fp = fingerprint(Path(path).expanduser().resolve(), scheme=rdb.scheme)
                except (OSError, EmbedkitError) as exc:  # vanished, unreadable: this row only
                    why = first_line(exc)
                    res.problems.append((line, why if why.startswith(str(path)) else f"{path}: {why}"))
                    continue
            rows.append(
                {
                    "fingerprint": fp,
                    "label": label,
                    "source": r.get("source") or source,
                    "reviewer": reviewer or r.get("reviewer") or "",
                    "path": str(Path(path).expanduser().resolve()) if path else None,
                }
            )
        res.n_written = rdb.put_labels(rows)
    return res


# ---------------------------------------------------------------------------------------------
# Audit: a file's own genre tag against a confident decision


def audit_scores(prob: np.ndarray, decision: np.ndarray, tagged: np.ndarray) -> np.ndarray:
    """Disagreement score per track: ``1 - p[tagged]`` where the decision is another class, 0
    where they agree.

    prob: [N, C] calibrated class probabilities; decision / tagged: [N] class indices. A high
    score is a tag the model finds unlikely. Ranking by it found 81.5 % real flips in the top N
    of gtzan_mini with 10 % of its tags flipped, against 70 % for ``p[decision] - p[tagged]``
    (bench/bench_library.py, 20 repeats)."""
    i = np.arange(len(prob))
    return np.where(decision == tagged, 0.0, 1.0 - prob[i, tagged])


def _class_resolver(labels: list[str], taxonomy: dict[str, Any] | None) -> Callable[[list[str]], str | None]:
    """Raw genre values -> a class of the model (the run's taxonomy mapping first, then the
    normalised name); None when no value names one."""
    from ..taxonomy import genre_key

    by_key = {genre_key(c): c for c in labels}
    mapping = {genre_key(k): v for k, v in ((taxonomy or {}).get("mapping") or {}).items()}

    def resolve(values: list[str]) -> str | None:
        for v in values:
            k = genre_key(v)
            if k in mapping:
                c = mapping[k]
                if c in labels:
                    return c
                if c is None:
                    continue
            if k in by_key:
                return by_key[k]
        return None

    return resolve


def audit(
    db: str | os.PathLike, model: str | os.PathLike | None = None, *, out: str | os.PathLike | None = None
) -> list[dict[str, Any]]:
    """Tracks of ``db`` whose own genre tag disagrees with the model's decision, most suspicious
    first (``AUDIT_COLUMNS``); ``model``: a run directory or model id (default: the only model in
    the database, else an error naming them). Files that vanished, or whose tag names no class
    of the model, are left out. out: also write them as CSV."""
    from ..errors import TagWriteError
    from ..tags import read_library_tags
    from .resultsdb import ResultsDB

    with ResultsDB(existing_db(db)) as rdb:
        model_id, labels, artefact = _pick_model(rdb, model)
        rows = rdb.rows(model_id)
    taxonomy = _run_taxonomy(artefact)
    resolve = _class_resolver(labels, taxonomy)
    index = {c: i for i, c in enumerate(labels)}
    found = []
    for r in _newest_by_path(rows).values():  # a path tagged again after an edit: its latest row
        probs = r.get("probabilities")
        if not probs or r.get("decision") in (None, "uncertain"):
            continue
        try:
            genres = read_library_tags(r["path"]).genres
        except TagWriteError:
            continue
        if not genres:
            continue
        tag_class = resolve(genres)
        if tag_class is None:
            continue
        p = _prob_vector(probs, labels)
        d = index.get(r["decision"].split(";")[0].strip(), int(np.argmax(p)))
        score = float(audit_scores(p[None], np.array([d]), np.array([index[tag_class]]))[0])
        if score <= 0:
            continue
        found.append(
            {
                "path": r["path"],
                "fingerprint": r["fingerprint"],
                "tag": "; ".join(genres),
                "tag_class": tag_class,
                "decision": labels[d],
                "p_decision": round(float(p[d]), 4),
                "p_tag": round(float(p[index[tag_class]]), 4),
                "score": round(score, 4),
            }
        )
    found.sort(key=lambda x: (-x["score"], x["path"]))
    for i, f in enumerate(found, 1):
        f["rank"] = i
    if out is not None:
        import io

        from ..io import atomic_write_text

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=AUDIT_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(found)
        atomic_write_text(Path(out), buf.getvalue())
    return found


def _prob_vector(probs, labels: list[str]) -> np.ndarray:
    if isinstance(probs, dict):
        return np.array([float(probs.get(c, 0.0)) for c in labels])
    return np.asarray(probs, dtype=float)


def _pick_model(rdb, model) -> tuple[str, list[str], str | None]:
    """(model_id, labels, artefact path) of ``model`` (run dir / artefact / model id) in ``rdb``."""
    import sqlalchemy as sa

    with rdb.engine.connect() as c:
        known = [dict(r._mapping) for r in c.execute(sa.select(rdb.models))]
    if not known:
        raise DatabaseError(f"{rdb.url}: no model has tagged anything here yet (run `embedkit tag` first)")
    if model is None:
        if len(known) > 1:
            raise EmbedkitError(
                f"{len(known)} models have tagged this database; name one with --model ({', '.join(k['model_id'][:12] for k in known)})"
            )
        m = known[0]
    else:
        s = str(model)
        hit = [k for k in known if k["model_id"].startswith(s)]
        if not hit and Path(s).exists():
            from .tagger import model_id_of

            mid = model_id_of(s)
            hit = [k for k in known if k["model_id"] == mid]
        if not hit:
            raise EmbedkitError(f"{s}: this model has tagged nothing in the database")
        m = hit[0]
    return m["model_id"], [str(x) for x in m["labels"] or []], m.get("artefact")


def _run_taxonomy(artefact: str | None) -> dict[str, Any] | None:
    """The taxonomy record of the run an artefact belongs to (metrics.json beside or above it)."""
    import json

    if not artefact:
        return None
    p = Path(artefact)
    for d in (p, *p.parents[:2]):
        f = d / "metrics.json" if d.is_dir() else None
        if f is not None and f.is_file():
            try:
                return (json.loads(f.read_text()).get("dataset") or {}).get("taxonomy")
            except (OSError, ValueError):
                return None
    return None


# ---------------------------------------------------------------------------------------------
# Retrain on the reviewed labels, and promote

#: labels kept apart as an unbiased audit of live accuracy: never trained on
AUDIT_SOURCE = "audit-sample"


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95 % by default) of a proportion k / n; (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return float(max(0.0, c - h)), float(min(1.0, c + h))


@dataclass
class RetrainResult:
    """What ``retrain`` did: the new run, how many label rows it used, what it reused, and both
    models' accuracy on the audit labels (neither trained on them) with 95 % Wilson intervals."""

    run_dir: Path
    metrics: dict[str, Any]
    n_base: int  # tracks of the run's dataset kept
    n_labelled: int  # reviewed labels used (new tracks + relabelled ones)
    n_relabelled: int  # of those, tracks of the dataset whose label a person changed
    n_reused: int  # training + audit tracks whose embeddings were already stored
    n_extracted: int  # decoded now (labelled files not yet in the store)
    audit: dict[str, Any] = field(default_factory=dict)  # old / new: accuracy, ci, n
    seconds: float = 0.0

    @property
    def n_missing(self) -> int:
        """Training tracks left out because their embeddings are not in the store (a labelled
        file that changed since it was labelled, outside embedkit's own tag writes)."""
        return int((self.metrics.get("dataset") or {}).get("missing_from_store") or 0)


def _run_metrics(run: str | os.PathLike) -> dict[str, Any]:
    import json

    f = Path(run) / "metrics.json"
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise EmbedkitError(f"{run}: not a finished run (no metrics.json)") from None
    except (OSError, ValueError) as exc:
        raise EmbedkitError(f"{f}: unreadable ({first_line(exc)})") from None


def retrain(
    run: str | os.PathLike,
    db: str | os.PathLike,
    *,
    cache: str | os.PathLike = "cache",
    runs: str | os.PathLike = "runs",
    threads: int | None = None,
    workers: int | None = None,
    log: Callable[[str], None] | None = None,
) -> RetrainResult:
    """A new head run on ``run``'s dataset plus the labels in ``db`` (a person's label wins over
    the dataset's for the same audio; ``audit-sample`` labels are held out), on the embeddings
    already in the run's store (read by fingerprint: nothing stored is decoded again; labelled
    files not yet in the store are extracted once). The new run uses the old one's head, its
    hyper-parameters and protocol; both models are then scored on the audit labels."""
    import time

    import pandas as pd

    from ..extract import extract
    from ..fit import fit_head, open_store, predict_store
    from .resultsdb import ResultsDB

    t0 = time.perf_counter()
    log = log or (lambda s: None)
    m = _run_metrics(run)
    if m.get("kind") in NETWORK_KINDS:
        return _retrain_network(run, m, db, cache=cache, runs=runs, threads=threads, workers=workers, log=log)
    if m.get("kind") != "head":
        raise EmbedkitError(
            f"{run}: retrain works on head, cnn and finetune runs (this run is {m.get('kind')!r}): "
            "train a new run on the dataset plus `embedkit labels export` instead"
        )
    fusion = (m.get("config") or {}).get("fusion")
    if fusion:
        raise EmbedkitError(
            f"{run}: retrain does not take fused runs ({'+'.join(fusion.get('parts') or [])}) yet: retrain a "
            "run of one backbone, or fit the fused head on a dataset that holds the labelled files"
        )
    store_dir = Path(m.get("store") or "")
    if not store_dir.is_dir():
        raise EmbedkitError(f"{run}: its embedding store {store_dir} is not here (run retrain where the run was made)")
    st = open_store(None, cache, store_dir)
    source = m["dataset"].get("source")
    key = next((k for k, d in st.datasets().items() if d.get("source") == source), None)
    if key is None:  # never another dataset of the store in its place
        raise EmbedkitError(f"{run}: its dataset {source or '(not recorded)'} is not recorded in the store {st.root}")
    base = st.dataset_tracks(key)
    with ResultsDB(existing_db(db)) as rdb:
        labels = current_labels(rdb)  # keyed by the file's fingerprint now (after tag writes)
        where = {r["fingerprint"]: r["path"] for r in rdb.rows()}
    if not labels:
        raise EmbedkitError(f"{db}: no labels to retrain on (review some tracks, or `embedkit labels import`)")
    base, added, audit_t, n_relabelled = _labelled_tracks(base, labels, where, base["fingerprint"].tolist())
    # the embeddings: every stored one is reused by fingerprint; the rest is extracted once
    done, _ = st.done_fingerprints()
    both = pd.concat([added, audit_t], ignore_index=True)
    missing = both[~both["fingerprint"].isin(done)]
    n_extracted = 0
    if len(missing):
        gone = [p for p in missing["path"] if not p or not Path(p).exists()]
        if gone:
            raise EmbedkitError(f"{gone[0] or 'a labelled track'}: labelled file not found and not in the store")
        log(f"extracting {len(missing)} labelled file(s) not yet in {st.root}")
        t = missing.drop(columns=["fingerprint"]).reset_index(drop=True)
        t.attrs["source"] = f"labels of {db}"
        res = extract(t, st.spec["name"], cache=cache, prep=st.preprocess, workers=workers)
        n_extracted = res.n_extracted
    tracks = pd.concat([base, added], ignore_index=True)
    # the source stays the dataset's (a retrained run retrains in turn); the labels' database
    # is recorded beside it
    tracks.attrs.update(base.attrs, labels_from=str(db))
    proto = m.get("protocol") or {}
    cfg = m.get("config") or {}
    log(f"retraining {m.get('name')} on {len(base)} + {len(added)} track(s), {n_relabelled} relabelled")
    fit = fit_head(
        st.spec["name"],
        m["head"],
        store=st,
        tracks=tracks,
        runs=runs,
        protocol={"split": "split", "holdout": "holdout"}.get(proto.get("type"), "auto"),
        cv=proto.get("k") if proto.get("type") == "cv" else None,
        test_size=proto.get("test_size") or 0.2,
        seed=int(proto.get("seed") or 0),
        pca=cfg.get("pca"),
        params=cfg.get("head"),
        output=cfg.get("output", "embedding"),
        threads=threads,
    )
    audit: dict[str, Any] = {}
    if len(audit_t):
        for name, bundle in (("old", Path(run)), ("new", fit.run_dir)):
            df, _ = predict_store(bundle, store=st, tracks=audit_t.copy())
            truth = audit_t.set_index("track_id")["label"]
            k = int((df.set_index("track_id")["pred"] == truth.reindex(df["track_id"]).to_numpy()).sum())
            audit[name] = {"accuracy": k / len(df), "ci95": wilson(k, len(df)), "n": int(len(df))}
    n_stored = int(both["fingerprint"].isin(done).sum()) + len(base)
    return RetrainResult(
        fit.run_dir,
        fit.metrics,
        len(base),
        len(added) + n_relabelled,
        n_relabelled,
        n_stored,
        n_extracted,
        audit,
        time.perf_counter() - t0,
    )


#: run kinds that train a network on decoded audio (``embedkit train-cnn`` / ``finetune``)
NETWORK_KINDS = ("cnn", "finetune")


def _labelled_tracks(base, labels, where: dict[str, str], fps: list[str]):
    """(base relabelled without the held-out tracks, added, audit, n_relabelled) from the label
    rows of ``db``: a person's label replaces the dataset's for the same audio (``fps``: the
    base tracks' fingerprints now), ``audit-sample`` labels are held out."""
    import pandas as pd

    held = {fp: r for fp, r in labels.items() if r["source"] == AUDIT_SOURCE}
    train = {fp: r for fp, r in labels.items() if r["source"] != AUDIT_SOURCE}
    attrs = dict(base.attrs)
    base = base.assign(fingerprint=fps)
    base = base[~base["fingerprint"].isin(held)].copy()
    relabel = base["fingerprint"].map({fp: r["label"] for fp, r in train.items()})
    n_relabelled = int((relabel.notna() & (relabel != base["label"])).sum())
    base["label"] = relabel.where(relabel.notna(), base["label"])
    base.attrs = attrs

    def table(rows: dict[str, dict[str, Any]]) -> pd.DataFrame:
        out = []
        for fp, r in rows.items():
            path = r.get("path") or where.get(fp)
            out.append(
                {
                    "track_id": f"labelled/{fp}",
                    "path": str(path or ""),
                    "label": r["label"],
                    "split": None,
                    "group": f"track:{fp}",
                    "fingerprint": fp,
                }
            )
        return pd.DataFrame(out, columns=["track_id", "path", "label", "split", "group", "fingerprint"])

    in_base = set(base["fingerprint"].tolist())
    return base, table({fp: r for fp, r in train.items() if fp not in in_base}), table(held), n_relabelled


def _retrain_network(
    run: str | os.PathLike,
    m: dict[str, Any],
    db: str | os.PathLike,
    *,
    cache: str | os.PathLike,
    runs: str | os.PathLike,
    threads: int | None,
    workers: int | None,
    log: Callable[[str], None],
) -> RetrainResult:
    """``retrain`` of a scratch-CNN or fine-tune run: the run's dataset read again from its
    recorded source (through its taxonomy record when it learned from tags), relabelled and
    extended by the labels in ``db``, trained with the run's recipe as recorded in its
    metrics.json (training, model / fine-tune, feature, audio and augmentation configs, and
    protocol); a network trains on decoded audio, so the labelled tracks are decoded (through
    the clip cache under ``cache``). Old and new models are then scored on the audit labels,
    each file decoded the way its run was evaluated."""
    import inspect
    import time
    from dataclasses import fields

    import pandas as pd

    from ..config import AudioConfig
    from ..datasets import load_dataset
    from ..identity import fingerprint
    from ..taxonomy import TagLabels
    from .resultsdb import ResultsDB
    from .tagger import load_tagger

    t0 = time.perf_counter()
    ds = m.get("dataset") or {}
    source, tax = str(ds.get("source") or ""), ds.get("taxonomy") or None
    if not source or not Path(source).exists():
        raise EmbedkitError(f"{run}: its dataset {source or '(not recorded)'} is not here (retrain where it was made)")
    tag_labels = TagLabels(tax.get("genre_map"), int(tax.get("min_tracks") or 1)) if tax else None
    base = load_dataset(source, labels_from_tags=tag_labels)
    with ResultsDB(existing_db(db)) as rdb:
        labels = current_labels(rdb)
        where = {r["fingerprint"]: r["path"] for r in rdb.rows()}
        scheme = rdb.scheme
    if not labels:
        raise EmbedkitError(f"{db}: no labels to retrain on (review some tracks, or `embedkit labels import`)")
    fps = [fingerprint(pth, scheme=scheme) for pth in base["path"]]
    base, added, audit_t, n_relabelled = _labelled_tracks(base, labels, where, fps)
    gone = [str(pth) for pth in [*added["path"], *audit_t["path"]] if not pth or not Path(pth).is_file()]
    if gone:
        raise EmbedkitError(f"{gone[0] or 'a labelled track'}: labelled file not found (a network retrains from audio)")
    tracks = pd.concat([t.drop(columns=["fingerprint"]) for t in (base, added)], ignore_index=True)
    tracks.attrs.update(base.attrs, labels_from=str(db))  # the source stays the dataset's (as for heads)

    def rebuild(cls, d):  # only the fields this version knows: a recipe recorded by another one still loads
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})

    from ..cnn.augment import AugmentConfig
    from ..cnn.loop import TrainConfig

    cfg, proto = m.get("config") or {}, m.get("protocol") or {}
    prep = m.get("preprocess") or {}
    common = dict(
        train=rebuild(TrainConfig, cfg.get("train")),
        audio_cfg=rebuild(AudioConfig, prep.get("audio")),
        augment=AugmentConfig.from_dict(cfg.get("augment") or {}),
        cv=proto.get("k") if proto.get("type") == "cv" else None,
        test_size=proto.get("test_size") or 0.2,
        runs_dir=runs,
        cache=cache,
        threads=threads,
        workers=workers,
    )
    log(f"retraining {m.get('name')} ({m['kind']}) on {len(base)} + {len(added)} track(s), {n_relabelled} relabelled")
    if m["kind"] == "cnn":
        from ..cnn.features import FeatureConfig
        from ..cnn.model import CNNConfig
        from ..cnn.train import train_cnn

        # the network's shape as recorded, through the arguments train_cnn takes (classes: the new labels')
        net = CNNConfig.from_dict({**(cfg.get("model") or {}), "n_classes": tracks["label"].nunique()})
        takes = inspect.signature(train_cnn).parameters
        shape = {k: v for k, v in vars(net).items() if k in takes and k != "n_classes"}
        feats = rebuild(FeatureConfig, (m.get("spec") or {}).get("features"))
        res = train_cnn(tracks, features=feats, **shape, **common)
    else:
        from ..cnn.finetune import FinetuneConfig, finetune

        ft = rebuild(FinetuneConfig, cfg.get("finetune"))
        res = finetune(tracks, ft.backbone, ft=ft, **common)
    audit: dict[str, Any] = {}
    if len(audit_t):
        for name, d in (("old", Path(run)), ("new", res.run_dir)):
            tagger = load_tagger(d)
            k = sum(
                tagger.labels[int(np.argmax(tagger.predict_file(pth)[1]))] == lab
                for pth, lab in zip(audit_t["path"], audit_t["label"])
            )
            audit[name] = {"accuracy": k / len(audit_t), "ci95": wilson(k, len(audit_t)), "n": int(len(audit_t))}
    return RetrainResult(
        res.run_dir,
        res.metrics,
        len(base),
        len(added) + n_relabelled,
        n_relabelled,
        0,  # nothing stored to reuse: a network trains on the decoded audio (the clip cache keeps it)
        0,
        audit,
        time.perf_counter() - t0,
    )


@dataclass
class PromoteResult:
    model_id: str
    n_tracks: int  # tracks the previous model had tagged
    n_changed: int  # of those, tracks whose decision the new model changes
    tagged: Any = None  # batch.TagResult


def promote(
    run: str | os.PathLike,
    db: str | os.PathLike,
    *,
    previous: str | None = None,
    write_tags: bool = False,
    workers: int | None = None,
) -> PromoteResult:
    """Make ``run`` the library's current model: it tags every track the previous model (model
    id ``previous``, default: the database's current model, else the only other one) tagged,
    the database records it as current (``tag_meta.current_model``), and the result counts the
    decisions that changed (by path: a file whose tags were written since is the same track).

    write_tags: the changed decisions go into the files' tags (``tag --write-tags`` on those
    files only; the others keep the previous model's genre and provenance), a genre a person set
    is kept, and the new model's writes are journalled like any other. One untag undoes it:
    ``embedkit untag NEW_RUN`` puts the files back as they were before the promotion (the
    previous model's genres), ``embedkit untag OLD_RUN`` puts back the originals (over both
    models' writes), byte for byte either way."""
    import sqlalchemy as sa

    from .batch import tag
    from .resultsdb import ResultsDB
    from .tagger import model_id_of

    new_id = model_id_of(run)
    with ResultsDB(existing_db(db)) as rdb:
        with rdb.engine.connect() as c:
            cur = c.execute(sa.select(rdb.info.c.value).where(rdb.info.c.name == "current_model")).scalar()
            ids = [r[0] for r in c.execute(sa.select(rdb.models.c.model_id)) if r[0] != new_id]
        old_id = previous or (cur if cur and cur != new_id else None) or (ids[0] if len(ids) == 1 else None)
        if old_id is None:
            raise EmbedkitError(
                f"{db}: name the model to replace (--previous; models here: {', '.join(i[:12] for i in ids) or 'none'})"
            )
        old = {r["fingerprint"]: r for r in rdb.rows(old_id)}
    paths = sorted({r["path"] for r in old.values() if Path(r["path"]).exists()})
    res = tag(run, paths, db=db, workers=workers)
    with ResultsDB(db) as rdb:
        new = _newest_by_path(rdb.rows(new_id))
        rdb._retry(lambda c: rdb._upsert(c, rdb.info, [{"name": "current_model", "value": new_id}], ("name",)))
    before = _newest_by_path(old.values())
    changed = sorted(p for p, r in before.items() if p in new and new[p]["decision"] != r["decision"])
    if write_tags and changed:  # the rows are there now: this pass decodes nothing, it writes the files
        from .writeback import FileTagOptions

        res = tag(run, changed, db=db, workers=workers, file_tags=FileTagOptions())
    return PromoteResult(new_id, len(before), len(changed), res)


def _newest_by_path(rows) -> dict[str, dict[str, Any]]:
    """{path: its latest row} (a file tagged again after its tags were written is one track)."""
    out: dict[str, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda x: (str(x.get("updated_at") or ""), x["fingerprint"])):
        out[r["path"]] = r
    return out
