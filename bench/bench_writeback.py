"""Peak memory of ``embedkit tag --write-tags`` against the number of files: flat, as ``tag``.

Each file's decided genres are written as its result arrives (``writeback.FileTagWriter``),
so nothing of a finished track is kept. The baseline is the same job without ``--write-tags``,
measured in the same run: each size runs both in fresh processes, and the script prints the
peak-RSS rise of each, their ratio, and the rise per extra file.

    python bench/bench_writeback.py                 # 2,000 and 20,000 tiny FLAC files
    python bench/bench_writeback.py --quick         # 200 and 2,000

The files are generated (distinct 1.2 s FLACs, one window of the bench's tiny-test model) into
``--dir`` (default: a temporary folder). The model is a tiny-test + logistic-regression run
trained on generated clips (seconds), so the figures are about the pipeline, not a network.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Timer, memory_runs, pin_cores, reset_peak_rss, rss_mb, write_results  # noqa: E402

SR = 16000
SECONDS = 1.2


def build_run(work: Path) -> Path:
    from embedkit.config import AudioConfig, PreprocessConfig, SegmentConfig
    from embedkit.datasets import load_dataset
    from embedkit.extract import extract
    from embedkit.fit import fit_head
    from embedkit.synth import make_dataset

    tracks = load_dataset(make_dataset(work / "synth", n_classes=4, per_class=6, duration_s=3.0))
    prep = PreprocessConfig(AudioConfig(clip_s=SECONDS), SegmentConfig(1.0, 1.0))
    extract(tracks, "tiny-test", cache=work / "cache", prep=prep, workers=1)
    return fit_head("tiny-test", "lr", cache=work / "cache", runs=work / "runs", name="wb").run_dir


def make_files(root: Path, n: int) -> Path:
    """root/c<i % 8>/<i>.flac, n distinct contents (two samples differ per file)."""
    import soundfile as sf

    from embedkit.synth import make_clip

    base = [make_clip(c, 7, SR, SECONDS) for c in range(4)]
    for i in range(n):
        p = root / f"c{i % 8}" / f"{i:05d}.flac"
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            y = base[i % 4].copy()
            y[0], y[1] = (i % 256) / 32768, (i // 256) / 32768
            sf.write(p, y, SR)
    return root


def child(run: str, data: str, cores: int, write: bool) -> None:
    import gc

    pin_cores(cores)
    from embedkit.deploy.batch import tag
    from embedkit.deploy.tagger import load_tagger
    from embedkit.deploy.writeback import FileTagOptions

    tagger = load_tagger(run)
    files = sorted(Path(data).rglob("*.flac"))
    opts = FileTagOptions(overwrite=True) if write else None
    with tempfile.TemporaryDirectory() as tmp:  # warm-up (imports, caches) on copies of 8 files
        import shutil

        warm = [shutil.copy(f, Path(tmp) / f"w{i}.flac") for i, f in enumerate(files[:8])]
        tag(run, warm, db=Path(tmp) / "w.sqlite", tagger=tagger, workers=cores, file_tags=opts, threshold=0.0)
    gc.collect()
    base = rss_mb("VmRSS")
    reset_peak_rss()
    with tempfile.TemporaryDirectory() as tmp, Timer() as t:
        res = tag(run, files, db=Path(tmp) / "m.sqlite", tagger=tagger, workers=cores, file_tags=opts, threshold=0.0)
    peak = rss_mb("VmHWM")
    written = res.file_tags.counts.get("written", 0) if res.file_tags else 0
    print(
        json.dumps(
            {
                "files": len(files),
                "tagged": res.n_tagged,
                "written": written,
                "base_mb": base,
                "peak_mb": peak,
                "rise_mb": peak - base,
                "seconds": t.s,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 and 2,000 files")
    ap.add_argument("--dir", type=Path, default=None, help="where the generated files go")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--child", nargs=3, metavar=("RUN", "DATA", "WRITE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.cores, args.child[2] == "1")
        return
    sizes = [200, 2000] if args.quick else [2000, 20000]
    work = args.dir or Path(tempfile.mkdtemp(prefix="embedkit-wb-"))
    run = build_run(work)
    out = {}
    for write in (False, True):
        label = "tag --write-tags" if write else "tag (baseline, no --write-tags)"
        print(f"{label}:", flush=True)

        def cmd(n, write=write):
            # each size and mode on its own copy: a written file is not written again
            data = make_files(work / f"{'w' if write else 't'}-{n}", n)
            return [
                sys.executable,
                __file__,
                "--cores",
                str(args.cores),
                "--child",
                str(run),
                str(data),
                str(int(write)),
            ]

        out["write_tags" if write else "baseline"] = memory_runs(
            sizes, cmd, "files", "file", "the path, fingerprint and written-path set of one file"
        )
    for n in sizes:
        w, b = out["write_tags"]["runs"][n], out["baseline"]["runs"][n]
        if w["written"] != n:
            raise SystemExit(f"only {w['written']} of {n} files were written: the figure would mean nothing")
        print(
            f"{n} files: peak-RSS rise with --write-tags {w['rise_mb']:.1f} MiB vs {b['rise_mb']:.1f} MiB without"
            f" ({w['rise_mb'] / max(b['rise_mb'], 1.0):.2f}x); {w['seconds'] / n * 1e3:.1f} vs"
            f" {b['seconds'] / n * 1e3:.1f} ms per file",
            flush=True,
        )
    print(f"results: {write_results('bench_writeback', {'sizes': sizes, **out})}")


if __name__ == "__main__":
    main()
