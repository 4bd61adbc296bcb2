"""Fused backbones on gtzan_mini (issue 26): the CV table and what per-window resampling costs.

    python bench/bench_fused.py cv     [--cache /work/ekcache] [--runs /tmp/fused/runs] [--heads lr,lgbm]
    python bench/bench_fused.py tagger [--cache /work/ekcache] [--runs /tmp/fused/runs] [--tracks 30]
    python bench/bench_fused.py repeat [--cache /work/ekcache] [--runs /tmp/fused/runs] [--seeds 5]

``cv``: 5-fold CV (``fit --cv 5``, seed 0: the same folds for every row, single and fused) of
single backbones and fusions, concat (equal / no part weights) and stack; one JSON line per
row: mean +/- std track accuracy, the per-fold accuracies, training seconds, and the number of
tracks on which the row and musicnn-msd disagree in correctness (a paired view of the noise).

``repeat``: repeated 5-fold CV (fold seeds 0..S-1, the same folds for every row within a seed)
of the single and fused rows worth comparing, with lr and with mlp ``--search``: the mean over
seeds, the spread over seeds, and the paired difference to musicnn-msd + lr seed by seed. One
5-fold split of 100 tracks moves a row by 0.01-0.04 between seeds; the mean over seeds is the
figure to compare (the 100 tracks themselves are still a small sample: none of this removes that
noise). Rows go to stdout and ``bench/results/bench_fused_repeat.json``.

``tagger``: a fused run's tagger on the audio (windows at 22.05 kHz, musicnn parts resampled
per window by ``backbones.fused.SincResampler``) against its head on the stored embeddings
(each part extracted from the whole clip resampled by soxr): relative embedding difference per
part, max |track probability difference|, top-genre agreement; and the same for soxr applied
per window, to tell the filter's share from the window edges'.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import pandas as pd

CONFIGS = [
    ("musicnn-msd", {}),
    ("musicnn-mtt", {}),
    ("melstats", {}),
    ("musicnn-msd+musicnn-mtt", {"fusion": "concat"}),
    ("musicnn-msd+musicnn-mtt", {"fusion": "stack"}),
    ("musicnn-msd+melstats", {"fusion": "concat", "weighting": "equal"}),
    ("musicnn-msd+melstats", {"fusion": "concat", "weighting": "none"}),
    ("musicnn-msd+melstats", {"fusion": "stack"}),
    ("musicnn-msd+musicnn-mtt+melstats", {"fusion": "concat", "weighting": "equal"}),
    ("musicnn-msd+musicnn-mtt+melstats", {"fusion": "concat", "weighting": "none"}),
    ("musicnn-msd+musicnn-mtt+melstats", {"fusion": "stack"}),
]


def _correct(run_dir) -> pd.Series:
    p = pd.read_csv(os.path.join(run_dir, "predictions.csv")).set_index("track_id")
    return (p["true_label"] == p["pred_label"]).sort_index()


def cv(args) -> None:
    from embedkit.fit import fit_head

    base = None
    for head in args.heads.split(","):
        for backbone, kw in CONFIGS:
            if head == "lgbm" and kw.get("weighting") == "none":
                continue
            t0 = time.perf_counter()
            r = fit_head(backbone, head, cache=args.cache, runs=args.runs, cv=5, seed=0, **kw)
            m = r.metrics
            ok = _correct(r.run_dir)
            if base is None and backbone == "musicnn-msd":
                base = ok
            row = {
                "name": m["name"],
                **{k: v for k, v in kw.items() if k != "fusion"},
                "acc": round(m["track_accuracy"], 4),
                "std": round(m.get("track_accuracy_std", 0.0), 4),
                "folds": [f["track_accuracy_mean_prob"] for f in m["folds"]],
                "train_s": round(m["train_seconds"], 2),
                "final_fit_s": round(m["final_fit_seconds"], 2),
                "head_ms_per_track": round(m["inference_ms_per_track"], 3),
                "extract_ms_per_track": m.get("extract_ms_per_track"),
                "vs_msd_lr": None
                if base is None
                else {"only_this_right": int((ok & ~base).sum()), "only_msd_right": int((~ok & base).sum())},
                "wall_s": round(time.perf_counter() - t0, 1),
                "load1": round(os.getloadavg()[0], 1),
                "run": str(r.run_dir),
            }
            print(json.dumps(row), flush=True)


REPEAT_CONFIGS = [
    ("musicnn-msd", "lr", False),
    ("musicnn-msd", "mlp", False),
    ("musicnn-msd", "mlp", True),
    ("musicnn-mtt", "lr", False),
    ("melstats", "lr", False),
    ("musicnn-msd+melstats", "lr", False),
    ("musicnn-msd+melstats", "mlp", False),
    ("musicnn-msd+melstats", "mlp", True),
    ("musicnn-msd+musicnn-mtt", "lr", False),
    ("musicnn-msd+musicnn-mtt+melstats", "lr", False),
    ("musicnn-msd+musicnn-mtt+melstats", "mlp", True),
]


def repeat(args) -> None:
    from embedkit.fit import fit_head

    base, rows = None, []
    for backbone, head, search in REPEAT_CONFIGS:
        t0 = time.perf_counter()
        accs = []
        for seed in range(args.seeds):
            r = fit_head(backbone, head, cache=args.cache, runs=args.runs, cv=5, seed=seed, search=search)
            accs.append(round(r.metrics["track_accuracy"], 4))
        a = np.array(accs)
        base = a if base is None else base
        d = a - base
        row = {
            "name": f"{backbone} + {head}{' --search' if search else ''}",
            "acc_per_seed": accs,
            "mean": round(float(a.mean()), 4),
            "sd_over_seeds": round(float(a.std(ddof=1)), 4) if len(a) > 1 else 0.0,
            "vs_msd_lr": {
                "mean": round(float(d.mean()), 4),
                "min": round(float(d.min()), 4),
                "max": round(float(d.max()), 4),
            },
            "wall_s": round(time.perf_counter() - t0, 1),
            "load1": round(os.getloadavg()[0], 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_fused_repeat.json")
    with open(out, "w") as fh:
        json.dump({"seeds": args.seeds, "folds": 5, "rows": rows}, fh, indent=1)


def tagger(args) -> None:
    import soxr

    from embedkit.deploy.tagger import load_tagger
    from embedkit.fit import fit_head
    from embedkit.fusion import open_stores, read_fused

    name = "musicnn-msd+musicnn-mtt+melstats"
    run = fit_head(name, "lr", cache=args.cache, runs=args.runs, cv=None, protocol="holdout").run_dir
    t = load_tagger(run)
    bb = t.backbone
    seg, X = read_fused(open_stores(name, args.cache))
    paths = seg.drop_duplicates("track_id").groupby("label").head(max(1, args.tracks // 10))["path"].tolist()
    dims = np.cumsum([0] + [p.spec.embedding_dim for p in bb.parts])
    rel = {p.spec.name: [] for p in bb.parts}
    rel_soxr, dp, agree, dp_soxr, agree_soxr = [], [], 0, [], 0
    t0 = time.perf_counter()
    for path in paths:
        rows = (seg["path"] == path).to_numpy()
        frames, _ = t.clip_windows(path)
        E = bb.embed(frames)
        for i, p in enumerate(bb.parts):
            a, z = dims[i], dims[i + 1]
            rel[p.spec.name].append(float(np.abs(E[:, a:z] - X[rows, a:z]).max() / np.abs(X[rows, a:z]).max()))
        # soxr on each window instead of the sinc filter (the musicnn parts only)
        E2 = E.copy()
        for i, p in enumerate(bb.parts):
            if p.spec.sample_rate != t.sample_rate:
                w = np.stack([soxr.resample(f, t.sample_rate, p.spec.sample_rate, quality="HQ") for f in frames])
                E2[:, dims[i] : dims[i + 1]] = p.embed(w[:, : round(5.0 * p.spec.sample_rate)])
        rel_soxr.append(float(np.abs(E2[:, :400] - X[rows, :400]).max() / np.abs(X[rows, :400]).max()))
        ps = t.bundle.predict_proba(X[rows]).mean(0)
        pt = t.bundle.predict_proba(E).mean(0)
        px = t.bundle.predict_proba(E2).mean(0)
        dp.append(float(np.abs(ps - pt).max()))
        dp_soxr.append(float(np.abs(ps - px).max()))
        agree += int(ps.argmax() == pt.argmax())
        agree_soxr += int(ps.argmax() == px.argmax())
    out = {
        "tracks": len(paths),
        "rel_embedding_diff_max": {k: round(max(v), 4) for k, v in rel.items()},
        "rel_embedding_diff_mean": {k: round(float(np.mean(v)), 4) for k, v in rel.items()},
        "track_p_diff_max": round(max(dp), 4),
        "track_p_diff_mean": round(float(np.mean(dp)), 4),
        "top_genre_agree": agree,
        "per_window_soxr": {
            "rel_embedding_diff_max_musicnn": round(max(rel_soxr), 4),
            "track_p_diff_max": round(max(dp_soxr), 4),
            "track_p_diff_mean": round(float(np.mean(dp_soxr)), 4),
            "top_genre_agree": agree_soxr,
        },
        "seconds": round(time.perf_counter() - t0, 1),
        "load1": round(os.getloadavg()[0], 1),
    }
    print(json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["cv", "tagger", "repeat"])
    ap.add_argument("--cache", default="/work/ekcache")
    ap.add_argument("--runs", default="/tmp/fused/runs")
    ap.add_argument("--heads", default="lr")
    ap.add_argument("--tracks", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    {"cv": cv, "tagger": tagger, "repeat": repeat}[args.what](args)


if __name__ == "__main__":
    main()
