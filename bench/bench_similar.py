"""Similarity: quality on gtzan_mini, near-duplicates, and the index at 100k / 1M vectors.

    python bench/bench_similar.py quality [--into runs/]  # P@10 on gtzan_mini; --into: for the report
    python bench/bench_similar.py duplicates   # re-encodes of gtzan_mini found, no two tracks merged
    python bench/bench_similar.py scale        # 100k / 1M generated vectors, 200-d / 2048-d
    python bench/bench_similar.py scale --sizes 100000 --dims 200   # one configuration
    python bench/bench_similar.py fromdb --sizes 100000 --dims 2048  # building from a database

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
(3) scale: N generated vectors (``--clusters`` Gaussian clusters, default 2000, unit length: real
    embeddings cluster; i.i.d. noise would have no neighbours to find), dimension D; 200 held-out
    queries, one at a time (an interactive request), on the machine's cores. Exact: the float32
    matrix product (numpy / BLAS) with a partial sort. embedkit's index
    (``embedkit.deploy.similar._ann_build`` with ``AnnSettings``, flags ``--codec --nlist
    --nprobe --recall --rows-dtype --rerank --train-per-list --niter``): FAISS IVF, vectors as
    8-bit scalars, nprobe tuned at build, candidates re-ranked on the float16 rows as the index
    does. Printed: build seconds (k-means, adding, tuning), memory three ways (FAISS's own
    figure: codes + ids + centroids; the RSS a fresh process gains loading the saved index; the
    RSS rise while building), query p50 / p99 ms, recall@10 against exact (with and without the
    re-rank), the ratio of the two p50s; ``--sweep``: nprobe x candidates on the same index;
    ``--compare-usearch``: the usearch HNSW int8 graph embedkit used before, on the same vectors.
    Above ``--max-f32-gb`` (1M x 2048: 8 GB as float32) the vectors are float16, the exact
    truth of all queries comes from one chunked pass and ``--big-exact-queries`` (3) are timed.
(4) fromdb: the index built from a results database (``Index.build`` on a ``Library``): N
    generated rows (vector D floats + probabilities of 10 genres) written into a SQLite
    database, then, each in a fresh process, the peak RSS above the process's RSS with the
    library open: baseline ``Library._query()`` (every row read at once: the first step of the
    build before it streamed), and ``Index.build`` (two streamed passes, a chunk of rows at a
    time). Two figures: the peak of anonymous memory (RssAnon, sampled every 20 ms: the heap,
    what the build allocates) and the peak RSS (VmHWM, which also counts the pages of the
    mapped rows file, page cache the kernel can drop). Ratio build / baseline of the first.
    ``--before SRC``: also the build of another checkout of embedkit (its source folder on
    PYTHONPATH; e.g. a git worktree of the commit before the build streamed), the true baseline.
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

from common import RESULTS, load_average, rss_mb  # noqa: E402

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


def _generate(
    n: int, d: int, seed: int, dtype=np.float32, centers=None, clusters: int = 2000
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if centers is None:
        centers = np.random.default_rng(12345).standard_normal((clusters, d)).astype(np.float32)
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


def _exact_all(X: np.ndarray, Q: np.ndarray, k: int, chunk: int = 65_536) -> list[np.ndarray]:
    """The exact top k of every query in one pass over X (float16 rows converted a chunk at a
    time): the recall truth where timing each query alone would take minutes."""
    best_s = np.full((len(Q), k), -np.inf, np.float32)
    best_i = np.zeros((len(Q), k), np.int64)
    for i in range(0, len(X), chunk):
        S = Q @ X[i : i + chunk].astype(np.float32).T  # [queries, chunk]
        top = np.argpartition(-S, k - 1, axis=1)[:, :k]
        s = np.concatenate([best_s, np.take_along_axis(S, top, 1)], 1)
        ids = np.concatenate([best_i, top + i], 1)
        keep = np.argsort(-s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s, keep, 1), np.take_along_axis(ids, keep, 1)
    return list(best_i)


_LOAD_CHILD = """
import json, sys
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
kind, path = sys.argv[1:3]
if kind == "faiss":
    import faiss
    r0 = rss(); ix = faiss.read_index(path); r1 = rss()
else:
    from usearch.index import Index
    r0 = rss(); ix = Index.restore(path); r1 = rss()
