"""Accuracy effect of ``--precision`` on gtzan_mini: musicnn-msd embeddings at fp32 and at a
reduced precision (bf16 on the CPU, or fp16 / bf16 on ``--device cuda``), then the 5-fold
logistic-regression accuracy of each store.

    python bench/bench_precision.py                       # cpu, bf16 vs fp32
    python bench/bench_precision.py --device cuda --precision fp16

Prints the largest absolute and relative embedding difference, the share of segments whose
musicnn tag argmax changes, the two 5-fold track accuracies (same folds, same head) and the
extraction seconds of each precision (the ratio is against the same run's fp32 figure).
Needs ../shared/data/gtzan_mini. Results also go to bench/results/bench_precision.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, pin_cores, write_results  # noqa: E402

GTZAN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gtzan_mini"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--backbone", default="musicnn-msd")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--data", type=Path, default=GTZAN)
    args = ap.parse_args()
    pin_cores(args.cores)

    from embedkit.datasets import load_dataset
    from embedkit.extract import extract
    from embedkit.fit import fit_head

    tracks = load_dataset(args.data)
    out: dict = {
        "device": args.device,
        "precision": args.precision,
        "backbone": args.backbone,
        "n_tracks": len(tracks),
        "load_avg_start": load_average(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        stores, acc = {}, {}
        for prec in ("fp32", args.precision):
            t0 = time.perf_counter()
            res = extract(
                tracks,
                args.backbone,
                cache=Path(tmp) / prec,
                outputs=("taggram",),
                device=args.device,
                precision=prec,
                batch_size=None,
            )
            out[f"extract_s_{prec}"] = time.perf_counter() - t0
            stores[prec] = res.store
            fit = fit_head(
                args.backbone,
                "lr",
                cache=Path(tmp) / prec,
                runs=Path(tmp) / f"runs-{prec}",
                tracks=tracks,
                cv=5,
                seed=0,
            )
            acc[prec] = (fit.metrics["track_accuracy"], fit.metrics.get("track_accuracy_std"))
        (m32, e32), (mlo, elo) = stores["fp32"].read(), stores[args.precision].read()
        assert list(m32["fingerprint"]) == list(mlo["fingerprint"]) and list(m32["segment"]) == list(mlo["segment"])
        t32, tlo = stores["fp32"].read(output="taggram")[1], stores[args.precision].read(output="taggram")[1]
    d = np.abs(elo - e32)
    out.update(
        max_abs_diff=float(d.max()),
        mean_abs_diff=float(d.mean()),
        max_abs_embedding=float(np.abs(e32).max()),
        rel_diff=float(d.max() / np.abs(e32).max()),
        tag_argmax_changed=float((t32.argmax(1) != tlo.argmax(1)).mean()),
        acc_fp32=acc["fp32"][0],
        acc_fp32_std=acc["fp32"][1],
        acc_low=acc[args.precision][0],
        acc_low_std=acc[args.precision][1],
        speed_ratio=out["extract_s_fp32"] / out[f"extract_s_{args.precision}"],
        load_avg_end=load_average(),
    )
    print(f"{args.backbone} on {args.device}, {len(tracks)} gtzan_mini clips, {len(e32)} segments")
    print(
        f"embeddings {args.precision} vs fp32: max |diff| {out['max_abs_diff']:.4g} (largest |embedding| {out['max_abs_embedding']:.3g}, {100 * out['rel_diff']:.2f} %), mean |diff| {out['mean_abs_diff']:.3g}"
    )
    print(f"segments whose top tag changes: {100 * out['tag_argmax_changed']:.1f} %")
    print(
        f"5-fold lr track accuracy: fp32 {out['acc_fp32']:.3f} +/- {out['acc_fp32_std'] or 0:.3f}, {args.precision} {out['acc_low']:.3f} +/- {out['acc_low_std'] or 0:.3f}"
    )
    print(
        f"extraction: fp32 {out['extract_s_fp32']:.1f} s, {args.precision} {out[f'extract_s_{args.precision}']:.1f} s (fp32/{args.precision} = {out['speed_ratio']:.2f}x); load average {out['load_avg_start']:.1f} -> {out['load_avg_end']:.1f}"
    )
    write_results("bench_precision", out)


if __name__ == "__main__":
    main()
