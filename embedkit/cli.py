"""`embedkit` command line. Each command validates its arguments, calls one library function
and prints a summary. Heavy libraries are imported inside commands so `--help` is instant.
Errors raised on purpose (EmbedkitError) become one line on stderr and exit code 1."""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Music genre classification: pretrained embeddings + light heads vs. a CNN from scratch.",
)


def _fail(msg: str, code: int = 1):
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


#: config fields whose command-line option is not ``--<field with dashes>``
OPTION_NAMES = {
    "clip_s": "--clip",
    "segment_s": "--segment",
    "crop_min_s": "--crop-min",
    "crop_max_s": "--crop-max",
    "wave_mode": "--wave-aug",
    "p": "--aug-p",
}


def option_message(exc) -> str:
    """A ConfigError's message with the config field it starts with shown as the CLI option."""
    msg, name = str(exc), getattr(exc, "field", None)
    if name and msg.startswith(name):
        return OPTION_NAMES.get(name, "--" + name.replace("_", "-")) + msg[len(name) :]
    return msg


def handle_errors(fn):
    """Turn library errors into one clear line and a non-zero exit; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import ConfigError, EmbedkitError

        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            _fail(option_message(exc))
        except EmbedkitError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail(
                "interrupted; finished work is kept (extraction and `embedkit run` resume by themselves; train-cnn / finetune with --resume RUN_DIR)",
                130,
            )
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:  # a bug or an unforeseen input: still one line, no traceback
            if os.environ.get("EMBEDKIT_DEBUG"):
                raise
            from .errors import first_line

            _fail(f"internal error: {first_line(exc, with_type=True)} (set EMBEDKIT_DEBUG=1 for the traceback)")

    return wrapper


def console():
    from rich.console import Console

    return Console(stderr=True)


def track_progress(description: str):
    """A rich progress bar driven by callback(done, total); returns (progress, callback)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    prog = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console(),
        transient=False,
    )
    task = prog.add_task(description, total=None)

    def callback(done: int, total: int):
        prog.update(task, completed=done, total=total)

    return prog, callback


# -- the device options: ONE definition, used by every command that runs a network -----------
_DEVICE_HELP = "where networks run: auto (CUDA, else Apple MPS, else CPU) | cpu | cuda | cuda:N | mps"
_TF32_HELP = (
    "CUDA: allow TF32 matmuls/convolutions (faster; ~1e-3 relative difference from the CPU; off by default for parity)"
)
_PRECISION_HELP = "inference precision: fp32 | bf16 | fp16 (autocast; fp16 on accelerators only; changes results slightly, see README)"


def threshold_option():
    return typer.Option(
        None,
        help="below this calibrated probability a track is 'uncertain' (default: the model's, chosen on its held-out tracks)",
    )


def multi_option():
    return typer.Option(
        None,
        "--multi/--single",
        help="several genres per track: those at or above --multi-threshold or within --margin of the top one (default: the model's rule)",
    )


def multi_threshold_option():
    return typer.Option(
        None, help="with --multi: also keep genres at or above this probability (default: the model's, 0.3)"
    )


def margin_option():
    return typer.Option(
        None, help="with --multi: also keep genres within this of the top probability (default: the model's, 0.1)"
    )


def max_genres_option():
    return typer.Option(None, help="with --multi: at most this many genres (default: the model's, 3)")


def device_option():
    return typer.Option("auto", "--device", help=_DEVICE_HELP)


def tf32_option():
    return typer.Option(False, "--allow-tf32", help=_TF32_HELP)


def precision_option():
    return typer.Option("fp32", "--precision", help=_PRECISION_HELP)


def _device_line(info: dict) -> str:
    """'device cuda:0 (NVIDIA H200), fp32' for a summary line ('' when nothing ran)."""
    if not info:
        return ""
    extra = "" if info.get("precision", "fp32") == "fp32" else f", {info['precision']}"
    return f"device {info.get('device')} ({info.get('name')}){extra}"