print(json.dumps({"rss_delta_mb": r1 - r0}))
"""


def _load_rss(kind: str, path: Path) -> float:
    """The resident memory (MiB) a fresh process gains by loading the saved index at ``path``."""
    out = subprocess.run([sys.executable, "-c", _LOAD_CHILD, kind, str(path)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"loading {path} failed:\n{out.stderr[-2000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["rss_delta_mb"])


def _timed(search, Q, truth) -> tuple[np.ndarray, float]:
    """(per-query ms, recall@10 against ``truth``) of ``search(q) -> ids``, one query at a time."""
    lat, rec = [], []
    for q, tr in zip(Q, truth):
        t = time.perf_counter()
        found = search(q)
        lat.append(time.perf_counter() - t)
        rec.append(len(set(np.asarray(found)[:10].tolist()) & set(tr.tolist())) / 10)
    return np.array(lat) * 1e3, float(np.mean(rec))


def _ann(args, X, Q, truth, lat_e, d, n) -> dict:
    """embedkit's approximate index (``similar._ann_build``: FAISS IVF, re-ranked on the rows in
    ``--rows-dtype``) over X: build s, memory three ways, p50 / p99, recall@10."""
    from dataclasses import replace

    import faiss

    from embedkit.deploy import similar as sim
    from embedkit.deploy.similar import AnnSettings, Index, IndexInfo, _ann_build

    s = AnnSettings(args.codec, args.nlist, args.nprobe, args.rows_dtype, args.train_per_list, args.niter, args.recall)
    sim.RERANK = args.rerank
    rows = X if X.dtype == np.dtype(s.rows_dtype) else X.astype(s.rows_dtype)  # the index's rows file
    r0 = rss_mb()
    t = time.perf_counter()
    ann, rec = _ann_build(rows, s)  # k-means, adding every row, tuning nprobe
    build_s = time.perf_counter() - t
    build_rss = rss_mb() - r0
    ivf = faiss.extract_index_ivf(ann)
    # FAISS's own figure: the codes and ids of the inverted lists plus the cells' centroids
    own = (ann.ntotal * (ivf.code_size + 8) + ivf.nlist * d * 4) / 2**20
    info = IndexInfo("bench", "bench", d, 0.5, "ivf", n, 0.0, None, rows_dtype=s.rows_dtype, ann=rec)
    idx = Index(Path(tempfile.gettempdir()), info, np.zeros(d, np.float32), [], rows, ann, s)
    idx.keys = range(n)  # only len() is used by search
    lat, recall = _timed(lambda q: idx.search(q, 10)[0], Q, truth)
    lat_raw, recall_raw = _timed(lambda q: ann.search(q[None], 10)[1][0], Q, truth)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        path = Path(tmp) / "ix.faiss"
        faiss.write_index(ann, str(path))
        file_mb = path.stat().st_size / 2**20
        load_rss = _load_rss("faiss", path)
    out = {
        "index": f"faiss {rec['factory']} (inner product), nprobe {rec['nprobe']}"
        + (f" (tuned at build: recall {rec['tuned_recall']:.3f} on its own rows)" if "tuned_recall" in rec else "")
        + f", {args.rerank * 10} candidates re-ranked on {s.rows_dtype} rows",
        "settings": {**rec, "rerank": args.rerank},
        "build_s": round(build_s, 1),
        "memory_mb": own,
        "file_mb": file_mb,
        "load_rss_delta_mb": load_rss,
        "build_rss_delta_mb": build_rss,
        "rerank_rows_mb": n * d * np.dtype(s.rows_dtype).itemsize / 2**20,
        "p50_ms": float(np.median(lat)),
        "p99_ms": float(np.percentile(lat, 99)),
        "recall_at_10": recall,
        "no_rerank_p50_ms": float(np.median(lat_raw)),
        "no_rerank_recall_at_10": recall_raw,
        "exact_over_ann_p50": float(np.median(lat_e) / np.median(lat)),
    }
    print(
        f"  {out['index']}: build {build_s:.1f} s; memory {own:.0f} MiB (FAISS's codes + ids + centroids), "
        f"file {file_mb:.0f} MiB, RSS +{load_rss:.0f} MiB loading it in a fresh process (+{build_rss:.0f} MiB "
        f"while building); p50 {out['p50_ms']:.3f} ms, p99 {out['p99_ms']:.3f} ms, recall@10 {recall:.3f} "
        f"(without the re-rank {recall_raw:.3f}); exact / ANN p50 = {out['exact_over_ann_p50']:.0f}x",
        flush=True,
    )
    if args.sweep:  # search-time settings on the same index
        out["sweep"] = []
        for nprobe in (4, 8, 16, 32, 64, 128):
            for rerank in (2, 4, 8):
                idx.settings, sim.RERANK = replace(s, nprobe=nprobe), rerank
                lat, recall = _timed(lambda q: idx.search(q, 10)[0], Q, truth)
                one = {
                    "nprobe": nprobe,
                    "rerank": rerank,
                    "p50_ms": float(np.median(lat)),
                    "p99_ms": float(np.percentile(lat, 99)),
                    "recall_at_10": recall,
                }
                out["sweep"].append(one)
                print(
                    f"    nprobe {nprobe}, {rerank * 10} re-ranked: p50 {one['p50_ms']:.3f} ms, "
                    f"p99 {one['p99_ms']:.3f} ms, recall@10 {recall:.3f}",
                    flush=True,
                )
        idx.settings, sim.RERANK = s, args.rerank
    return out


def _usearch(args, X, Q, truth, lat_e, d, n) -> dict:
    """The index embedkit used before (usearch HNSW, int8, 16 links, ef 128, 40 candidates
    re-ranked on float32 rows), on the same vectors in the same run."""
    from usearch.index import Index as UIndex

    ann = UIndex(ndim=d, metric="ip", dtype="i8", connectivity=16, expansion_add=128, expansion_search=128)
    t = time.perf_counter()
    for i in range(0, n, 65_536):
        part = np.ascontiguousarray(X[i : i + 65_536], dtype=np.float32)
        ann.add(np.arange(i, i + len(part), dtype=np.uint64), part, threads=os.cpu_count() or 1)
    build_s = time.perf_counter() - t

    def search(q):
        cand = np.asarray(ann.search(q, 40).keys, dtype=np.int64)
        s = np.asarray(X[cand], dtype=np.float32) @ q
        return cand[np.argsort(-s)[:10]]

    lat, recall = _timed(search, Q, truth)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        path = Path(tmp) / "ix.usearch"
        ann.save(str(path))
        file_mb = path.stat().st_size / 2**20
        load_rss = _load_rss("usearch", path)
    out = {
        "index": "usearch HNSW int8, 16 links, ef 128, 40 re-ranked on float32 rows",
        "build_s": round(build_s, 1),
        "memory_mb": ann.memory_usage / 2**20,
        "file_mb": file_mb,
        "load_rss_delta_mb": load_rss,
        "p50_ms": float(np.median(lat)),
        "p99_ms": float(np.percentile(lat, 99)),
        "recall_at_10": recall,
        "exact_over_ann_p50": float(np.median(lat_e) / np.median(lat)),
    }
    print(
        f"  {out['index']}: build {build_s:.1f} s; memory {out['memory_mb']:.0f} MiB (usearch's memory_usage), "
        f"file {file_mb:.0f} MiB, RSS +{load_rss:.0f} MiB loading it; p50 {out['p50_ms']:.3f} ms, "
        f"p99 {out['p99_ms']:.3f} ms, recall@10 {recall:.3f}; exact / usearch p50 = {out['exact_over_ann_p50']:.0f}x",
        flush=True,
    )
    return out


def scale(args) -> dict:
    results = {}
    Path(args.work).mkdir(parents=True, exist_ok=True)
    for n in args.sizes:
        for d in args.dims:
            big = n * d * 4 > args.max_f32_gb * 2**30
            dtype = np.float16 if big else np.float32
            nq = args.queries
            t0 = time.perf_counter()
            X, centers = _generate(n, d, 0, dtype, clusters=args.clusters)
            Q, _ = _generate(nq, d, 1, np.float32, centers)
            gen_s = time.perf_counter() - t0
            if big:  # each query alone takes ~30 s here: a few timed, the truth of all in one pass
                truth, timed = _exact_all(X, Q, 10), min(nq, args.big_exact_queries)
            else:
                truth, timed = [], nq
            lat_e = []
            for q in Q[:timed]:
                t = time.perf_counter()
                top = _exact(X, q, 10, 65_536 if big else None)
                lat_e.append(time.perf_counter() - t)
                if not big:
                    truth.append(top)
            lat_e = np.array(lat_e) * 1e3
            row = {
                "n": n,
                "dim": d,
                "clusters": args.clusters,
                "rows_dtype": np.dtype(dtype).name,
                "queries": nq,
                "exact_queries_timed": timed,
                "generate_s": round(gen_s, 1),
                "exact_p50_ms": float(np.median(lat_e)),
                "exact_p99_ms": float(np.percentile(lat_e, 99)),
                "exact_matrix_mb": X.nbytes / 2**20,
                "load_average_at_start": load_average(),
            }
            print(
                f"N={n:,} D={d} ({np.dtype(dtype).name} rows, {nq} queries, {timed} timed exactly): exact p50 "
                f"{row['exact_p50_ms']:.2f} ms, p99 {row['exact_p99_ms']:.2f} ms, matrix {row['exact_matrix_mb']:.0f} MiB",
                flush=True,
            )
            if not args.no_graph and not (big and args.skip_big_graph):
                row["ann"] = _ann(args, X, Q, truth, lat_e, d, n)
                # the figures the goals name, flat (as before this index)
                for key in ("build_s", "memory_mb", "p50_ms", "p99_ms"):
                    row[f"graph_{key}"] = row["ann"][key]
                row["recall_at_10"] = row["ann"]["recall_at_10"]
                row["exact_over_graph_p50"] = row["ann"]["exact_over_ann_p50"]
            if args.compare_usearch:
                row["usearch"] = _usearch(args, X, Q, truth, lat_e, d, n)
            results[f"{n}x{d}"] = row
            del X
            _save(args.section_key, {"cores": os.cpu_count(), "results": results})
    return results


_FROMDB_CHILD = """
import json, sys, threading, time
sys.path.insert(0, sys.argv[3])
from common import rss_mb, reset_peak_rss
import embedkit
from embedkit.deploy.similar import Index, Library
what, db = sys.argv[1:3]
lib = Library(db)
peak, stop = [0.0], threading.Event()
def watch():  # anonymous memory only: the rows file's mapped pages are page cache, not the heap
    while not stop.is_set():
        peak[0] = max(peak[0], rss_mb("RssAnon")); time.sleep(0.02)
