"""Learning from a library, simulated on a labelled set: the review queue's choice of tracks
against a random choice (active learning), and the audit of genre tags against the audio.

    python bench/bench_library.py --data ../shared/data/gtzan_mini --cache /tmp/al/cache

Both simulations run on each track's mean embedding (``--backbone``, default musicnn-msd; the
store is extracted first when incomplete) with a standardised logistic regression, the head
``embedkit fit --head lr`` uses, fitted on track vectors so the thousands of fits stay fast.

- Active learning (``active_learning``): per repeat, a stratified 80/20 split into a pool and
  a test part, shared by every policy; ``--start`` labels, then rounds of ``--batch`` chosen
  from the unlabelled pool by ``review.choose_to_label`` (the review page's own function, its
  cold start included), by the smallest margins after a random start, or uniformly at random;
  test accuracy after every round. Reported: the mean curves, and for targets of 90 / 95 / 98 %
  of the accuracy with the whole pool labelled, the labels each policy needs and the saving
  against random with a bootstrap interval; ``--into RUNS_DIR`` leaves the curves for the report.
- Audit: per repeat, 10 % of the tracks get a wrong genre (uniform over the other classes);
  5-fold cross-fitted probabilities from the noisy labels; tracks ranked by
  ``library.audit_scores`` (1 - p[tag] where the decision differs; two other scores beside it);
  precision of the top N (N = flips).
- Retrain (``--retrain-tracks``, default 10,000): ``library.retrain`` of an lr head run on that
  many stored tracks plus 500 labelled ones (6 segments x 200-d each, synthetic embeddings
  written straight into a store): seconds, on 2 pinned cores.

Results go to bench/results/bench_library.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def track_vectors(data: Path, backbone: str, cache: Path, workers: int | None):
    """(X [N, D] mean embedding per track, y [N] int, class names, groups)."""
    from embedkit.datasets import load_dataset
    from embedkit.extract import extract
    from embedkit.fit import read_embeddings

    tracks = load_dataset(data)
    res = extract(tracks, backbone, cache=cache, workers=workers)
    seg, X = read_embeddings(res.store, "embedding", tracks)
    ids = seg["track_id"].to_numpy()
    order = list(dict.fromkeys(ids))
    idx = {t: i for i, t in enumerate(order)}
    rows = np.array([idx[t] for t in ids])
    V = np.zeros((len(order), X.shape[1]))
    np.add.at(V, rows, X)
    V /= np.bincount(rows)[:, None]
    lab = seg.drop_duplicates("track_id").set_index("track_id").loc[order, "label"].to_numpy()
    classes = sorted(set(lab))
    return V, np.array([classes.index(c) for c in lab]), classes


def _model():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=500))


def _proba(model, X, n_classes: int) -> np.ndarray:
    p = np.zeros((len(X), n_classes))
    p[:, model.classes_] = model.predict_proba(X)
    return p


POLICIES = ("queue", "margin", "random")


def labels_needed(budgets, curve, target: float) -> float | None:
    """Labels at which ``curve`` (mean accuracy per budget) first reaches ``target``, linearly
    interpolated between the budgets either side; None when it never does."""
    for i, a in enumerate(curve):
        if a >= target:
            if i == 0:
                return float(budgets[0])
            a0 = curve[i - 1]
            return float(budgets[i - 1] + (target - a0) / (a - a0) * (budgets[i] - budgets[i - 1]))
    return None


def labels_held(budgets, curve, target: float) -> float | None:
    """The stricter reading: labels from which on ``curve`` stays at or above ``target``."""
    below = [i for i, a in enumerate(curve) if a < target]
    if not below:
        return float(budgets[0])
    if below[-1] == len(curve) - 1:
        return None
    return labels_needed(budgets[below[-1] :], curve[below[-1] :], target)


def active_learning(X, y, n_classes, repeats: int, start: int, batch: int, seed: int, boot: int = 2000) -> dict:
    """Per repeat, one stratified 80/20 split shared by every policy; each labels ``start``
    tracks, then rounds of ``batch``, until the pool is labelled:

    - queue: ``review.choose_to_label``, the review page's function (the first ``start`` with
      no model: its cold start; then the model's probabilities, the labelled tracks' vectors);
    - margin: random start, then the ``batch`` smallest margins (classic uncertainty sampling);
    - random: random start (the same tracks as margin's), then uniformly at random.

    Reported: mean (and std) test accuracy per budget; for targets of 90 / 95 / 98 % of the
    whole-pool accuracy, the labels each policy needs on the mean curve (first reached, linear
    between budgets; and the stricter "stays above from") and the saving against random with a
    90 % bootstrap interval over the repeats."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # thousands of fits on 80 tracks: threads only wait on each other
        return _active_learning(X, y, n_classes, repeats, start, batch, seed, boot)


def _active_learning(X, y, n_classes, repeats, start, batch, seed, boot) -> dict:
    from sklearn.model_selection import train_test_split

    from embedkit.deploy.review import choose_to_label, margin_uncertainty

    acc = {p: [] for p in POLICIES}
    full = []
    budgets = list(range(start, int(round(0.8 * len(y))) + batch, batch))
    for r in range(repeats):
        pool, test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=seed + r)
        full.append(_model().fit(X[pool], y[pool]).score(X[test], y[test]))
        first = list(np.random.default_rng(seed + r).choice(pool, start, replace=False))
        for policy in POLICIES:
            prng = np.random.default_rng(seed + 1000 + r)
            if policy == "queue":
                labelled = [int(pool[i]) for i in choose_to_label(None, start, features=X[pool], seed=seed + r)]
            else:
                labelled = list(first)
            accs, sizes = [], []
            while True:
                m = _model().fit(X[labelled], y[labelled])
                accs.append(m.score(X[test], y[test]))
                sizes.append(len(labelled))
                taken = set(labelled)
                rest = np.array([i for i in pool if i not in taken])
                if not len(rest):
                    break
                k = min(batch, len(rest))
                p = _proba(m, X[rest], n_classes)
                if policy == "queue":
                    pick = rest[choose_to_label(p, k, features=X[rest], labelled=X[labelled], seed=seed + r)]
                elif policy == "margin":
                    pick = rest[np.argsort(-margin_uncertainty(p), kind="stable")[:k]]
                else:
                    pick = prng.choice(rest, k, replace=False)
                labelled += [int(i) for i in pick]
            acc[policy].append(accs)
            budgets = sizes
    A = {p: np.array(v) for p, v in acc.items()}  # [repeats, budgets]
    full_acc = float(np.mean(full))
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, repeats, repeats) for _ in range(boot)]
    targets = {}
    for frac in (0.90, 0.95, 0.98):
        t = frac * full_acc
        mean = {p: A[p].mean(0) for p in A}
        need = {p: labels_needed(budgets, mean[p], t) for p in A}
        held = {p: labels_held(budgets, mean[p], t) for p in A}

        def saving(n):
            return None if n["queue"] is None or n["random"] is None else 1 - n["queue"] / n["random"]

        boots = []
        for d in draws:  # the same resampled repeats for both policies (the splits are shared)
            q = labels_needed(budgets, A["queue"][d].mean(0), t)
            rr = labels_needed(budgets, A["random"][d].mean(0), t)
            boots.append(np.nan if q is None or rr is None else 1 - q / rr)
        boots = np.array(boots)
        ok = boots[np.isfinite(boots)]
        targets[f"{frac:.0%} of full"] = {
            "accuracy": t,
            **need,
            "saving": saving(need),
            "saving_ci90": [float(np.quantile(ok, 0.05)), float(np.quantile(ok, 0.95))] if len(ok) else None,
            "held": held,
            "saving_held": saving(held),
        }
    return {
        "budgets": budgets,
        **{p: A[p].mean(0).round(4).tolist() for p in A},
        "std": {p: A[p].std(0).round(4).tolist() for p in A},
        "full_pool_accuracy": full_acc,
        "targets": targets,
        "repeats": repeats,
        "start": start,
        "batch": batch,
        "goal": 0.30,
        "protocol": (
            f"{repeats} repeats of a stratified {len(y) - len(test)}-track pool / {len(test)}-track test split, "
            f"shared by both policies; {start} labels to start (the queue's own cold start, random's at random), "
            f"then rounds of {batch}; the lr head on track-mean embeddings"
        ),
    }