@app.command("models")
@handle_errors
def models_cmd(pattern: str = typer.Argument("*", help="glob over backbone names")):
    """List registered backbones with sample rate, embedding size and weight source."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .backbones import list_backbones

    specs = list_backbones(pattern)
    if not specs:
        _fail(f"no backbone matches {pattern!r}; valid names: {', '.join(s.name for s in list_backbones())}")
    table = Table(title="embedkit backbones")
    for col in ("name", "sample rate", "dim", "segment", "outputs", "weights", "licence", "needs"):
        table.add_column(col)
    for s in specs:
        # escape: "pip install 'embedkit[ast]'" must not be read as rich markup
        table.add_row(
            s.name,
            f"{s.sample_rate} Hz",
            str(s.embedding_dim),
            f"{s.segment_s:g} s",
            ", ".join(("embedding", *s.outputs)),
            escape(s.weights),
            s.license,
            escape(s.requires or "-"),
        )
    Console(width=200).print(table)


def _load_tracks(data: Path, audio_dir: Optional[Path], subset: str):
    from .datasets import load_dataset

    return load_dataset(data, audio_dir=audio_dir, subset=subset)


def _prep(clip_s: float, offset_s: float, pad: str, segment_s: float, hop_s: Optional[float]):
    from .config import AudioConfig, PreprocessConfig, SegmentConfig

    if pad not in ("loop", "zero"):
        _fail(f"--pad must be 'loop' or 'zero', got {pad!r}")
    if segment_s <= 0 or (hop_s is not None and hop_s <= 0):
        _fail("--segment and --hop must be positive")
    return PreprocessConfig(
        AudioConfig(clip_s=clip_s if clip_s > 0 else None, offset_s=offset_s, pad_mode=pad),
        SegmentConfig(segment_s, hop_s or segment_s),
    )


@app.command("extract")
@handle_errors
def extract_cmd(
    data: Path = typer.Argument(..., help="folder <label>/<file>, CSV manifest, or FMA tracks.csv"),
    backbone: str = typer.Option("musicnn-msd", "--backbone", "-b", help="registered backbone (see `embedkit models`)"),
    cache: Path = typer.Option(Path("cache"), help="embedding store root"),
    checkpoint: Optional[str] = typer.Option(None, help="weights file (PANNs) or model directory / hub id (AST)"),
    audio_dir: Optional[Path] = typer.Option(None, help="FMA audio folder (fma_small/) for a tracks.csv"),
    subset: str = typer.Option("small", help="FMA subset"),
    clip: float = typer.Option(30.0, help="clip length in seconds (0 keeps native length)"),
    offset: float = typer.Option(0.0, help="start of the kept part of longer clips, seconds"),
    pad: str = typer.Option("loop", help="short clips: loop | zero"),
    segment: float = typer.Option(5.0, help="segment length, seconds"),
    hop: Optional[float] = typer.Option(None, help="segment hop, seconds (default: segment length)"),
    workers: Optional[int] = typer.Option(
        None, help="lanes on the CPU (embedkit.jobs), decode threads on an accelerator (default: CPU count)"
    ),
    batch_size: Optional[int] = typer.Option(
        None, help="segments per forward pass (default 32 on the CPU, 8x on an accelerator)"
    ),
    outputs: List[str] = typer.Option([], "--output", help="extra outputs to store, e.g. taggram"),
    retry_failed: bool = typer.Option(False, help="retry files recorded as failed by earlier runs"),
    strict: bool = typer.Option(False, help="exit non-zero if any file failed"),
    dask: Optional[str] = typer.Option(None, help="run shards on a Dask cluster: scheduler address, or 'local'"),
    device: str = device_option(),
    allow_tf32: bool = tf32_option(),
    precision: str = precision_option(),
):
    """Extract per-segment embeddings into a resumable Parquet store."""
    import warnings

    prep = _prep(clip, offset, pad, segment, hop)
    if batch_size is not None and batch_size < 1:
        _fail("--batch-size must be >= 1")
    if workers is not None and workers < 1:
        _fail("--workers must be >= 1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:  # errors become one line in handle_errors
            res, log_note = _run_extract(
                data,
                backbone,
                cache,
                checkpoint,
                audio_dir,
                subset,
                prep,
                workers,
                batch_size,
                outputs,
                retry_failed,
                dask,
                {"device": device, "allow_tf32": allow_tf32, "precision": precision},
            )
        finally:
            _print_warnings(caught)
    _summarise_extract(res, log_note, strict)


def _print_warnings(caught) -> None:
    """Library warnings (padding, skipped manifest rows, ...) as one line each, no source lines."""
    from rich.markup import escape  # file names may contain [brackets]

    c = console()
    seen = set()
    for w in caught:
        if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning)):
            continue  # addressed to developers, not to the person running the command
        from .errors import first_line

        msg = first_line(w.message, limit=None) if str(w.message).strip() else w.category.__name__
        if msg not in seen:
            seen.add(msg)
            c.print(f"[yellow]warning[/] {escape(msg)}", highlight=False, soft_wrap=True)


def _run_extract(
    data,
    backbone,
    cache,
    checkpoint,
    audio_dir,
    subset,
    prep,
    workers,
    batch_size,
    outputs,
    retry_failed,
    dask,
    device_kw=None,
):
    from .device import precheck
    from .extract import extract
    from .jobs import job_environment

    device_kw = dict(device_kw or {})
    if not dask:  # an unusable device or precision: one line before the dataset is read
        precheck(device_kw.get("device"), device_kw.get("allow_tf32", False), device_kw.get("precision"))
    tracks = _load_tracks(data, audio_dir, subset)
    # MP3 decoders print warnings straight to fd 2 ("Xing stream size off ..."), once per file:
    # they go to a decoder log (kept next to the store) instead of between progress lines.
    with job_environment(dask) as env:
        # extract() builds the model only when there is work (a no-op re-run loads nothing)
        # and reports progress once it is loaded: the bar starts then, so a missing or
        # corrupt checkpoint is one error line rather than an error under an empty bar.
        prog, bar = track_progress(f"extract {backbone}")

        def cb(done: int, total: int) -> None:
            if total:  # no bar for a run with nothing to do
                prog.start()  # idempotent
            bar(done, total)

        try:
            try:
                res = extract(
                    tracks,
                    backbone,
                    cache=cache,
                    checkpoint=checkpoint,
                    prep=prep,
                    workers=workers,
                    batch_size=batch_size,
                    outputs=tuple(outputs),
                    executor=env.executor,
                    retry_failed=retry_failed,
                    progress=cb,
                    **device_kw,
                )
            except OSError as exc:  # disk full, permissions on --cache, ...
                _fail(f"{getattr(exc, 'filename', None) or cache}: {exc.strerror or exc}")
        finally:
            prog.stop()
        env.log_home = res.store.root / "decoder.log"
    return res, env.note


def _print_failures(c, failures: list[dict], max_lines: int) -> bool:
    """One 'skipped PATH: reason' line per failure, at most ``max_lines``, then a count by
    reason; returns True when some were left out."""
    from collections import Counter

    from rich.markup import escape  # file names may contain [brackets]

    for f in failures[:max_lines]:
        c.print(f"[yellow]skipped[/] {escape(f['path'])}: {escape(f['reason'])}", highlight=False, soft_wrap=True)
    if len(failures) <= max_lines:
        return False
    reasons = Counter(f["reason"].split(" (")[0].split(":")[0] for f in failures)
    c.print(
        escape(
            f"... and {len(failures) - max_lines} more; by reason: "
            + ", ".join(f"{r} x{n}" for r, n in reasons.most_common(5))
        ),
        highlight=False,
        soft_wrap=True,
    )
    return True


def _summarise_extract(res, log_note: str, strict: bool, max_lines: int = 20) -> None:

    from rich.markup import escape  # file names may contain [brackets]

    c = console()
    c.print(
        f"[green]{escape(str(res.store.root))}[/]: {res.n_extracted} tracks extracted ({res.n_segments} segments), "
        f"{res.n_done_before} already done, {res.n_failed} failed"
        + (f", {res.n_shared} share their audio with another track (extracted once)" if res.n_shared else "")
        + (
            f" (+{res.n_failed_before} failed in earlier runs; --retry-failed retries them)"
            if res.n_failed_before
            else ""
        )
        + f", {res.seconds:.1f} s"
        + (f"; {escape(_device_line(res.device))}" if getattr(res, "device", None) else ""),
        highlight=False,
        soft_wrap=True,
    )
    if _print_failures(c, res.failures, max_lines):
        c.print(
            escape(f"all failures: pandas.read_parquet('{res.store.failures_dir}')"), highlight=False, soft_wrap=True
        )
    if res.notes:
        c.print(
            f"[yellow]note[/] {len(res.notes)} clip(s) adjusted to the clip length, e.g. {escape(res.notes[0])}",
            highlight=False,
            soft_wrap=True,
        )
    if log_note:
        c.print(escape(log_note), highlight=False, soft_wrap=True)
    if res.nothing_done:
        _fail(f"nothing could be extracted: {res.n_failed_total} of {res.n_inputs} files failed")
    if strict and res.n_failed_total:
        _fail(f"--strict: {res.n_failed_total} of {res.n_inputs} files failed")


@app.command("report")
@handle_errors
def report_cmd(
    runs: List[Path] = typer.Argument(
        None, help="run directories, metrics.json files or folders of runs (default: runs/)"
    ),
    out: Path = typer.Option(Path("reports/report.html"), "--out", "-o", help="HTML file to write"),
    title: Optional[str] = typer.Option(None, help="report title"),
):
    """Write one self-contained HTML comparison of every run's metrics.json."""
    from .report import build_report

    path, ctx = build_report(list(runs or [Path("runs")]), out, title=title)
    c = console()
    for s in ctx["skipped"]:
        c.print(f"[yellow]skipped[/] {s['path']}: {s['reason']}")
    best = ctx["runs"][0]
    c.print(f"{len(ctx['runs'])} runs; best: {best.label} ({100 * best.acc:.1f} % track accuracy)")
    typer.echo(str(path))