reset_peak_rss(); r0, a0 = rss_mb(), rss_mb("RssAnon"); t0 = time.perf_counter()
threading.Thread(target=watch, daemon=True).start()
if what == "read-all":
    rows = lib._query(); n = len(rows)
else:
    n = Index.build(lib, sys.argv[4]).info.n
stop.set(); time.sleep(0.05)
print(json.dumps({"n": n, "src": embedkit.__file__, "peak_anon_rise_mb": peak[0] - a0, "peak_rss_rise_mb": rss_mb("VmHWM") - r0,
                  "seconds": time.perf_counter() - t0}))
"""


def _fill_db(db: Path, n: int, d: int) -> None:
    """n rows of one model (10 genres, d-dimensional vectors) written straight into a results
    database's two tables, 5,000 rows a transaction."""
    import datetime as dt

    from embedkit.deploy.resultsdb import ResultsDB
    from embedkit.deploy.vectors import to_bytes

    labels = [f"g{i}" for i in range(10)]
    rng = np.random.default_rng(0)
    now = dt.datetime.now(dt.timezone.utc)
    with ResultsDB(db) as rdb:
        rdb.register_model("m", "head", labels, "", None)
        for i in range(0, n, 5000):
            k = min(5000, n - i)
            P = rng.dirichlet(np.ones(10), k)
            V = rng.standard_normal((k, d)).astype(np.float32)
            tags = [
                {"fingerprint": f"{i + j:064x}", "model_id": "m", "path": f"/music/{i + j}.mp3",
                 "probabilities": dict(zip(labels, map(float, P[j]))), "decision": "g0", "updated_at": now}
                for j in range(k)
            ]  # fmt: skip
            vecs = [
                {"fingerprint": f"{i + j:064x}", "model_id": "m", "space": "bench", "dim": d, "dtype": "f4",
                 "vector": to_bytes(V[j]), "updated_at": now}
                for j in range(k)
            ]  # fmt: skip
            with rdb.engine.begin() as c:
                c.execute(rdb.tags.insert(), tags)
                c.execute(rdb.vectors.insert(), vecs)