def audit_simulation(X, y, n_classes, repeats: int, flip: float, seed: int) -> dict:
    from sklearn.model_selection import StratifiedKFold

    from embedkit.deploy.library import audit_scores

    precisions: dict[str, list[float]] = {}
    base = []
    for r in range(repeats):
        rng = np.random.default_rng(seed + r)
        n_flip = int(round(flip * len(y)))
        flipped = rng.choice(len(y), n_flip, replace=False)
        noisy = y.copy()
        for i in flipped:
            noisy[i] = rng.choice([c for c in range(n_classes) if c != y[i]])
        P = np.zeros((len(y), n_classes))
        for tr, te in StratifiedKFold(5, shuffle=True, random_state=seed + r).split(X, noisy):
            P[te] = _proba(_model().fit(X[tr], noisy[tr]), X[te], n_classes)
        p_tag = P[np.arange(len(y)), noisy]
        scores = {
            "audit": audit_scores(P, P.argmax(1), noisy),  # what `embedkit audit` ranks by
            "1-p_tag (all tracks)": 1.0 - p_tag,
            "p_decision-p_tag": P.max(1) - p_tag,
        }
        for name, score in scores.items():
            top = np.argsort(-score, kind="stable")[:n_flip]
            precisions.setdefault(name, []).append(len(set(top.tolist()) & set(flipped.tolist())) / n_flip)
        base.append(float((P.argmax(1) == y).mean()))
    out = {"flip": flip, "repeats": repeats, "accuracy_vs_true_labels": float(np.mean(base))}
    for name, v in precisions.items():
        out[name] = {"mean": float(np.mean(v)), "std": float(np.std(v)), "min": float(np.min(v))}
    return out