def _training_progress(title: str, announce_run_dir: bool = True):
    """Rich progress for train-cnn / finetune: fold, epoch, loss, validation accuracy, ETA.

    Returns (progress, callback(event)). The total assumes every fold runs all epochs; a fold
    that stops early jumps the bar to its end, so the ETA only ever improves."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    prog = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console(),
        transient=False,
    )
    cache_task = task = None
    state = {"val_acc": "-", "steps": None}

    def callback(e: dict):
        nonlocal cache_task, task
        prog.start()  # on the first event, so an early error prints no empty bar (idempotent)
        kind = e["event"]
        if kind == "run_dir":
            if not announce_run_dir:  # `embedkit run` resumes by itself and logs the directory
                return
            verb = "resuming" if e["resumed"] else "run directory"
            prog.console.print(
                f"{verb} {e['path']} (if interrupted, continue with --resume {e['path']})",
                highlight=False,
                soft_wrap=True,
            )
            return
        if kind == "cache":
            if cache_task is None:
                cache_task = prog.add_task(f"caching {e['what']}", total=e["total"], info="")
            prog.update(cache_task, completed=e["done"], total=e["total"], description=f"caching {e['what']}")
            return
        n_folds, epochs = e.get("n_folds", 1), e.get("epochs", 1)
        if kind == "step":
            state["steps"] = e["steps"]
            done = ((e["fold_index"] * epochs) + e["epoch"] - 1) * e["steps"] + e["step"]
            if task is None:
                task = prog.add_task(title, total=None, info="")
            prog.update(
                task,
                total=n_folds * epochs * e["steps"],
                completed=done,
                description=f"{title} {e['fold']} ({e['fold_index'] + 1}/{n_folds}) epoch {e['epoch']}/{epochs}",
                info=f"loss {e['loss']:.3f}  val acc {state['val_acc']}",
            )
        elif kind == "epoch":
            state["val_acc"] = "-" if e.get("val_acc") is None else f"{e['val_acc']:.2f}"
            if e.get("stopped") and state["steps"] and task is not None:
                prog.update(task, completed=(e["fold_index"] + 1) * epochs * state["steps"])
        elif kind == "fold_done":
            prog.console.print(
                f"{e['fold']}: track accuracy {e['track_accuracy_mean_prob']:.3f} (vote {e['track_accuracy_vote']:.3f}), best epoch {e['best_epoch']} of {e['epochs_run']}",
                highlight=False,
            )

    return prog, callback


def _print_run(res) -> None:
    m = res.metrics
    std = f" +/- {m['track_accuracy_std']:.3f}" if "track_accuracy_std" in m else ""
    console().print(
        f"[green]{res.run_dir}[/]: {m['name']} track accuracy {m['track_accuracy']:.3f}{std} (mean prob), "
        f"{m['track_accuracy_vote']:.3f} (vote); {m['n_params']:,} params, {m['model_bytes'] / 1e6:.1f} MB, "
        f"train {m['train_seconds']:.0f} s, inference {m['inference_ms_per_track']:.0f} ms/track",
        highlight=False,
        soft_wrap=True,
    )
    for s in m.get("skipped", [])[:10]:
        console().print(f"[yellow]skipped[/] {s['path']}: {s['reason']}", highlight=False)


_AUG_HELP = "augmentations: none, all, or a comma list of noise,gain,stretch,pitch,shift,specaugment,mixup"


def _shared_training_options(
    data: Path = typer.Argument(..., help="folder <label>/<file>, CSV manifest, or FMA tracks.csv"),
    cv: Optional[int] = typer.Option(
        None, "--cv", help="stratified K-fold CV (default: the dataset split, else an 80/20 holdout)"
    ),
    test_size: float = typer.Option(0.2, help="holdout test fraction"),
    epochs: int = typer.Option(50, help="maximum epochs (early stopping on the validation loss)"),
    batch_size: int = typer.Option(16),
    lr_schedule: str = typer.Option("constant", help="constant | cosine (decays to 0 over --epochs)"),
    weight_decay: float = typer.Option(0.0, help="Adam weight decay"),
    patience: int = typer.Option(10, help="epochs without a better validation loss before stopping"),
    val_size: float = typer.Option(0.15, help="fraction of each training part used for early stopping"),
    crop: str = typer.Option(
        "random", help="random: 3-5 s crops (--crops-per-clip per epoch); fixed: the 6 x 5 s segments"
    ),
    crop_min: float = typer.Option(3.0, help="shortest random crop, seconds"),
    crop_max: float = typer.Option(5.0, help="longest random crop, seconds"),
    crops_per_clip: int = typer.Option(1, help="random crops of each clip per epoch"),
    segment: float = typer.Option(5.0, help="evaluation segment length, seconds"),
    augment: str = typer.Option("none", help=_AUG_HELP),
    wave_aug: str = typer.Option("pool", help="waveform augmentation: pool (pre-augmented variants) | online"),
    pool_size: int = typer.Option(4, help="pre-augmented variants per clip (pool mode)"),
    aug_p: float = typer.Option(0.5, help="probability of each waveform augmentation"),
    mixup_alpha: float = typer.Option(0.2, help="mixup Beta(alpha, alpha)"),
    seed: int = typer.Option(0),
    clip: float = typer.Option(30.0, help="clip length every file is brought to, seconds"),
    runs: Path = typer.Option(Path("runs"), help="folder for run directories"),
    resume: Optional[Path] = typer.Option(None, help="continue the run in this directory (same options)"),
    cache: Path = typer.Option(Path("cache"), help="clip cache root"),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: all cores)"),
    workers: Optional[int] = typer.Option(None, help="decode threads for caching"),
    skip_bad: bool = typer.Option(False, help="drop unusable clips (unreadable, too short) instead of stopping"),
    audio_dir: Optional[Path] = typer.Option(None, help="FMA audio folder (fma_small/) for a tracks.csv"),
    subset: str = typer.Option("small", help="FMA subset"),
    name: Optional[str] = typer.Option(
        None, help="run name in metrics.json (default: cnn-scratch / finetune-<backbone>, + augmentations)"
    ),
    device: str = device_option(),
    allow_tf32: bool = tf32_option(),
):
    """The options train-cnn and finetune share (one block: a new training option is one
    parameter here and one field of TrainConfig / AugmentConfig / RunOptions)."""


@dataclass
class TrainingArgs:
    """The shared options, parsed: what a training command passes to its library call."""

    train: Any  # cnn.loop.TrainConfig
    augment: Any  # cnn.augment.AugmentConfig
    audio: Any  # config.AudioConfig
    run: dict[str, Any]  # cnn.loop.RunOptions fields
    load_tracks: Callable[[], Any] = field(repr=False, default=lambda: None)

    @functools.cached_property
    def tracks(self):
        """The dataset's track table, read on first use (after the command checked its options)."""
        return self.load_tracks()


def _training_args(o: dict[str, Any], fixed: dict[str, Any]) -> TrainingArgs:
    from .cnn.augment import AugmentConfig
    from .cnn.loop import TrainConfig
    from .config import AudioConfig
    from .device import precheck

    precheck(o["device"], o["allow_tf32"])  # an unusable device: one line before the dataset is read

    train = TrainConfig(
        epochs=o["epochs"],
        batch_size=o["batch_size"],
        lr_schedule=o["lr_schedule"],
        weight_decay=o["weight_decay"],
        patience=o["patience"],
        val_size=o["val_size"],
        crop=o["crop"],
        crop_min_s=o["crop_min"],
        crop_max_s=o["crop_max"],
        crops_per_clip=o["crops_per_clip"],
        segment_s=o["segment"],
        seed=o["seed"],
        **fixed,
    )
    train.validate()
    aug = AugmentConfig.parse(
        o["augment"], wave_mode=o["wave_aug"], pool_size=o["pool_size"], mixup_alpha=o["mixup_alpha"], p=o["aug_p"]
    )
    run = {
        "cv": o["cv"],
        "test_size": o["test_size"],
        "runs_dir": o["runs"],
        "run_dir": o["resume"],
        "resume": o["resume"] is not None,
        "cache": o["cache"],
        "threads": o["threads"],
        "workers": o["workers"],
        "skip_bad": o["skip_bad"],
        "name": o["name"],
        "device": o["device"],
        "allow_tf32": o["allow_tf32"],
    }
    return TrainingArgs(
        train, aug, AudioConfig(clip_s=o["clip"]), run, lambda: _load_tracks(o["data"], o["audio_dir"], o["subset"])
    )