def fromdb(args) -> dict:
    results = {}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for n in args.sizes:
        for d in args.dims:
            db = work / f"lib-{n}x{d}.sqlite"
            if not db.exists():
                t0 = time.perf_counter()
                _fill_db(db.with_suffix(".part"), n, d)
                db.with_suffix(".part").rename(db)
                print(f"wrote {db} ({n:,} x {d}) in {time.perf_counter() - t0:.0f} s", flush=True)
            row = {"n": n, "dim": d, "db_mb": round(db.stat().st_size / 2**20), "load_average_at_start": load_average()}
            todo = [("read-all", "read-all", None), ("build", "build", None)]
            if args.before:
                todo.append(("build-before", "build", args.before))
            for key, what, src in todo:
                env = {**os.environ, "PYTHONPATH": src} if src else None
                cmd = [sys.executable, "-c", _FROMDB_CHILD, what, str(db), str(ROOT / "bench"), str(work / f"ix-{key}")]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)  # not this checkout
                if out.returncode:
                    raise SystemExit(f"{key} failed:\n{out.stderr[-2000:]}")
                row[key] = json.loads(out.stdout.strip().splitlines()[-1])
            for key in ("read-all", "build-before"):
                if key in row:
                    ratio = row["build"]["peak_anon_rise_mb"] / row[key]["peak_anon_rise_mb"]
                    row[f"build_over_{key.replace('-', '_')}_anon_peak"] = round(ratio, 3)
            print(json.dumps(row), flush=True)
            results[f"{n}x{d}"] = row
            _save("fromdb", {"cores": os.cpu_count(), "results": results})
    return results


