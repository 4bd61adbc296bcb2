"""Similarity: quality on gtzan_mini, near-duplicates, and the index at 100k / 1M vectors.

    python bench/bench_similar.py quality [--into runs/]  # P@10 on gtzan_mini; --into: for the report
    python bench/bench_similar.py duplicates   # re-encodes of gtzan_mini found, no two tracks merged
    python bench/bench_similar.py scale        # 100k / 1M generated vectors, 200-d / 2048-d
    python bench/bench_similar.py scale --sizes 100000 --dims 200   # one configuration

(1) quality: same-genre precision at 10 over the 100 tracks of gtzan_mini, each queried against
    the other 99 (the ceiling is 0.90: nine other tracks per genre). Track vector: the mean of
    the musicnn-msd embeddings of its six 5 s windows (the store ``embedkit extract`` writes,
    the numbers ``embedkit tag`` keeps). Baseline: cosine of those vectors. embedkit's space
    (``embedkit.deploy.similar.space_vectors``): the Hellinger map of genre probabilities plus
    ALPHA x the centred embedding. Protocol: 5-fold stratified CV (seed 0); in each fold the
    classifier (StandardScaler + logistic regression, C=1, on the training folds' windows, as
    ``embedkit fit --head lr``; no calibration) is fitted on the 80 training tracks only; the
    20 held-out tracks are the queries, searched among all 99 others (projected with that
    fold's classifier; the embedding mean is the library's, which needs no labels). The figure
    is the mean over the 100 held-out queries. Also printed: LDA (fitted on the training folds)
    and the stricter within-fold variant (held-out queries among the held-out fold only: a
    precision at 1, one other track per genre there). gtzan_mini has no artist tags, so the
    artist-filtered variant cannot be computed on it.
(2) duplicates: every gtzan_mini clip re-encoded with ffmpeg (MP3 128k and 320k, AAC 160k,
    Opus 96k, and the first 2 s cut off, FLAC), all 600 files tagged with a musicnn-msd + lr run
    into one database; for each original: are its 5 copies its near-duplicates
    (``embedkit.deploy.similar.is_duplicate``), and does any other original pass as one (all
    4950 pairs)? Prints the smallest copy cosine / sketch correlation, and the largest between
    two different originals.
(3) scale: N generated vectors (2000 Gaussian clusters, unit length: real embeddings cluster;
    i.i.d. noise would have no neighbours to find), dimension D; 200 held-out queries, one at a
    time (an interactive request), on the machine's cores. Exact: the float32 matrix product
    (numpy / BLAS) with a partial sort; embedkit's graph: usearch HNSW, int8 vectors, 16
    links, re-ranked exactly on the float32 rows (``embedkit.deploy.similar.Index``). Printed:
    build seconds, index memory (the graph with its int8 vectors; the float32 rows stay in a
    file, read for re-ranking), query p50 / p99 ms, recall@10 against exact, and the ratios of
    the two query times. 1M x 2048: the float32 matrix is 8 GB: exact search there runs on
    float16 rows in chunks and on fewer queries (said in the output).
Results also go to bench/results/bench_similar.json (one key per section).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import RESULTS, load_average  # noqa: E402

GTZAN = Path(os.environ.get("EMBEDKIT_SHARED", ROOT.parent / "shared")) / "data" / "gtzan_mini"


def _save(section: str, data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "bench_similar.json"
    try:
        allres = json.loads(path.read_text())
    except (OSError, ValueError):
        allres = {}
    allres[section] = {**data, "load_average": load_average(), "when": time.strftime("%Y-%m-%d %H:%M")}
    path.write_text(json.dumps(allres, indent=1))


# ---------------------------------------------------------------------------------------------
# (1) quality


def _store(cache: Path) -> Path:
    """The musicnn-msd store of gtzan_mini under ``cache`` (extracted when missing)."""
    from embedkit.datasets import load_dataset
    from embedkit.extract import extract

    return Path(extract(load_dataset(GTZAN), "musicnn-msd", cache=cache).store.root)


def precision_at(S: np.ndarray, labels: np.ndarray, queries, candidates=None, k: int = 10) -> list[float]:
    out = []
    for i in queries:
        s = S[i].copy()
        s[i] = -np.inf
        if candidates is not None:
            mask = np.full(len(s), -np.inf)
            mask[candidates] = 0
            s = s + mask
        top = np.argsort(-s, kind="stable")[:k]
        out.append(float(np.mean(labels[top] == labels[i])))
    return out


def quality(args) -> dict:
    import pandas as pd
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    from embedkit.deploy.similar import ALPHA, space_vectors

    store = Path(args.store) if args.store else _store(Path(args.cache))
    df = pd.read_parquet(store / "segments").sort_values(["track_id", "segment"])
    tracks = sorted(df.track_id.unique())
    labels = np.array([t.split("/")[0] for t in tracks])
    E = np.stack(df.embedding.values).astype(np.float32)
    owner = np.searchsorted(tracks, df.track_id.values)
    T = np.stack([E[owner == i].mean(0) for i in range(len(tracks))])

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def sim(V):
        U = unit(np.asarray(V, dtype=np.float64))
        return U @ U.T

    n = len(tracks)
    base = precision_at(sim(T), labels, range(n))
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    res = {"space": [], "space_alpha0": [], "lda": [], "within_base": [], "within_space": []}
    for train, test in folds.split(T, labels):
        m = np.isin(owner, train)
        sc = StandardScaler().fit(E[m])
        lr = LogisticRegression(C=1.0, max_iter=3000).fit(sc.transform(E[m]), labels[owner[m]])
        Pw = lr.predict_proba(sc.transform(E))
        P = np.stack([Pw[owner == i].mean(0) for i in range(n)])  # the track mean, as tag() stores it
        mean = T.mean(0)  # the library's mean: no labels
        Ssp = sim(space_vectors(P, T, mean))
        res["space"] += precision_at(Ssp, labels, test)
        res["space_alpha0"] += precision_at(sim(space_vectors(P, T, mean, alpha=0.0)), labels, test)
        lda = LinearDiscriminantAnalysis().fit(sc.transform(T[train]), labels[train])
        res["lda"] += precision_at(sim(lda.transform(sc.transform(T))), labels, test)
        res["within_base"] += precision_at(sim(T), labels, test, candidates=test, k=1)
        res["within_space"] += precision_at(Ssp, labels, test, candidates=test, k=1)
    out = {
        "tracks": n,
        "p10_baseline_cosine": float(np.mean(base)),
        "p10_space": float(np.mean(res["space"])),
        "p10_space_probabilities_only": float(np.mean(res["space_alpha0"])),
        "p10_lda": float(np.mean(res["lda"])),
        "p1_within_fold_baseline": float(np.mean(res["within_base"])),
        "p1_within_fold_space": float(np.mean(res["within_space"])),
        "alpha": ALPHA,
        "protocol": "5-fold stratified CV (seed 0); classifier fitted on the training folds only; "
        "held-out tracks queried against the other 99",
        "artist_filtered": "not available: gtzan_mini has no artist tags",
    }
    print(f"gtzan_mini, musicnn-msd track-mean vectors, {n} tracks; {out['protocol']}")
    print(f"  same-genre P@10, cosine of the embeddings (baseline): {out['p10_baseline_cosine']:.3f}")
    print(
        f"  same-genre P@10, embedkit's space (alpha {ALPHA}):       {out['p10_space']:.3f}  "
        f"({out['p10_space'] / out['p10_baseline_cosine']:.2f}x the baseline; ceiling 0.90)"
    )
    print(
        f"  ... probabilities only (alpha 0): {out['p10_space_probabilities_only']:.3f}; LDA on the training folds: {out['p10_lda']:.3f}"
    )
    print(
        f"  within the held-out fold only, P@1: baseline {out['p1_within_fold_baseline']:.3f}, space {out['p1_within_fold_space']:.3f}"
    )
    print(f"  artist-filtered: {out['artist_filtered']}")
    _save("quality", out)
    if args.into:  # the report (embedkit report RUNS_DIR) shows it beside the runs
        into = Path(args.into)
        into.mkdir(parents=True, exist_ok=True)
        extra = {"dataset": "gtzan_mini (musicnn-msd)", "ceiling": 0.9, "when": time.strftime("%Y-%m-%d")}
        (into / "similarity.json").write_text(json.dumps({**out, **extra}, indent=1))
        print(f"  -> {into / 'similarity.json'} (embedkit report {into} shows it)")
    return out


# ---------------------------------------------------------------------------------------------
# (2) duplicates

VARIANTS = {
    "mp3-128k": (".mp3", ["-c:a", "libmp3lame", "-b:a", "128k"]),
    "mp3-320k": (".mp3", ["-c:a", "libmp3lame", "-b:a", "320k"]),
    "aac-160k": (".m4a", ["-c:a", "aac", "-b:a", "160k"]),
    "opus-96k": (".opus", ["-c:a", "libopus", "-b:a", "96k"]),
    "trim-2s": (".flac", ["-ss", "2", "-c:a", "flac"]),
}


def duplicates(args) -> dict:
    from embedkit.deploy.batch import tag
    from embedkit.deploy.similar import DUPLICATE_COSINE, DUPLICATE_SKETCH, Library, centred_unit, is_duplicate
    from embedkit.deploy.vectors import sketch_similarity

    work = Path(args.work)
    copies = work / "copies"
    originals = sorted(GTZAN.glob("*/*.flac"))
    jobs = []
    for src in originals:
        for name, (suffix, codec) in VARIANTS.items():
            dst = copies / name / src.parent.name / (src.stem + suffix)
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                jobs.append(["ffmpeg", "-v", "error", "-y", "-i", str(src), *codec, str(dst)])
    t0 = time.perf_counter()
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(lambda cmd: subprocess.run(cmd, check=True), jobs))
    print(f"{len(jobs)} re-encodes made in {time.perf_counter() - t0:.0f} s")
    db = work / "dups.sqlite"
    for f in work.glob("dups.sqlite*"):  # a fresh database: every file tagged by this embedkit
        f.unlink() if f.is_file() else __import__("shutil").rmtree(f)
    t0 = time.perf_counter()
    tag(args.run, [GTZAN, copies], db=db)
    print(f"tagged 600 files in {time.perf_counter() - t0:.0f} s")
    with Library(db) as lib:
        ts = lib.all_tracks()
    mean = np.stack([t.vector for t in ts if "/copies/" not in t.path]).mean(0)
    by_path = {t.path: t for t in ts}
    orig = [by_path[str(p)] for p in originals]
    R = centred_unit(np.stack([t.vector for t in orig]), mean)
    S = R @ R.T
    np.fill_diagonal(S, -np.inf)
    worst_copy, worst_sketch, found, missed = 1.0, 1.0, 0, []
    per_variant = {}
    for p, o in zip(originals, orig):
        for name, (suffix, _) in VARIANTS.items():
            c = by_path[str(copies / name / p.parent.name / (p.stem + suffix))]
            dup, cos = is_duplicate(o, c, mean)
            worst_copy = min(worst_copy, cos)
            worst_sketch = min(worst_sketch, sketch_similarity(o.sketch, c.sketch))
            per_variant.setdefault(name, []).append(cos)
            found += dup
            if not dup:
                missed.append(f"{p.name} {name} {cos:.3f}")
    # every pair of different originals: the sketch correlation, and the pairs the rule merges
    sk = np.array(
        [
            [sketch_similarity(a.sketch, b.sketch) if i < j else -1.0 for j, b in enumerate(orig)]
            for i, a in enumerate(orig)
        ]
    )
    merged = [
        (originals[i].name, originals[j].name, float(S[i, j]))
        for i in range(len(orig))
        for j in range(i + 1, len(orig))
        if is_duplicate(orig[i], orig[j], mean, float(S[i, j]))[0]
    ]
    out = {
        "threshold": DUPLICATE_COSINE,
        "copies_found": found,
        "copies": len(originals) * len(VARIANTS),
        "sketch_threshold": DUPLICATE_SKETCH,
        "smallest_copy_cosine": float(worst_copy),
        "smallest_copy_sketch": float(worst_sketch),
        "largest_sketch_between_originals": float(sk.max()),
        "smallest_copy_cosine_per_variant": {k: float(min(v)) for k, v in per_variant.items()},
        "largest_cosine_between_originals": float(S.max()),
        "originals_merged": merged,
        "missed": missed[:20],
    }
    print(
        f"near-duplicates (embedding cosine >= {DUPLICATE_COSINE}, durations within 3 s, sketches >= {DUPLICATE_SKETCH}):"
    )
    print(f"  copies found as duplicates of their original: {found} of {out['copies']}")
    print(f"  smallest copy cosine {worst_copy:.4f}, sketch {worst_sketch:.4f}")
    for k, v in out["smallest_copy_cosine_per_variant"].items():
        print(f"    {k}: smallest {v:.4f}")
    print(f"  largest between two different gtzan_mini tracks (all pairs): cosine {S.max():.4f}, sketch {sk.max():.4f}")
    print(f"  pairs of different tracks merged: {len(merged)}")
    _save("duplicates", out)
    return out


# ---------------------------------------------------------------------------------------------
# (3) scale


def _generate(n: int, d: int, seed: int, dtype=np.float32, centers=None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if centers is None:
        centers = np.random.default_rng(12345).standard_normal((2000, d)).astype(np.float32)
    out = np.empty((n, d), dtype=dtype)
    for i in range(0, n, 50_000):
        m = min(50_000, n - i)
        x = centers[rng.integers(0, len(centers), m)] + rng.standard_normal((m, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[i : i + m] = x
    return out, centers


def _exact(X: np.ndarray, q: np.ndarray, k: int, chunk: int | None = None) -> np.ndarray:
    if chunk is None:
        s = X @ q
    else:
        s = np.concatenate([(X[i : i + chunk].astype(np.float32) @ q) for i in range(0, len(X), chunk)])
    top = np.argpartition(-s, k - 1)[:k]
    return top[np.argsort(-s[top])]


def scale(args) -> dict:
    from embedkit.deploy.similar import Index, IndexInfo, _ann_build

    results = {}
    for n in args.sizes:
        for d in args.dims:
            big = n * d * 4 > args.max_f32_gb * 2**30
            dtype = np.float16 if big else np.float32
            nq = args.queries if not big else max(20, args.queries // 10)
            t0 = time.perf_counter()
            X, centers = _generate(n, d, 0, dtype)
            Q, _ = _generate(nq, d, 1, np.float32, centers)
            gen_s = time.perf_counter() - t0
            chunk = 65_536 if big else None
            lat_e, truth = [], []
            for q in Q:
                t = time.perf_counter()
                truth.append(_exact(X, q, 10, chunk))
                lat_e.append(time.perf_counter() - t)
            lat_e = np.array(lat_e) * 1e3
            row = {
                "n": n,
                "dim": d,
                "rows_dtype": np.dtype(dtype).name,
                "queries": nq,
                "generate_s": round(gen_s, 1),
                "exact_p50_ms": float(np.median(lat_e)),
                "exact_p99_ms": float(np.percentile(lat_e, 99)),
                "exact_matrix_mb": X.nbytes / 2**20,
            }
            print(
                f"N={n:,} D={d} ({np.dtype(dtype).name} rows, {nq} queries): exact p50 {row['exact_p50_ms']:.2f} ms, p99 {row['exact_p99_ms']:.2f} ms, matrix {row['exact_matrix_mb']:.0f} MiB",
                flush=True,
            )
            if not args.no_graph and not (big and args.skip_big_graph):
                t = time.perf_counter()
                ann = _ann_build(X.astype(np.float32) if dtype != np.float32 else X)
                build_s = time.perf_counter() - t
                info = IndexInfo("bench", "bench", d, 0.5, "hnsw", n, 0.0, None)
                idx = Index(Path(tempfile.gettempdir()), info, np.zeros(d, np.float32), [], X, ann)
                idx.keys = range(n)  # only len() is used by search
                lat_a, rec = [], []
                for q, tr in zip(Q, truth):
                    t = time.perf_counter()
                    found, _ = idx.search(q, 10)
                    lat_a.append(time.perf_counter() - t)
                    rec.append(len(set(found.tolist()) & set(tr.tolist())) / 10)
                lat_a = np.array(lat_a) * 1e3
                row.update(
                    {
                        "graph_build_s": round(build_s, 1),
                        "graph_memory_mb": ann.memory_usage / 2**20,
                        "graph_p50_ms": float(np.median(lat_a)),
                        "graph_p99_ms": float(np.percentile(lat_a, 99)),
                        "recall_at_10": float(np.mean(rec)),
                        "exact_over_graph_p50": float(np.median(lat_e) / np.median(lat_a)),
                    }
                )
                print(
                    f"  graph (usearch HNSW, int8, M=16, re-ranked): build {build_s:.1f} s, memory {row['graph_memory_mb']:.0f} MiB, "
                    f"p50 {row['graph_p50_ms']:.3f} ms, p99 {row['graph_p99_ms']:.3f} ms, recall@10 {row['recall_at_10']:.3f}; "
                    f"exact / graph p50 = {row['exact_over_graph_p50']:.1f}x",
                    flush=True,
                )
                if args.sweep:  # search-time settings on the same graph
                    from embedkit.deploy import similar as sim

                    keep = (sim.RERANK, sim.HNSW_EF_SEARCH)
                    row["sweep"] = []
                    for rerank in (4, 8, 16):
                        for ef in (64, 128, 256):
                            sim.RERANK, sim.HNSW_EF_SEARCH = rerank, ef
                            lat, rec = [], []
                            for q, tr in zip(Q, truth):
                                t = time.perf_counter()
                                found, _ = idx.search(q, 10)
                                lat.append(time.perf_counter() - t)
                                rec.append(len(set(found.tolist()) & set(tr.tolist())) / 10)
                            lat = np.array(lat) * 1e3
                            one = {
                                "rerank": rerank,
                                "ef": ef,
                                "p50_ms": float(np.median(lat)),
                                "p99_ms": float(np.percentile(lat, 99)),
                                "recall_at_10": float(np.mean(rec)),
                            }
                            row["sweep"].append(one)
                            print(
                                f"    re-rank {rerank * 10} candidates, ef {ef}: p50 {one['p50_ms']:.3f} ms, "
                                f"p99 {one['p99_ms']:.3f} ms, recall@10 {one['recall_at_10']:.3f}",
                                flush=True,
                            )
                    sim.RERANK, sim.HNSW_EF_SEARCH = keep
                del ann, idx
            results[f"{n}x{d}"] = row
            del X
            _save(args.section_key, {"cores": os.cpu_count(), "results": results})
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("section", choices=["quality", "duplicates", "scale", "all"])
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "embedkit" / "bench-similar"))
    ap.add_argument("--store", help="a musicnn-msd store of gtzan_mini (default: extracted under --cache)")
    ap.add_argument("--run", help="duplicates: a musicnn-msd head run (runs/<id>)")
    ap.add_argument("--into", help="quality: also write similarity.json into this runs folder, for the report")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "embedkit-bench-similar"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dims", type=int, nargs="+", default=[200, 2048])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--max-f32-gb", type=float, default=4.0, help="above: exact search on float16 rows")
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time search settings (candidates, ef) on each graph")
    ap.add_argument("--section-key", default="scale", help="results key (keep an earlier run's figures)")
    ap.add_argument("--skip-big-graph", action="store_true", help="no graph for matrices above --max-f32-gb")
    args = ap.parse_args(argv)
    print(f"load average {load_average():.1f}, {os.cpu_count()} CPUs")
    if args.section in ("quality", "all"):
        quality(args)
    if args.section in ("duplicates", "all"):
        if not args.run:
            ap.error("duplicates needs --run (a musicnn-msd head run)")
        duplicates(args)
    if args.section in ("scale", "all"):
        scale(args)


if __name__ == "__main__":
    main()