def training_command(fixed: dict[str, Any] | None = None, **defaults):
    """Give a command the shared training options beside its own: the command is called as
    ``fn(args: TrainingArgs, **its own options)``. ``defaults``: this command's defaults of
    shared options; ``fixed``: TrainConfig fields the command does not expose."""
    import inspect
    import typing
    from copy import copy

    shared_sig = inspect.signature(_shared_training_options)
    shared_hints = typing.get_type_hints(_shared_training_options)

    def deco(fn):
        own_sig = inspect.signature(fn)
        own_hints = typing.get_type_hints(fn)
        own = [p for n, p in own_sig.parameters.items() if n != "args"]
        shared = []
        for n, p in shared_sig.parameters.items():
            info = p.default
            if n in defaults:
                info = copy(info)
                info.default = defaults[n]
            shared.append(p.replace(default=info, annotation=shared_hints[n]))
        params = [shared[0], *(p.replace(annotation=own_hints.get(p.name, p.annotation)) for p in own), *shared[1:]]
        names = [p.name for p in shared]

        @functools.wraps(fn)
        def wrapper(**kw):
            o = {n: kw.pop(n) for n in names}
            return fn(_training_args(o, fixed or {}), **kw)

        wrapper.__signature__ = inspect.Signature(params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # typer reads __signature__, not the inner function's
        return wrapper

    return deco


def _train(title: str, call) -> None:
    """Run a training library call under the training progress bar; print the run's summary."""
    prog, cb = _training_progress(title)
    try:
        res = call(cb)
    finally:
        prog.stop()
    _print_run(res)


@app.command("train-cnn")
@handle_errors
@training_command()
def train_cnn_cmd(
    args: TrainingArgs,
    lr: float = typer.Option(1e-3, help="Adam learning rate"),
    normalize: str = typer.Option(
        "standard", help="standard (per-band, fitted on training clips) | minmax (per image) | none"
    ),
    channels: str = typer.Option("32,64,128,128", help="filters per conv block"),
    dropout: float = typer.Option(0.5),
    block_order: str = typer.Option("conv-pool-bn-relu", help="conv-pool-bn-relu (faster on CPU) | conv-bn-relu-pool"),
):
    """Train the log-mel CNN from scratch; writes runs/<run-id>/ (metrics.json, model.pt)."""
    from dataclasses import replace

    from .cnn.train import train_cnn

    try:
        chans = tuple(int(c) for c in channels.split(",") if c.strip())
    except ValueError:
        _fail(f"--channels must be comma-separated integers, got {channels!r}")
    if not chans or min(chans) < 1:
        _fail("--channels needs at least one positive filter count")
    train = replace(args.train, lr=lr, normalize=normalize)
    train.validate()
    _train(
        "train-cnn",
        lambda cb: train_cnn(
            args.tracks,
            train=train,
            channels=chans,
            dropout=dropout,
            block_order=block_order,
            audio_cfg=args.audio,
            augment=args.augment,
            progress=cb,
            **args.run,
        ),
    )


@app.command("finetune")
@handle_errors
@training_command(fixed={"normalize": "none"}, epochs=20, patience=5, wave_aug="online")
def finetune_cmd(
    args: TrainingArgs,
    backbone: str = typer.Option(..., "--backbone", "-b", help="a registered PyTorch backbone (see `embedkit models`)"),
    frozen_epochs: int = typer.Option(3, help="epochs training only the new output layer (counted in --epochs)"),
    unfreeze: str = typer.Option("all", help="after the frozen epochs: all | top:N (last N blocks)"),
    head_lr: float = typer.Option(1e-2, help="new layer's rate while the backbone is frozen"),
    backbone_lr: float = typer.Option(5e-5, help="backbone rate once unfrozen"),
    finetune_head_lr: float = typer.Option(1e-4, help="new layer's rate once the backbone is unfrozen"),
    head_dropout: float = typer.Option(0.25),
):
    """Fine-tune a pretrained backbone with a new output layer (frozen, then unfrozen)."""
    from .cnn.finetune import FinetuneConfig, finetune

    ft = FinetuneConfig(
        backbone,
        frozen_epochs=frozen_epochs,
        unfreeze=unfreeze,
        head_lr=head_lr,
        backbone_lr=backbone_lr,
        finetune_head_lr=finetune_head_lr,
        head_dropout=head_dropout,
    )
    ft.validate()
    _train(
        "finetune",
        lambda cb: finetune(
            args.tracks,
            backbone,
            train=args.train,
            ft=ft,
            audio_cfg=args.audio,
            augment=args.augment,
            progress=cb,
            **args.run,
        ),
    )


def _csv_option(value: Optional[str]) -> Optional[tuple]:
    return None if value is None else tuple(s.strip() for s in value.split(",") if s.strip())


@app.command("run")
@handle_errors
def run_cmd(
    data: Optional[str] = typer.Argument(None, help="folder <label>/<file>, CSV manifest, FMA tracks.csv, or 'demo'"),
    demo: bool = typer.Option(
        False, "--demo", help="../shared/data/gtzan_mini when present, else a generated (synthetic) set"
    ),
    quick: bool = typer.Option(
        False, "--quick", help="smoke run: tiny-test + melstats, 2 folds, 10 s clips, 2 CNN epochs"
    ),
    backbones: Optional[str] = typer.Option(
        None, "--backbones", help="comma list (default musicnn-msd,melstats; quick: tiny-test,melstats)"
    ),
    heads: Optional[str] = typer.Option(None, "--heads", help="comma list of lr,lgbm,mlp (default: all)"),
    cv: Optional[int] = typer.Option(
        None, "--cv", help="K-fold CV (default 5; quick 2); 0: the dataset split, else a holdout"
    ),
    test_size: float = typer.Option(0.2, help="holdout test fraction (with --cv 0)"),
    cnn: bool = typer.Option(True, "--cnn/--no-cnn", help="train the scratch CNN"),
    cnn_epochs: Optional[int] = typer.Option(
        None, help="CNN epoch budget (default 40; quick 2), early stopping on validation loss"
    ),
    finetune: bool = typer.Option(
        False, "--finetune", help="also fine-tune a pretrained backbone end to end (slow on CPU)"
    ),
    finetune_backbone: Optional[str] = typer.Option(
        None, help="backbone to fine-tune (default: the first of --backbones that is not melstats)"
    ),
    clip: Optional[float] = typer.Option(None, help="clip length in seconds (default 30; quick 10)"),
    seed: int = typer.Option(0),
    cache: Path = typer.Option(Path("cache"), help="embedding / feature cache root"),
    runs: Path = typer.Option(Path("runs"), help="folder for run directories"),
    out: Path = typer.Option(Path("reports/report.html"), "--out", "-o", help="report file"),
    workers: Optional[int] = typer.Option(None, help="extraction lanes / decode threads (default: CPU count)"),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: all cores)"),
    audio_dir: Optional[Path] = typer.Option(None, help="FMA audio folder (fma_small/) for a tracks.csv"),
    subset: str = typer.Option("small", help="FMA subset"),
    device: str = device_option(),
    allow_tf32: bool = tf32_option(),
):
    """The main job: extract, fit every head, train the CNN, (fine-tune), write the report.

    Finished runs and cached embeddings are reused: a second invocation redoes only what changed."""
    from dataclasses import replace

    from rich.table import Table

    from .device import precheck
    from .pipeline import RunPlan, run_all

    precheck(device, allow_tf32)  # an unusable device: one line before any work
    if demo and data not in (None, "demo"):
        _fail("give either DATA or --demo, not both")
    if data is None and not demo:
        _fail("give a DATA folder / manifest, or --demo")
    over = {
        "backbones": _csv_option(backbones),
        "heads": _csv_option(heads),
        "cv": cv,
        "test_size": test_size,
        "cnn": cnn,
        "clip_s": clip,
        "seed": seed,
    }
    plan = (
        RunPlan.quick_plan(**over) if quick else replace(RunPlan(), **{k: v for k, v in over.items() if v is not None})
    )
    plan = replace(plan, device=device, allow_tf32=allow_tf32)
    if cnn_epochs is not None:
        if cnn_epochs < 1:
            _fail("--cnn-epochs must be >= 1")
        plan = replace(plan, cnn_train=replace(plan.cnn_train, epochs=cnn_epochs))
    if finetune:
        ft = finetune_backbone or next((b for b in plan.backbones if b != "melstats"), None)
        if ft is None:
            _fail("--finetune needs a pretrained backbone: pass --finetune-backbone NAME")
        plan = replace(plan, finetune=ft)
    prog, cb = _training_progress("training", announce_run_dir=False)

    def log(line: str) -> None:
        prog.console.print(line, highlight=False)

    try:
        res = run_all(
            None if demo else data,
            plan,
            cache=cache,
            runs=runs,
            report=out,
            audio_dir=audio_dir,
            subset=subset,
            workers=workers,
            threads=threads,
            log=log,
            progress=cb,
        )
    finally:
        prog.stop()

    def pct(m, key):
        v = m.get(key)
        return "-" if v is None else f"{100 * v:.1f}"

    table = Table(title=f"embedkit run: {res.data}" + (" [bold red](SYNTHETIC)[/]" if res.synthetic else ""))
    for col in ("#", "run", "kind", "track acc %", "vote %", "segment %", "train s", "ms/track", "status"):
        table.add_column(col, justify="left" if col in ("run", "kind", "status") else "right", no_wrap=col != "run")
    for i, r in enumerate(sorted(res.runs, key=lambda r: -r.metrics.get("track_accuracy", 0)), 1):
        m = r.metrics
        infer = m.get("inference_ms_per_track")
        if infer is not None and m.get("needs_extraction", m.get("kind") == "head"):  # end to end: extraction + head
            infer = infer + m["extract_ms_per_track"] if m.get("extract_ms_per_track") is not None else None
        acc = pct(m, "track_accuracy") + (
            f" ± {pct(m, 'track_accuracy_std')}" if m.get("track_accuracy_std") is not None else ""
        )
        table.add_row(
            str(i),
            r.name,
            r.kind,
            acc,
            pct(m, "track_accuracy_vote"),
            pct(m, "segment_accuracy"),
            "-" if m.get("train_seconds") is None else f"{m['train_seconds']:.1f}",
            "-" if infer is None else f"{infer:.0f}",
            "reused" if r.reused else f"new, {r.seconds:.0f} s",
        )
    c = console()
    if not c.is_terminal:  # logs and CI: do not squeeze the table into 80 columns
        c.width = 120
    c.print(table)
    c.print(f"{len(res.runs)} runs in {res.seconds:.0f} s; report: [bold]{res.report}[/]", highlight=False)
    typer.echo(str(res.report))