def main(argv=None):
    from embedkit.deploy.similar import RERANK, AnnSettings

    ANN = AnnSettings()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("section", choices=["quality", "duplicates", "scale", "fromdb", "all"])
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "embedkit" / "bench-similar"))
    ap.add_argument("--store", help="a musicnn-msd store of gtzan_mini (default: extracted under --cache)")
    ap.add_argument("--run", help="duplicates: a musicnn-msd head run (runs/<id>)")
    ap.add_argument("--into", help="quality: also write similarity.json into this runs folder, for the report")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "embedkit-bench-similar"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dims", type=int, nargs="+", default=[200, 2048])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--max-f32-gb", type=float, default=4.0, help="above: exact search on float16 rows")
    ap.add_argument("--big-exact-queries", type=int, default=3, help="above --max-f32-gb: queries timed exactly")
    ap.add_argument("--clusters", type=int, default=2000, help="Gaussian clusters of the generated vectors")
    ap.add_argument("--no-graph", action="store_true", help="exact search only")
    ap.add_argument("--codec", default=ANN.codec, help="FAISS codec of the stored vectors: SQ8, SQ6, SQ4, SQfp16, Flat")
    ap.add_argument("--nlist", type=int, default=ANN.nlist, help="k-means cells (default: about 2 sqrt(N))")
    ap.add_argument("--nprobe", type=int, default=ANN.nprobe, help="cells searched per query (default: tuned at build)")
    ap.add_argument("--recall", type=float, default=ANN.recall, help="nprobe tuned at build to this recall@10")
    ap.add_argument("--rows-dtype", default=ANN.rows_dtype, choices=["float16", "float32"], help="re-rank rows")
    ap.add_argument("--rerank", type=int, default=RERANK, help="candidates re-ranked per result asked for")
    ap.add_argument("--train-per-list", type=int, default=ANN.train_per_list, help="k-means sample, rows a cell")
    ap.add_argument("--niter", type=int, default=ANN.niter, help="k-means iterations")
    ap.add_argument("--compare-usearch", action="store_true", help="also the usearch HNSW int8 index used before")
    ap.add_argument("--sweep", action="store_true", help="also time search settings (nprobe, re-rank) on each index")
    ap.add_argument("--section-key", default="scale", help="results key (keep an earlier run's figures)")
    ap.add_argument("--before", help="fromdb: also build with the embedkit source in this folder (a baseline)")
    ap.add_argument("--skip-big-graph", action="store_true", help="no index for matrices above --max-f32-gb")
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
    if args.section == "fromdb":
        fromdb(args)


if __name__ == "__main__":
    main()
