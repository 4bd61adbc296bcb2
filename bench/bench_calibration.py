"""Calibration methods compared on real runs: none, temperature scaling (what embedkit ships)
and isotonic regression of the top-class confidence, each cross-fitted over the CV folds (a
fold's tracks are calibrated by a map fitted on the other folds only), so every score is on
tracks the map never saw.

    python bench/bench_calibration.py --data ../shared/data/gtzan_mini --cache /tmp/calib_cache \\
        --backbones musicnn-msd,melstats --head lr --cv 5

Needs the backbones' stores in --cache (`embedkit extract DATA --backbone B --cache ...`).
Prints ECE (15 bins), NLL, Brier and accuracy per method, and the ECE a perfectly calibrated
model would show on that many tracks (labels drawn from its own probabilities).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def isotonic_cross_fit(p: np.ndarray, y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Top-class confidence mapped by an isotonic fit of correctness on the other folds; the
    other classes rescaled to keep each row summing to 1."""
    from sklearn.isotonic import IsotonicRegression

    out = np.empty_like(p)
    conf, top = p.max(axis=1), p.argmax(axis=1)
    right = (top == y).astype(float)
    for g in dict.fromkeys(groups.tolist()):
        te = groups == g
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(conf[~te], right[~te])
        c_new = np.clip(iso.predict(conf[te]), 1e-6, 1 - 1e-6)
        rest = 1.0 - conf[te]
        q = p[te] * ((1.0 - c_new) / np.where(rest > 0, rest, 1.0))[:, None]
        q[np.arange(te.sum()), top[te]] = c_new
        out[te] = q / q.sum(axis=1, keepdims=True)
    return out


def run_one(backbone: str, head: str, cache: Path, data: Path, cv: int) -> None:
    from embedkit import calibration as C
    from embedkit.fit import fit_head

    captured = []
    real = C.calibrate_run
    C.calibrate_run = lambda ev, d, *a, **k: (captured.append(ev), real(ev, d, *a, **k))[1]
    try:
        with tempfile.TemporaryDirectory() as runs:
            fit_head(backbone, head, cache=cache, data=data, runs=runs, cv=cv)
    finally:
        C.calibrate_run = real
    df, p = captured[0].track_probabilities()
    y, groups = df["true"].to_numpy(), df["fold"].to_numpy().astype(object)
    methods = {"none": p, "temperature": C.cross_fit(p, y, groups)[0], "isotonic": isotonic_cross_fit(p, y, groups)}
    print(f"{backbone}+{head} ({len(y)} tracks, {cv}-fold CV, cross-fitted over the folds)")
    for name, q in methods.items():
        s = C.scores(q, y)
        print(
            f"  {name:12s} ECE {s['ece']:.3f}  NLL {s['nll']:.3f}  Brier {s['brier']:.3f}  accuracy {s['accuracy']:.3f}"
        )
    floor = C.ece_if_calibrated(methods["temperature"])
    print(
        f"  ECE of a perfectly calibrated model with these confidences: mean {floor['mean']:.3f}, p90 {floor['p90']:.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--backbones", default="musicnn-msd,melstats")
    ap.add_argument("--head", default="lr")
    ap.add_argument("--cv", type=int, default=5)
    args = ap.parse_args()
    for b in args.backbones.split(","):
        run_one(b, args.head, args.cache, args.data, args.cv)


if __name__ == "__main__":
    main()