@app.command("fit")
@handle_errors
def fit_cmd(
    data: Optional[Path] = typer.Argument(
        None, help="only the tracks of this dataset (folder, manifest or FMA tracks.csv), with its labels"
    ),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="whose embeddings (the store under --cache)"),
    head: str = typer.Option("lr", "--head", help="lr | lgbm | mlp"),
    cv: Optional[int] = typer.Option(None, "--cv", help="stratified K-fold cross-validation"),
    holdout: Optional[float] = typer.Option(None, "--holdout", help="stratified holdout with this test fraction"),
    split: bool = typer.Option(False, "--split", help="use the dataset's split column (train/val/test)"),
    cache: Path = typer.Option(Path("cache"), help="embedding store root"),
    store: Optional[Path] = typer.Option(None, help="store directory (when the cache holds several for the backbone)"),
    runs: Path = typer.Option(Path("runs"), help="where run directories go"),
    pca: Optional[int] = typer.Option(
        None, help="PCA components before the head (0: none; default: lgbm on >256-d only)"
    ),
    search: bool = typer.Option(
        False, "--search", help="small hyper-parameter search on validation tracks of each training part"
    ),
    seed: int = typer.Option(0, help="seed of the splits and the head"),
    audio_dir: Optional[Path] = typer.Option(None, help="FMA audio folder, when DATA is a tracks.csv"),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all)"),
):
    """Train a head on stored embeddings and evaluate it per track (default protocol: the
    dataset's split when it has one, else a stratified 80/20 holdout by track)."""
    if backbone is None and store is None:
        _fail("name the embeddings: --backbone NAME (or --store DIR)")
    if sum([cv is not None, holdout is not None, split]) > 1:
        _fail("choose one protocol: --cv K, --holdout FRACTION or --split")
    if holdout is not None and not 0 < holdout < 1:
        _fail("--holdout needs a fraction between 0 and 1")
    from .fit import fit_head

    tracks = _load_tracks(data, audio_dir, "small") if data is not None else None
    protocol = "split" if split else "holdout" if holdout is not None else "auto"
    prog, cb = track_progress(f"fit {backbone or store}+{head}")
    with prog:
        res = fit_head(
            backbone,
            head,
            cache=cache,
            store=store,
            tracks=tracks,
            runs=runs,
            protocol=protocol,
            cv=cv,
            test_size=holdout or 0.2,
            seed=seed,
            pca=pca,
            search=search,
            threads=threads,
            progress=cb,
        )
    m = res.metrics
    std = f" +/- {m['track_accuracy_std']:.3f}" if "track_accuracy_std" in m else ""
    p = m["protocol"]
    desc = f"{p['k']}-fold CV" if p["type"] == "cv" else p["type"]
    console().print(
        f"[green]{res.run_dir}[/]: {m['name']} ({desc}{', grouped' if p['grouped'] else ''}) track accuracy {m['track_accuracy']:.3f}{std} (mean prob), "
        f"{m['track_accuracy_vote']:.3f} (vote), segment {m['segment_accuracy']:.3f}; train {m['train_seconds']:.1f} s, "
        f"inference {m['inference_ms_per_track']:.2f} ms/track, bundle {m['model_bytes'] / 1e3:.0f} kB",
        highlight=False,
        soft_wrap=True,
    )
    if data is None:
        console().print(
            f"dataset: {m['dataset']['source']} (the last one extracted into {m['store']}; pass DATA to fit another)",
            highlight=False,
            soft_wrap=True,
        )
    if m["dataset"].get("missing_from_store"):
        console().print(
            f"[yellow]note[/]: {m['dataset']['missing_from_store']} track(s) of {data or m['dataset']['source']} are not in the store (failed or not extracted) and were left out",
            highlight=False,
        )


