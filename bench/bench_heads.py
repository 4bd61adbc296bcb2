"""Benchmark the heads at FMA-small scale: wall time, peak memory and accuracy of each head's
default (fast) configuration against a slow reference configuration measured in the same run.

    python bench/bench_heads.py                 # 38,400 x 2048 float32, 8 classes, 2 cores
    python bench/bench_heads.py --quick         # 9,600 x 512: checks that it works
    python bench/bench_heads.py --heads lr --no-slow
    python bench/bench_heads.py --gtzan ../shared/data/gtzan_mini --cache /tmp/heads_cache

Data: generated, learnable but not separable: each of 6,400 tracks (6 segments) gets a class
mean in a 12-d subspace plus a per-track deviation (an atypical track), per-segment noise in that
subspace, low-rank per-track and per-segment nuisance structure (production, loudness...) and
isotropic noise, rotated into 2048 dims. Accuracy is measured on 1,600 further tracks.

Each (head, configuration) runs in its own process pinned to ``--cores`` CPUs; peak memory is the
rise of the process's resident-set high-water mark (VmHWM, reset just before ``fit``) over the
resident size with the embedding matrix loaded, so it counts numpy, torch and LightGBM alike.

Targets (issue 4): lr <= 10 s, lgbm <= 20 s, mlp <= 30 s; segment accuracy within 1 point of the
slow configuration; peak memory <= 2x the embedding matrix.
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

TARGET_S = {"lr": 10.0, "lgbm": 20.0, "mlp": 30.0}
SEGMENTS_PER_TRACK = 6


def make_data(n_tracks: int, dim: int, n_classes: int = 8, seed: int = 0, block: int = 8192):
    """(X float32 [n_tracks*6, dim], y int [N], track index [N]); built block-wise so generating
    it never holds more than the matrix itself plus one block."""
    rng = np.random.default_rng(seed)
    r_cls, r_trk, r_seg = 12, 48, 96
    if dim < r_cls + r_trk + r_seg:
        raise ValueError(f"dim must be >= {r_cls + r_trk + r_seg}")
    basis = np.linalg.qr(rng.standard_normal((dim, r_cls + r_trk + r_seg)))[0].T.astype(np.float32)
    Bc, Bt, Bs = basis[:r_cls], basis[r_cls : r_cls + r_trk], basis[r_cls + r_trk :]
    means = 2.4 * rng.standard_normal((n_classes, r_cls)).astype(np.float32)
    y_t = rng.permutation(np.arange(n_tracks) % n_classes)
    trk_cls = 2.0 * rng.standard_normal((n_tracks, r_cls)).astype(np.float32)
    trk_nuis = rng.standard_normal((n_tracks, r_trk)).astype(np.float32) * np.linspace(3, 0.5, r_trk, dtype=np.float32)
    seg_scale = np.linspace(4, 0.5, r_seg, dtype=np.float32)
    n = n_tracks * SEGMENTS_PER_TRACK
    X = np.empty((n, dim), np.float32)
    for a in range(0, n, block):
        b = min(n, a + block)
        t = np.arange(a, b) // SEGMENTS_PER_TRACK
        lat = means[y_t[t]] + trk_cls[t] + 3.0 * rng.standard_normal((b - a, r_cls), dtype=np.float32)
        X[a:b] = lat @ Bc + trk_nuis[t] @ Bt + (rng.standard_normal((b - a, r_seg), dtype=np.float32) * seg_scale) @ Bs
        X[a:b] += 0.5 * rng.standard_normal((b - a, dim), dtype=np.float32)
    tracks = np.arange(n) // SEGMENTS_PER_TRACK
    return X, y_t[tracks], tracks


# ---------------------------------------------------------------------------------------------
# one measurement (runs in a fresh process)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _estimator(head: str, config: str, cores: int):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from embedkit.heads import default_pca, make_head

    if config == "fast":
        return make_head(head, params={"n_jobs": cores}, pca=default_pca(head, int(os.environ["BENCH_DIM"]))), True
    if head == "lr":  # scikit-learn's own: lbfgs on a float64 copy
        from sklearn.linear_model import LogisticRegression

        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)), False
    if head == "lgbm":  # default-ish LightGBM on the raw embedding
        import lightgbm as lgb

        return lgb.LGBMClassifier(n_estimators=100, num_leaves=31, n_jobs=cores, verbose=-1, random_state=0), False
    if head == "mlp":  # scikit-learn's MLP, same width, its own early stopping
        from sklearn.neural_network import MLPClassifier

        return make_pipeline(
            StandardScaler(),
            MLPClassifier(hidden_layer_sizes=(256,), early_stopping=True, max_iter=200, random_state=0),
        ), False
    raise ValueError(head)


def worker(head: str, config: str, data_dir: str, cores: int) -> dict:
    import torch

    torch.set_num_threads(cores)
    d = Path(data_dir)
    X = np.load(d / "X_train.npy")
    y = np.load(d / "y_train.npy")
    g = np.load(d / "g_train.npy")
    est, takes_groups = _estimator(head, config, cores)
    fit_kw = lambda rows: {"head__groups": g[rows]} if takes_groups else {}  # noqa: E731
    # Warm-up on 2,000 rows: lazy imports, thread pools and kernels are loaded before the
    # measurement, so the peak counts what the fit needs for the data, not one-off set-up.
    from sklearn.base import clone

    clone(est).fit(X[:2000], y[:2000], **fit_kw(slice(0, 2000)))
    try:  # reset the high-water mark to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        base = _rss_kib("VmRSS")
    except OSError:
        base = None
    import resource

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    maxrss0 = ru0.ru_maxrss
    t0 = time.perf_counter()
    est.fit(X, y, **fit_kw(slice(None)))
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if base is not None:
        peak = (_rss_kib("VmHWM") - base) * 1024
    else:  # ru_maxrss never resets: only a lower bound
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss0) * 1024
    Xt = np.load(d / "X_test.npy")
    yt = np.load(d / "y_test.npy")
    gt = np.load(d / "g_test.npy")
    t1 = time.perf_counter()
    P = est.predict_proba(Xt)
    infer = time.perf_counter() - t1
    from embedkit.evaluate import aggregate

    ids, mean, vote = aggregate(gt, P)
    track_y = np.zeros(len(ids), dtype=int)
    track_y[np.searchsorted(ids, gt)] = yt
    classes = np.asarray(est.classes_)
    return {
        "head": head,
        "config": config,
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_bytes": int(peak),
        "x_bytes": int(X.nbytes),
        "segment_accuracy": float((classes[P.argmax(1)] == yt).mean()),
        "track_accuracy": float((classes[mean.argmax(1)] == track_y).mean()),
        "track_accuracy_vote": float((classes[vote] == track_y).mean()),
        "inference_ms_per_track": 1000 * infer / len(ids),
    }


# ---------------------------------------------------------------------------------------------
# driver


def run_synthetic(args) -> list[dict]:
    n_train, n_test, dim = (1600, 400, 512) if args.quick else (6400, 1600, 2048)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_heads_") as tmp:
        t0 = time.perf_counter()
        X, y, g = make_data(n_train + n_test, dim, seed=args.seed)
        cut = n_train * SEGMENTS_PER_TRACK
        for name, arr in (
            ("X_train", X[:cut]),
            ("y_train", y[:cut]),
            ("g_train", g[:cut]),
            ("X_test", X[cut:]),
            ("y_test", y[cut:]),
            ("g_test", g[cut:]),
        ):
            np.save(Path(tmp) / f"{name}.npy", arr)
        del X
        print(
            f"data: {cut:,} x {dim} float32 train ({cut * dim * 4 / 2**20:.0f} MiB), {n_test * SEGMENTS_PER_TRACK:,} test segments, 8 classes; generated in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        env = {
            **os.environ,
            "BENCH_DIM": str(dim),
            "OMP_NUM_THREADS": str(args.cores),
            "MKL_NUM_THREADS": str(args.cores),
            "OPENBLAS_NUM_THREADS": str(args.cores),
        }
        cpus = sorted(os.sched_getaffinity(0))[: args.cores] if hasattr(os, "sched_getaffinity") else None
        for head in args.heads:
            for config in ("slow", "fast") if args.slow else ("fast",):
                cmd = [sys.executable, __file__, "--_worker", head, config, tmp, "--cores", str(args.cores)]
                if cpus:
                    cmd = ["taskset", "-c", ",".join(map(str, cpus)), *cmd]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"{head}/{config} failed:\n{out.stderr[-2000:]}", flush=True)
                    continue
                rec = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(rec)
                print(
                    f"  {head:5s} {config:5s} {rec['wall_s']:7.1f} s (cpu {rec['cpu_s']:.1f} s)  peak +{rec['peak_bytes'] / rec['x_bytes']:.2f}x X  seg acc {rec['segment_accuracy']:.3f}  track acc {rec['track_accuracy']:.3f}",
                    flush=True,
                )
    print("\nhead  config   fit s  target  speed-up  cpu s  peak/X   seg acc  track acc  d(seg acc) vs slow")
    for r in rows:
        slow = next((s for s in rows if s["head"] == r["head"] and s["config"] == "slow"), None)
        target = TARGET_S[r["head"]] if r["config"] == "fast" else float("nan")
        ok = "" if r["config"] == "slow" or args.quick else ("  ok" if r["wall_s"] <= target else "  OVER")
        speed = f"{slow['wall_s'] / r['wall_s']:7.1f}x" if slow else "      -"
        dacc = f"{100 * (r['segment_accuracy'] - slow['segment_accuracy']):+.1f} pt" if slow and r is not slow else "-"
        print(
            f"{r['head']:5s} {r['config']:6s} {r['wall_s']:7.1f} {target:7.0f}{ok:5s} {speed} {r['cpu_s']:6.1f} {r['peak_bytes'] / r['x_bytes']:6.2f}x  {r['segment_accuracy']:7.3f}  {r['track_accuracy']:9.3f}  {dacc}"
        )
    return rows


def run_gtzan(args) -> None:
    """Real-data check: 5-fold CV of every head on each available backbone's gtzan_mini store."""
    from embedkit.backbones import list_backbones
    from embedkit.datasets import load_dataset
    from embedkit.extract import extract
    from embedkit.fit import fit_head

    names = [b for b in ("melstats", "musicnn-msd") if list_backbones(b)]
    tracks = load_dataset(args.gtzan)
    print(
        f"\ngtzan_mini ({len(tracks)} tracks), 5-fold stratified CV, track accuracy (mean-probability vote / majority vote)"
    )
    with tempfile.TemporaryDirectory(prefix="bench_heads_runs_") as runs:
        for name in names:
            res = extract(tracks, name, cache=args.cache)
            if res.n_extracted:
                print(f"  extracted {name}: {res.n_extracted} tracks in {res.seconds:.1f} s")
            for head in args.heads:
                t0 = time.perf_counter()
                run = fit_head(store=res.store, head=head, runs=runs, cv=5, seed=args.seed, tracks=tracks)
                m = run.metrics
                print(
                    f"  {name:12s} {head:5s} {m['track_accuracy_mean_prob']:.3f} ± {m['track_accuracy_mean_prob_std']:.3f}  "
                    f"vote {m['track_accuracy_vote']:.3f}  segment {m['segment_accuracy']:.3f}  "
                    f"train {m['train_seconds']:.1f} s  wall {time.perf_counter() - t0:.1f} s",
                    flush=True,
                )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="9,600 x 512 instead of 38,400 x 2048")
    ap.add_argument("--heads", default="lr,lgbm,mlp", type=lambda s: s.split(","))
    ap.add_argument("--no-slow", dest="slow", action="store_false", help="skip the slow reference configurations")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gtzan", help="also run 5-fold CV on this gtzan_mini folder")
    ap.add_argument("--cache", default="cache", help="embedding store root for --gtzan")
    ap.add_argument("--no-synthetic", dest="synthetic", action="store_false")
    ap.add_argument("--_worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        print(json.dumps(worker(*args._worker, cores=args.cores)))
        return
    print(f"bench_heads: {args.cores} cores (machine has {os.cpu_count()}), load average {os.getloadavg()[0]:.1f}")
    if args.synthetic:
        run_synthetic(args)
    if args.gtzan:
        run_gtzan(args)


if __name__ == "__main__":
    main()
