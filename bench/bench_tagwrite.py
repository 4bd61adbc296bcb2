"""Tag-writing speed per file: ``embedkit.deploy.filetags.write_genres`` (copy, tag, verify, fsync,
atomic replace) against mutagen saving the same tags in place (no copy, no verification, no
fsync: the unsafe baseline), measured in the same run on the same files.

    python bench/bench_tagwrite.py              # 40 files of 30 s stereo 44.1 kHz per format
    python bench/bench_tagwrite.py --n 10 --dir /tmp/tagbench

Files are generated (noise + tones) into ``--dir`` (default: a temporary folder on local disk).
Goal (issue 12): <= 10 ms per file for MP3 and FLAC.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GOAL_MS = 10.0


def make(path: Path, seconds: float = 30.0, sr: int = 44100) -> Path:
    import soundfile as sf

    t = np.arange(int(sr * seconds)) / sr
    rng = np.random.default_rng(0)
    y = np.stack(
        [0.2 * np.sin(2 * np.pi * 440 * t), 0.1 * np.sin(2 * np.pi * 330 * t)], 1
    ) + 0.05 * rng.standard_normal((len(t), 2))
    sf.write(path, y.astype(np.float32), sr, **({"format": "MP3"} if path.suffix == ".mp3" else {}))
    return path


def bench(fmt: str, n: int, root: Path) -> dict:
    from embedkit.deploy import filetags as tw

    src = make(root / f"src.{fmt}")
    files = []
    for i in range(n):
        f = root / f"{fmt}{i:03d}.{fmt}"
        shutil.copyfile(src, f)
        files.append(f)
    # warm-up: imports and the page cache
    tw.write_genres(files[0], ["warm"], model="bench")
    safe = []
    for f in files:
        t0 = time.perf_counter()
        ch = tw.write_genres(f, ["Rock", "Pop"], scores=[0.9, 0.4], model="bench", overwrite=True)
        safe.append(1000 * (time.perf_counter() - t0))
        assert ch.status == "written", ch
    base = []
    for f in files:
        t0 = time.perf_counter()
        m = tw._open(f, tw.format_of(f))
        tw._set(m, tw.format_of(f), tw.TagState(["Blues"], {"EMBEDKIT_MODEL": ["bench"]}))
        tw._save(m, tw.format_of(f), 4, "/")
        base.append(1000 * (time.perf_counter() - t0))
    return {
        "format": fmt,
        "bytes": src.stat().st_size,
        "safe_ms": statistics.median(safe),
        "safe_p90_ms": float(np.percentile(safe, 90)),
        "inplace_ms": statistics.median(base),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="tagbench"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        for fmt in ("mp3", "flac"):
            r = bench(fmt, args.n, root)
            verdict = "ok" if r["safe_ms"] <= GOAL_MS else "OVER GOAL"
            print(
                f"{fmt}: {r['bytes'] / 1e6:.2f} MB files, write_genres median {r['safe_ms']:.2f} ms (p90 {r['safe_p90_ms']:.2f}) per file; "
                f"mutagen in place {r['inplace_ms']:.2f} ms; ratio {r['safe_ms'] / r['inplace_ms']:.1f}x; goal <= {GOAL_MS:g} ms: {verdict}"
            )
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