@app.command("predict")
@handle_errors
def predict_cmd(
    bundle: Path = typer.Argument(..., help="head bundle (head.skops) or the run directory holding it"),
    data: Optional[Path] = typer.Argument(None, help="only the tracks of this dataset"),
    cache: Path = typer.Option(Path("cache"), help="embedding store root (the bundle's backbone store is used)"),
    store: Optional[Path] = typer.Option(None, help="store directory to predict on"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="write per-track predictions to this CSV"),
    audio_dir: Optional[Path] = typer.Option(None, help="FMA audio folder, when DATA is a tracks.csv"),
):
    """Predict the tracks of an embedding store with a saved head (refuses embeddings from
    another backbone, weights or preprocessing)."""
    from .fit import predict_store
    from .io import atomic_write_text

    tracks = _load_tracks(data, audio_dir, "small") if data is not None else None
    df, b = predict_store(bundle, cache=cache, store=store, tracks=tracks)
    c = console()
    known = df["label"].isin(b.labels)
    msg = f"{len(df)} tracks predicted with {b.spec['name']}+{b.head} ({len(b.labels)} labels)"
    if known.any():
        acc = float((df.loc[known, "pred"] == df.loc[known, "label"]).mean())
        msg += f"; accuracy {acc:.3f} on the {int(known.sum())} tracks with a known label"
        if df["in_training"].any():
            msg += f" ({int(df['in_training'].sum())} of them were used to train the head)"
    c.print(msg, highlight=False, soft_wrap=True)
    if data is None:
        c.print(
            f"dataset: {df.attrs.get('source')} (the last one extracted into the store; pass DATA to predict another)",
            highlight=False,
            soft_wrap=True,
        )
    if out is not None:
        atomic_write_text(out, df.to_csv(index=False))
        c.print(f"wrote {out}", highlight=False)
    else:
        for r in df.head(20).itertuples():
            typer.echo(f"{r.track_id}\t{r.pred}\t{r.confidence:.3f}")


@app.command("stream")
@handle_errors
def stream_cmd(
    model: Path = typer.Argument(..., help="run directory (any run kind) or model file"),
    source: str = typer.Argument(..., help="audio file, '-' for raw PCM on stdin, or 'mic' / 'mic:DEVICE'"),
    realtime: bool = typer.Option(False, "--realtime", help="pace a file at 1x, as if it were live"),
    fmt: Optional[str] = typer.Option(None, "--format", help="stdin PCM: f32le | s16le (default f32le)"),
    rate: Optional[int] = typer.Option(
        None, "--rate", help="stdin PCM sample rate, Hz (default 44100); microphone rate"
    ),
    channels: Optional[int] = typer.Option(
        None, "--channels", help="stdin PCM interleaved channels (default 1); microphone channels"
    ),
    hop: float = typer.Option(2.5, help="seconds between windows (one output per hop)"),
    smooth: str = typer.Option("ema:7.5", help="ema:SECONDS | last:N | none, over calibrated probabilities"),
    enter: float = typer.Option(0.6, help="smoothed probability at which a genre becomes the decision"),
    exit_: float = typer.Option(
        0.4, "--exit", help="the decision holds while its smoothed probability stays at or above this"
    ),
    min_duration: float = typer.Option(5.0, help="seconds a new decision must hold before a change is reported"),
    queue: int = typer.Option(8, help="windows buffered between reading and the model"),
    max_lag: Optional[float] = typer.Option(
        None, help="live sources: seconds behind real time before windows are dropped (default: one hop)"
    ),
    view: str = typer.Option("auto", help="auto (live view on a terminal, else JSON Lines) | json | live"),
    threshold: Optional[float] = threshold_option(),
    multi: Optional[bool] = multi_option(),
    multi_threshold: Optional[float] = multi_threshold_option(),
    margin: Optional[float] = margin_option(),
    max_genres: Optional[int] = max_genres_option(),
    checkpoint: Optional[str] = typer.Option(
        None, help="backbone weights of a head run on PANNs / AST (as in extract)"
    ),
    device: str = device_option(),
    allow_tf32: bool = tf32_option(),
):
    """Genre of a live stream as it plays: a window every hop, smoothed probabilities, the
    decision with hysteresis and change events, as JSON Lines on stdout (a final summary line
    ends it). Stops cleanly at end of stream, Ctrl-C or a closed pipe."""
    from .deploy.stream import JsonLinesWriter, LiveView, StreamConfig, stream
    from .device import precheck

    precheck(device, allow_tf32)  # an unusable device: one line before the source is opened
    if view not in ("auto", "json", "live"):
        _fail(f"--view must be auto, json or live, got {view!r}")
    if fmt is not None and fmt not in ("f32le", "s16le"):
        _fail(f"--format must be f32le or s16le, got {fmt!r}")
    cfg = StreamConfig(
        hop_s=hop, smooth=smooth, enter=enter, exit=exit_, min_duration_s=min_duration, queue=queue, max_lag_s=max_lag
    )
    live = view == "live" or (view == "auto" and sys.stdout.isatty())
    emit = LiveView() if live else JsonLinesWriter(sys.stdout)
    try:
        summary = stream(
            model,
            source,
            cfg,
            emit,
            fmt=fmt,
            rate=rate,
            channels=channels,
            realtime=realtime,
            checkpoint=checkpoint,
            device=device,
            allow_tf32=allow_tf32,
            threshold=threshold,
            multi=multi,
            multi_threshold=multi_threshold,
            margin=margin,
            max_genres=max_genres,
        )
    except KeyboardInterrupt:  # before the stream started (loading the model): nothing to keep
        _fail("interrupted before the stream started", 130)
    finally:
        if live:
            emit.close()
    if summary["end"] == "broken pipe":
        # The reader of stdout left (`| head`): stop quietly, and keep Python's exit-time flush
        # of the dead pipe from printing a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    elif summary["end"] == "interrupted":
        _fail(
            f"interrupted after {summary['audio_s']:.1f} s of audio ({summary['windows']} windows); summary written",
            130,
        )


@app.command("export")
@handle_errors
def export_cmd(
    run: Path = typer.Argument(
        ..., help="a finished run directory, head bundle (.skops) or CNN / fine-tune model file (.pt)"
    ),
    fmt: str = typer.Option("onnx", "--format", help="onnx (the only format)"),
    out: Path = typer.Option(..., "--out", "-o", help="model file to write (atomic)"),
    checkpoint: Optional[str] = typer.Option(None, help="backbone weights for PANNs / AST head runs (as for extract)"),
    parity: bool = typer.Option(True, help="check onnxruntime against the torch model on generated windows"),
):
    """Export a run as one ONNX graph: waveform windows -> calibrated probabilities, with the
    preprocessing contract in the file's metadata (read it with embedkit.deploy.onnx_runtime.read_metadata)."""
    from .errors import EmbedkitError

    if fmt.lower() != "onnx":
        _fail(f"unknown --format {fmt!r}; the one export format is onnx")
    from .deploy.onnx_export import export_onnx, parity_check
    from .deploy.tagger import load_tagger

    tagger = load_tagger(run, checkpoint=checkpoint)
    info = export_onnx(tagger, out)
    meta = info["metadata"]
    c = console()
    c.print(
        f"wrote {out} ({info['bytes'] / 1e6:.1f} MB, {info['seconds']:.1f} s): {meta['kind']} model, {len(meta['labels'])} labels, "
        f"windows of {meta['window_samples']} samples @ {meta['sample_rate']} Hz",
        highlight=False,
        soft_wrap=True,
    )
    if parity:
        diff = parity_check(tagger, out)
        c.print(f"parity: max |onnxruntime - torch| = {diff:.2e} on generated windows", highlight=False)
        if diff > 1e-4:
            raise EmbedkitError(f"{out}: onnxruntime differs from the torch model by {diff:.2e} (> 1e-4)")
    typer.echo(str(out))