def retrain_cost(n_tracks: int, n_labels: int, root: Path, classes: int = 10, dim: int = 200) -> dict:
    """``library.retrain`` of an lr head run on a store of ``n_tracks`` dataset tracks plus
    ``n_labels`` labelled ones (6 segments each, ``dim``-d synthetic embeddings, written
    directly), the labels in a results database: seconds (nothing is decoded)."""
    import shutil

    import pandas as pd
    import pyarrow as pa

    from embedkit.backbones import get_spec
    from embedkit.config import PreprocessConfig
    from embedkit.deploy.library import retrain
    from embedkit.deploy.resultsdb import ResultsDB
    from embedkit.fit import fit_head
    from embedkit.store import Store

    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    n, seg = n_tracks + n_labels, 6
    lab = rng.integers(0, classes, n)
    means = rng.standard_normal((classes, dim)) * 0.6
    X = (np.repeat(means[lab], seg, 0) + rng.standard_normal((n * seg, dim))).astype(np.float32)
    ids = [f"t{i:06d}" for i in range(n)]
    fps = [f"b3-{i:032x}" for i in range(n)]
    spec = get_spec("tiny-test")
    st = Store.create(root / "cache", spec, "bench", PreprocessConfig())
    rep = lambda v: np.repeat(np.asarray(v, dtype=object), seg)  # noqa: E731
    cols = {
        "track_id": pa.array(rep(ids), pa.string()),
        "path": pa.array(rep([f"/lib/{t}.flac" for t in ids]), pa.string()),
        "label": pa.array(rep([f"g{c}" for c in lab]), pa.string()),
        "split": pa.array([None] * (n * seg), pa.string()),
        "group": pa.array([None] * (n * seg), pa.string()),
        "fingerprint": pa.array(rep(fps), pa.string()),
        "segment": pa.array(np.tile(np.arange(seg), n), pa.int32()),
        "start_s": pa.array(np.tile(np.arange(seg) * 5.0, n), pa.float64()),
        "end_s": pa.array(np.tile(np.arange(seg) * 5.0 + 5, n), pa.float64()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1), pa.float32()), dim),
    }
    st.write_shard("segments", pa.table(cols), "0000")
    ds = pd.DataFrame({"track_id": ids, "path": [f"/lib/{t}.flac" for t in ids], "label": [f"g{c}" for c in lab]})
    ds = ds.iloc[:n_tracks].assign(split=None, group=None, fingerprint=fps[:n_tracks], size=0, mtime_ns=0, inode=0)
    ds["real_path"] = ds["path"]
    st.record_dataset(ds, "/lib")
    old = fit_head("tiny-test", "lr", store=st, runs=root / "runs", protocol="holdout", seed=0)
    with ResultsDB(root / "lib.sqlite") as rdb:  # the labels: tracks of the library, not of the dataset
        rdb.put_labels(
            {
                "fingerprint": fps[i],
                "label": f"g{lab[i]}",
                "source": "review",
                "reviewer": "bench",
                "path": f"/lib/{ids[i]}.flac",
            }
            for i in range(n_tracks, n)
        )
    t0 = time.perf_counter()
    res = retrain(old.run_dir, root / "lib.sqlite", cache=root / "cache", runs=root / "runs")
    sec = time.perf_counter() - t0
    shutil.rmtree(root, ignore_errors=True)
    return {
        "tracks": n_tracks,
        "labels": n_labels,
        "segments": n * seg,
        "dim": dim,
        "seconds": sec,
        "extracted": res.n_extracted,
        "track_accuracy": res.metrics["track_accuracy"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/gtzan_mini")
    ap.add_argument("--backbone", default="musicnn-msd")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/embedkit-bench-library/cache"))
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--start", type=int, default=10)
    ap.add_argument("--batch", type=int, default=5)
    ap.add_argument("--flip", type=float, default=0.10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--retrain-tracks", type=int, default=10000, help="stored tracks of the retrain timing (0: skip)")
    ap.add_argument("--only-retrain", action="store_true", help="only the retrain timing")
    ap.add_argument("--out", default="bench_library.json", help="results file name under bench/results/")
    ap.add_argument("--into", help="also write active_learning.json into this runs folder, for the report")
    ap.add_argument("--quick", action="store_true", help="3 repeats, 1000 stored tracks")
    a = ap.parse_args()
    if a.quick:
        a.repeats, a.retrain_tracks = 3, 1000
    from common import RESULTS, load_average, pin_cores

    pin_cores(2)
    t0 = time.perf_counter()
    out: dict = {}
    if a.retrain_tracks:
        import tempfile

        # its own scratch folder (removed after): never beside a shared embedding cache
        rc = retrain_cost(a.retrain_tracks, 500, Path(tempfile.mkdtemp(prefix="embedkit-bench-retrain-")))
        print(
            f"retrain (lr, 2 cores, load {load_average():.1f}): {rc['tracks']} stored tracks + {rc['labels']} labels "
            f"({rc['segments']} segments x {rc['dim']}-d) in {rc['seconds']:.1f} s, {rc['extracted']} decoded"
        )
        out["retrain"] = rc
    if a.only_retrain:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / a.out).write_text(json.dumps(out, indent=2))
        return
    X, y, classes = track_vectors(a.data, a.backbone, a.cache, a.workers)
    print(
        f"{a.data}: {len(y)} tracks, {len(classes)} classes, {a.backbone} {X.shape[1]}-d ({time.perf_counter() - t0:.1f} s)"
    )
    t_al = time.perf_counter()
    al = active_learning(X, y, len(classes), a.repeats, a.start, a.batch, a.seed)
    print(
        f"active learning ({a.repeats} repeats, start {a.start}, batch {a.batch}, "
        f"{time.perf_counter() - t_al:.0f} s, load {load_average():.1f}); full pool: {al['full_pool_accuracy']:.3f}"
    )
    print("labels  " + " ".join(f"{b:>5d}" for b in al["budgets"]))
    for p in POLICIES:
        print(f"{p:<7} " + " ".join(f"{v:5.3f}" for v in al[p]))
    for name, t in al["targets"].items():
        s = "-" if t["saving"] is None else f"{t['saving']:.0%}"
        ci = "" if not t["saving_ci90"] else f" (90% CI {t['saving_ci90'][0]:.0%} to {t['saving_ci90'][1]:.0%})"
        h = t["held"]
        sh = "-" if t["saving_held"] is None else f"{t['saving_held']:.0%}"
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        print(
            f"  {name} ({t['accuracy']:.3f}): queue {fmt(t['queue'])} labels, margin {fmt(t['margin'])}, "
            f"random {fmt(t['random'])}: saving {s}{ci}{' meets' if (t['saving'] or 0) >= 0.3 else ''}; "
            f"staying above: queue {fmt(h['queue'])}, random {fmt(h['random'])}, saving {sh}"
        )
    au = audit_simulation(X, y, len(classes), a.repeats, a.flip, a.seed)
    print(
        f"audit: {a.flip:.0%} flipped ({a.repeats} repeats; cross-fitted accuracy {au['accuracy_vs_true_labels']:.3f})"
    )
    for name in ("audit", "1-p_tag (all tracks)", "p_decision-p_tag"):
        v = au[name]
        print(f"  ranked by {name}: precision of the top N {v['mean']:.3f} ± {v['std']:.3f} (min {v['min']:.2f})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.update(
        data=str(a.data),
        backbone=a.backbone,
        n_tracks=len(y),
        load_average=load_average(),
        active_learning=al,
        audit=au,
    )
    (RESULTS / a.out).write_text(json.dumps(out, indent=2))
    if a.into:  # the report (embedkit report RUNS_DIR) shows the curves beside the runs
        into = Path(a.into)
        into.mkdir(parents=True, exist_ok=True)
        when = time.strftime("%Y-%m-%d")
        fig = {**al, "dataset": Path(a.data).name, "backbone": a.backbone, "when": when}
        (into / "active_learning.json").write_text(json.dumps(fig, indent=1))
        print(f"  -> {into / 'active_learning.json'} (embedkit report {into} shows it)")
    print(f"-> {RESULTS / a.out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
