"""Training run directories: identity, resume checks, completion; process settings.

Used by the training engine (``loop.train_run``). A run directory holds ``run.json`` (the run's
identity: every config and a fingerprint of the dataset) from its start; resuming compares the
requested identity with it and refuses any difference, naming the first differing fields.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import stable_hash
from ..errors import ConfigError, EmbedkitError
from ..io import plain


def open_run_dir(
    runs_dir: str | os.PathLike,
    run_dir: str | os.PathLike | None,
    resume: bool,
    kind: str,
    name: str,
    identity: dict[str, Any],
    progress=None,
) -> Path:
    """Create a new run directory, or reopen one to resume after checking its identity; tell
    ``progress`` where it is (so an interrupted run can be resumed)."""
    run_dir = _open_run_dir(runs_dir, run_dir, resume, kind, name, identity)
    if progress:
        progress({"event": "run_dir", "path": str(run_dir), "resumed": resume})
    return run_dir


def _open_run_dir(runs_dir, run_dir, resume: bool, kind: str, name: str, identity: dict[str, Any]) -> Path:
    from ..io import atomic_write_text
    from ..runs import check_match, run_id

    identity = plain(identity)  # tuples -> lists, as stored
    if resume:
        if run_dir is None:
            raise ConfigError("resume needs the run directory to continue (run_dir)", field="resume")
        run_dir = Path(run_dir)
        meta = run_dir / "run.json"
        if not meta.exists():
            raise EmbedkitError(f"{run_dir}: not a resumable run (no run.json)")
        old = json.loads(meta.read_text())["identity"]
        check_match(
            run_dir, "resume directory is from a different configuration", old, identity, labels=("run", "requested")
        )
        return run_dir
    run_dir = Path(run_dir) if run_dir else Path(runs_dir) / run_id(kind, name)
    if (run_dir / "run.json").exists():
        raise EmbedkitError(f"{run_dir}: already holds a run; resume it or choose another directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        run_dir / "run.json",
        json.dumps(
            {"kind": kind, "name": name, "identity": identity, "identity_hash": stable_hash(identity)}, indent=2
        ),
    )
    return run_dir


def finish_run(run_dir: Path, ev, curves, metrics: dict[str, Any], deployed: str, tracks=None) -> dict[str, Any]:
    """Copy ``models/<deployed>.pt`` (the final model after CV, else the only fold's) to
    model.pt, fit the calibration on the out-of-fold tracks (calibration.json) and write
    metrics.json (the completion mark). tracks: the run's track table; the not-music detector
    is fitted on the deployed model's window embeddings of its tracks (``model_embeddings``)."""
    from ..calibration import calibrate_run
    from ..evaluate import write_metrics
    from ..io import atomic_write

    with open(run_dir / "models" / f"{deployed}.pt", "rb") as src:  # streamed: fine-tuned models run to 100s of MB
        atomic_write(run_dir / "model.pt", lambda fh: shutil.copyfileobj(src, fh))
    m = {
        **metrics,
        **ev.metrics(),
        "learning_curves": curves,
        "model_file": "model.pt",
        "model_bytes": (run_dir / "model.pt").stat().st_size,
    }
    features, what, depths = (None, "", None) if tracks is None else model_embeddings(run_dir / "model.pt", tracks)
    m["calibration"] = calibrate_run(ev, run_dir, features, what, depths, "no decodable training audio")
    write_metrics(run_dir, m)
    return m


def model_embeddings(
    model_file: Path, tracks: pd.DataFrame
) -> tuple[dict[str, np.ndarray], str, dict[str, np.ndarray]]:
    """track id -> the model's window embeddings [K, D] of the track's clip, decoded as the run
    evaluated it (``model.file_windows``; unreadable tracks left out), what they are, and track
    id -> the same windows' ``calibration.modulation_depth`` [K] (the detector's modulation term).
    The network saw these tracks in training, so their distances are smaller than unseen
    music's: the held-out threshold is a lower bound there (bench/bench_notmusic.py)."""
    from ..errors import AudioError
    from .model import file_windows, load_model, read_model_file

    if read_model_file(model_file).get("kind") == "finetune":
        from .finetuned import load_finetuned

        model, what = load_finetuned(model_file), "fine-tuned backbone output"
    else:
        model, what = load_model(model_file), "penultimate layer (pooled convolution output)"
    from ..calibration import modulation_depth

    out: dict[str, np.ndarray] = {}
    depths: dict[str, np.ndarray] = {}
    for tid, path in zip(tracks["track_id"], tracks["path"]):
        try:
            windows = file_windows(path, model.sample_rate, model.audio, model.segment_s)
            e = model.embed_windows(windows)[1]
        except AudioError:
            continue
        if e is not None:
            out[str(tid)] = e
            depths[str(tid)] = modulation_depth(windows, model.sample_rate)
    return out, what, depths


def inference_ms_per_track(model, tracks: pd.DataFrame, test_ids: list[str], n: int = 3) -> float:
    """Wall time of ``model.predict_proba_file`` (decode -> segments -> forward -> vote) per
    track, on up to ``n`` test tracks after one warm-up call (one-time allocations and plans
    are not per-track cost)."""
    import time

    paths = list(tracks.set_index("track_id").loc[test_ids, "path"])[:n]
    model.predict_proba_file(paths[0])
    t0 = time.perf_counter()
    for p in paths:
        model.predict_proba_file(p)
    return (time.perf_counter() - t0) / len(paths) * 1000


def training_process_settings(fn):
    """Decorator for the trainers: keep freed memory for reuse while training (see
    ``keep_freed_memory``), and afterwards put back the caller's torch thread count and glibc's
    default memory policy, so library use has no lasting side effect."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        before = torch.get_num_threads()
        opts = kwargs.get("opts", args[5] if len(args) > 5 else None)
        # the allocator trick is for the CPU's heap: on an accelerator it would only pin host memory
        from ..device import resolve

        on_cpu = resolve(getattr(opts, "device", "cpu")).type == "cpu"
        kept = keep_freed_memory() if on_cpu else False
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)
            if kept:
                keep_freed_memory(False)

    return wrapper


def keep_freed_memory(keep: bool = True) -> bool:
    """Make glibc keep freed memory in the process instead of returning it to the OS.

    Training allocates and frees the same large activation / gradient tensors every step (the
    first block's are 113 MB at batch 16). glibc serves blocks over its mmap threshold with
    fresh mmaps and unmaps them on free, so every step page-faults ~100k pages back in; that
    made a training epoch ~1.4x longer on 2 cores (bench/bench_cnn.py). PyTorch's CPU tuning guide prescribes jemalloc/tcmalloc
    via LD_PRELOAD, which a pip-installed command cannot set for itself; glibc's own mallopt
    (no mmap for large blocks, no trimming) gets the same reuse. The process then keeps its
    peak heap until it exits, which a training run reaches anyway. ``keep=False`` restores
    glibc's default limits. Returns False (and does nothing) where libc has no mallopt.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    ok = mallopt(m_mmap_max, 0 if keep else 65536) == 1
    ok &= mallopt(m_trim_threshold, 2**31 - 1 if keep else 128 * 1024) == 1  # a C int
    return bool(ok)


def set_threads(threads: int | None) -> int:
    import torch

    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}", field="threads")
    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def drop_failed(
    tracks: pd.DataFrame, arrays: list, failures: list[tuple[str, str]], skip_bad: bool
) -> tuple[pd.DataFrame, list, list[dict[str, str]]]:
    """Apply ``--skip-bad`` to a cache build: stop on the first bad clip unless ``skip_bad``,
    else drop the failed clips. Returns (kept tracks, their arrays, skipped [{path, reason}])."""
    from .features import raise_failures

    raise_failures(failures, skip_bad)
    keep = [a is not None for a in arrays]
    if not all(keep):
        tracks = tracks[keep].reset_index(drop=True)
        arrays = [a for a in arrays if a is not None]
    return tracks, arrays, [{"path": p, "reason": r} for p, r in failures]


def checkpoint_identity(identity: dict[str, Any], tracks: pd.DataFrame) -> str:
    """Hash every checkpoint of a run carries: its identity plus the tracks kept after
    ``--skip-bad``. Fold positions refer to those tracks, so if the set of bad files changes
    between an interruption and the resume, the checkpoints are refused rather than misread."""
    return stable_hash(plain({**identity, "kept_tracks": tracks["track_id"].astype(str).tolist()}))


def cache_progress(progress):
    """Per cache stage, a (done, total) callback feeding the trainers' progress events."""
    return lambda what: (
        (lambda d, n: progress({"event": "cache", "what": what, "done": d, "total": n})) if progress else None
    )


def inference_note(steps: str, clip_s: float | None, segment_s: float) -> str:
    """How ``inference_ms_per_track`` was measured, with the segment count it covered."""
    n = f"{int(clip_s // segment_s)} x " if clip_s else "every "
    return f"from the audio file: {steps}, {n}{segment_s:g} s segments, forward, vote"