@app.command("tag")
@handle_errors
def tag_cmd(
    model: Path = typer.Argument(
        ..., help="finished run directory (any kind), head.skops, model.pt or an exported model.onnx"
    ),
    inputs: List[str] = typer.Argument(
        ..., help="audio files, folders (recursive), path lists (.txt/.m3u/.csv) or - for paths on stdin"
    ),
    runtime: str = typer.Option(
        "auto",
        help="torch | onnx (onnxruntime, no torch import; needs a .onnx from `embedkit export`) | auto (by the file)",
    ),
    excerpt: str = typer.Option("first", help="what is listened to: first | middle | spread:N | full"),
    db: Optional[str] = typer.Option(
        None, help="results database: a SQLite file path or any SQLAlchemy URL; re-runs skip tagged tracks"
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="also write every track's row to a .csv or .jsonl file"
    ),
    top_k: int = typer.Option(3, help="genres listed per track"),
    workers: Optional[int] = typer.Option(
        None, help="lanes on the CPU (embedkit.jobs), decode threads on an accelerator (default: CPU count)"
    ),
    batch_size: Optional[int] = typer.Option(
        None, help="windows per forward pass (default 32 on the CPU, 8x on an accelerator)"
    ),
    checkpoint: Optional[str] = typer.Option(None, help="backbone weights for head runs on PANNs / AST"),
    retry_failed: bool = typer.Option(False, help="retry files recorded as failed for this model"),
    strict: bool = typer.Option(False, help="exit non-zero if any file failed"),
    dask: Optional[str] = typer.Option(None, help="run shards on a Dask cluster: scheduler address, or 'local'"),
    table: int = typer.Option(20, help="tracks shown in the terminal table (0: none)"),
    threshold: Optional[float] = threshold_option(),
    multi: Optional[bool] = multi_option(),
    multi_threshold: Optional[float] = multi_threshold_option(),
    margin: Optional[float] = margin_option(),
    max_genres: Optional[int] = max_genres_option(),
    write_tags: bool = typer.Option(
        False,
        "--write-tags",
        help="write the decided genres into the files (needs --db, which records the previous values for `embedkit untag`)",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="with --write-tags: show what would change, write nothing"),
    overwrite: bool = typer.Option(False, "--overwrite", help="with --write-tags: replace genres a person set"),
    id3v23: bool = typer.Option(
        False, "--id3v23", help="MP3/WAV/AIFF: write ID3v2.3 (several genres joined with --separator) instead of v2.4"
    ),
    separator: str = typer.Option("; ", help="ID3v2.3 genre separator"),
    device: str = device_option(),
    allow_tf32: bool = tf32_option(),
    precision: str = precision_option(),
):
    """Put genres on music nobody labelled: tag files with a trained model (one row per track;
    bad files are recorded and skipped)."""
    from .deploy.batch import Excerpt, tag
    from .device import precheck
    from .jobs import job_environment

    ex = Excerpt.parse(excerpt)  # bad values fail before anything is read
    is_onnx = model.suffix.lower() == ".onnx"
    if runtime not in ("auto", "torch", "onnx"):
        _fail(f"--runtime must be auto, torch or onnx, got {runtime!r}")
    if runtime == "onnx" and not is_onnx:
        _fail(
            f"--runtime onnx runs an exported model: `embedkit export {model} --format onnx -o model.onnx`, then tag with model.onnx"
        )
    if runtime == "torch" and is_onnx:
        _fail(f"{model} is an ONNX model; it runs with --runtime onnx (or auto)")
    if workers is not None and workers < 1:
        _fail("--workers must be >= 1")
    if batch_size is not None and batch_size < 1:
        _fail("--batch-size must be >= 1")
    if not dask:  # an unusable device or precision: one line before anything is read
        precheck(device, allow_tf32, precision)
    if (dry_run or overwrite) and not write_tags:
        _fail("--dry-run and --overwrite apply to --write-tags")
    if write_tags and not dry_run and not db:
        _fail("--write-tags needs --db: the database records the previous genres so `embedkit untag` can restore them")
    from .deploy.writeback import FileTagOptions

    # decoder chatter goes to a decoder log (jobs.job_environment: kept, and named below, when
    # native code said something), the Dask client is closed with the run
    with job_environment(dask) as env:
        prog, cb = _tag_progress()
        with prog:
            res = tag(
                model,
                inputs,
                excerpt=ex,
                db=db,
                out=out,
                top_k=top_k,
                threshold=threshold,
                multi=multi,
                multi_threshold=multi_threshold,
                margin=margin,
                max_genres=max_genres,
                file_tags=FileTagOptions(
                    dry_run=dry_run, overwrite=overwrite, id3_version=3 if id3v23 else 4, separator=separator
                )
                if write_tags
                else None,
                workers=workers,
                batch_size=batch_size,
                checkpoint=checkpoint,
                executor=env.executor,
                retry_failed=retry_failed,
                keep_rows=max(table, 0),
                progress=cb,
                device=device,
                precision=precision,
                allow_tf32=allow_tf32,
            )
    try:
        _summarise_tag(res, ex, db, out, table, strict)
        if write_tags:
            _summarise_changes(res.file_tags)
    finally:
        if env.note:
            from rich.markup import escape

            console().print(escape(env.note), highlight=False, soft_wrap=True)


def _summarise_changes(report, max_lines: int = 20) -> None:
    """What --write-tags / untag did (or would do): one line per file not simply written."""
    from rich.markup import escape

    c = console()
    for ch in report.notes[:max_lines]:
        status = "would write" if ch.status == "would-write" else f"[yellow]{ch.status}[/]"
        c.print(f"{status} {escape(ch.path)}: {escape(ch.reason)}", highlight=False, soft_wrap=True)
    c.print(
        "tags in files"
        + (" (dry run, nothing written)" if report.dry_run else "")
        + ": "
        + (", ".join(f"{n} {s}" for s, n in report.counts.most_common()) or "no files"),
        highlight=False,
        soft_wrap=True,
    )


@app.command("untag")
@handle_errors
def untag_cmd(
    model: Path = typer.Argument(..., help="the run directory / model file whose genres to remove"),
    paths: Optional[List[str]] = typer.Argument(
        None, help="only these files (default: every file the model wrote genres into)"
    ),
    db: str = typer.Option(..., help="the results database `tag --write-tags` recorded the previous genres in"),
    dry_run: bool = typer.Option(False, "--dry-run", help="show what would be restored, write nothing"),
    force: bool = typer.Option(False, "--force", help="restore even where a person changed the genre since"),
):
    """Undo `embedkit tag --write-tags`: put back the genres the files held before."""
    from .deploy.resultsdb import ResultsDB
    from .deploy.tagger import model_id_of
    from .deploy.writeback import untag

    mid = model_id_of(model)
    with ResultsDB(db) as database:
        changes = untag(
            mid, database, [os.path.abspath(p) for p in paths] if paths else None, dry_run=dry_run, force=force
        )
    if not changes:
        _fail(f"{db}: no files recorded as tagged by model {mid}")
    from .deploy.writeback import FileTagReport

    report = FileTagReport(dry_run=dry_run)
    for ch in changes:
        report.add(ch)
    _summarise_changes(report)


def _tag_progress():
    """Progress bar with tracks/s and ETA."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:.1f} tracks/s" if task.speed else "- tracks/s")

    prog = Progress(
        TextColumn("[bold]tag"),
        BarColumn(),
        MofNCompleteColumn(),
        Rate(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console(),
        transient=False,
    )
    task = prog.add_task("tag", total=None)
    return prog, lambda done, total: prog.update(task, completed=done, total=total)


def _summarise_tag(res, ex, db, out, table: int, strict: bool, max_lines: int = 20) -> None:

    from rich.markup import escape
    from rich.table import Table

    c = console()
    if table and res.rows:
        t = Table(show_edge=False, pad_edge=False)
        for col in ("track", "genre", "p", "top-k", *(("windows",) if ex.mode == "full" else ())):
            t.add_column(col)
        for r in res.rows[:table]:
            topk = ", ".join(f"{l} {p:.2f}" for l, p in r.topk[1:])
            extra = ()
            if ex.mode == "full" and r.window_share:
                share = sorted(r.window_share.items(), key=lambda kv: -kv[1])[:2]
                extra = (", ".join(f"{l} {v:.0%}" for l, v in share),)
            genre = ", ".join(r.genres) if r.genres else r.decision
            t.add_row(escape(Path(r.path).name), escape(genre), f"{r.top_p:.2f}", escape(topk), *extra)
        from rich.console import Console

        Console().print(t)  # the table is the command's output: stdout
        if res.n_inputs > table and len(res.rows) >= table:
            c.print(f"(first {table} of {res.n_inputs} tracks; --out x.csv / --db for all)", highlight=False)
    rate = f", {res.n_tagged / res.seconds:.1f} tracks/s" if res.n_tagged and res.seconds > 0 else ""
    c.print(
        f"{res.n_tagged} tracks tagged ({ex}, {res.windows} windows), {res.n_done_before} already in the database"
        + (f" ({res.n_redecided} decided again under this rule)" if res.n_redecided else "")
        + f", {res.n_failed} failed"
        + (
            f" (+{res.n_failed_before} failed in earlier runs; --retry-failed retries them)"
            if res.n_failed_before
            else ""
        )
        + f", {res.seconds:.1f} s{rate}"
        + (f"; {escape(_device_line(res.device))}" if getattr(res, "device", None) else ""),
        highlight=False,
        soft_wrap=True,
    )
    _print_failures(c, res.failures, max_lines)
    if db:
        c.print(
            escape(f"results: {db} (table tags, model_id {res.model_id}; failures in tag_failures)"),
            highlight=False,
            soft_wrap=True,
        )
    if out:
        c.print(escape(f"wrote {out}"), highlight=False, soft_wrap=True)
    if res.nothing_done:
        _fail(f"nothing could be tagged: {res.n_failed + res.n_failed_before} of {res.n_inputs} files failed")
    if strict and (res.n_failed or res.n_failed_before):
        _fail(f"--strict: {res.n_failed + res.n_failed_before} of {res.n_inputs} files failed")


@app.command("serve")
@handle_errors
def serve_cmd(
    model: Path = typer.Argument(
        ..., help="finished run directory, head.skops / model.pt, or an exported model.onnx (onnxruntime, no torch)"
    ),
    host: str = typer.Option("127.0.0.1", help="address to listen on (loopback by default)"),
    port: int = typer.Option(8000, help="TCP port"),
    checkpoint: Optional[str] = typer.Option(None, help="backbone weights for PANNs / AST head runs"),
    excerpt: str = typer.Option("first", help="default excerpt: first | middle | spread:N | full"),
    threshold: Optional[float] = threshold_option(),
    multi: Optional[bool] = multi_option(),
    multi_threshold: Optional[float] = multi_threshold_option(),
    margin: Optional[float] = margin_option(),
    max_genres: Optional[int] = max_genres_option(),
    max_mb: float = typer.Option(100.0, help="largest upload in MB (413 above)"),
    body_timeout: float = typer.Option(30.0, help="seconds an upload may take (408 after)"),
    max_pending: int = typer.Option(32, help="requests in progress before 503 + Retry-After"),
    batch_wait_ms: float = typer.Option(5.0, help="how long the first request of a batch waits for others"),
    max_batch_windows: int = typer.Option(64, help="windows per forward"),
    decode_workers: int = typer.Option(2, help="decode threads"),
    db: Optional[str] = typer.Option(
        None, help="also write every result into this results database (as embedkit tag --db)"
    ),
    device: str = device_option(),
    allow_tf32: bool = tf32_option(),
):
    """Serve a model over HTTP: POST /v1/tag, GET /v1/model, /healthz, /metrics, and a page at /."""
    from .audio.excerpts import Excerpt
    from .deploy.serve import ServeConfig, serve
    from .device import precheck

    precheck(device, allow_tf32, "fp32")  # an unusable device fails before the model loads

    Excerpt.parse(excerpt)
    if max_mb <= 0 or body_timeout <= 0 or max_pending < 1 or max_batch_windows < 1 or decode_workers < 1:
        _fail("--max-mb, --body-timeout must be positive; --max-pending, --max-batch-windows, --decode-workers >= 1")
    from .calibration import DecisionRule

    DecisionRule().with_overrides(threshold, multi, multi_threshold, margin, max_genres)  # bad values: one line
    cfg = ServeConfig(
        max_bytes=int(max_mb * 1024 * 1024),
        body_timeout_s=body_timeout,
        max_pending=max_pending,
        batch_wait_ms=batch_wait_ms,
        max_batch_windows=max_batch_windows,
        decode_workers=decode_workers,
        excerpt=excerpt,
        threshold=threshold,
        multi=multi,
        multi_threshold=multi_threshold,
        margin=margin,
        max_genres=max_genres,
        db=db,
    )
    console().print(f"embedkit serve: loading {model}; then http://{host}:{port}/ (docs at /docs)", highlight=False)
    serve(model, host=host, port=port, cfg=cfg, checkpoint=checkpoint, device=device, allow_tf32=allow_tf32)


def main():
    """The CLI: runs one command, exits by SystemExit as typer does (what tests call)."""
    # torch's OpenMP threads spin-wait by default; on a busy 2-core laptop that wastes most of
    # the CPU (musicnn extraction measured 2.7x slower under load). Must be set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app(prog_name="embedkit")


def entry():  # the console script
    """``main()``, then end the process without the interpreter's teardown.

    Once torch is imported, the teardown (clearing every module, collecting torch's objects,
    libtorch's static destructors) costs 0.3-0.6 s of wall time on a 2-core machine
    (``python -c "import torch"`` 1.56-1.68 s vs 1.19-1.26 s with os._exit): a fifth of a
    one-file ``embedkit tag``. The command is finished by then: the atexit handlers still run
    (multiprocessing, weakref finalizers, temporary folders), the standard streams are flushed,
    and every artefact was already written atomically and closed. Daemon threads (rich's refresh
    thread) are dropped, as the normal exit drops them; when a non-daemon thread is still alive
    the normal exit runs instead (it waits for that thread), so nothing still working is cut short.
    """
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    if code is None:
        code = 0
    elif not isinstance(code, int):  # SystemExit("message"): printed, status 1
        print(code, file=sys.stderr)
        code = 1
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed pipe (`embedkit tag ... | head`): nothing more to say
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
