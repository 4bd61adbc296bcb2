"""Training commands: train-cnn, finetune (one block of shared options) and run, the main job."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from ..cnn import recipe as cnn_recipe
from .common import (
    console,
    device_option,
    fail,
    genre_map_option,
    labels_from_tags_option,
    load_tracks,
    min_tracks_option,
    progress_bar,
    say,
    tag_labels,
    tf32_option,
)


def training_progress(title: str, announce_run_dir: bool = True):
    """The progress bar driven by the trainers' events (train-cnn, finetune, run): fold, epoch,
    loss, validation accuracy, ETA. Returns (progress, callback(event)).

    The total assumes every fold runs all epochs; a fold that stops early jumps the bar to its
    end, so the ETA only ever improves."""
    prog, _ = progress_bar(info=True)
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
            say(prog.console, f"{verb} {e['path']} (if interrupted, continue with --resume {e['path']})")
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
    say(
        console(),
        f"[green]{res.run_dir}[/]: {m['name']} track accuracy {m['track_accuracy']:.3f}{std} (mean prob), "
        f"{m['track_accuracy_vote']:.3f} (vote); {m['n_params']:,} params, {m['model_bytes'] / 1e6:.1f} MB, "
        f"train {m['train_seconds']:.0f} s, inference {m['inference_ms_per_track']:.0f} ms/track",
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
    epochs: int = typer.Option(50, help="epochs (at most, with early stopping on a validation part)"),
    batch_size: int = typer.Option(16),
    lr_schedule: str = typer.Option(
        "constant", help="constant | cosine (decays to 0 over --epochs) | onecycle (30 % warm-up, then cosine)"
    ),
    weight_decay: float = typer.Option(0.0, help="Adam weight decay"),
    label_smoothing: float = typer.Option(0.0, help="train against (1 - e) * target + e / classes"),
    patience: int = typer.Option(10, help="epochs without a better validation loss before stopping"),
    val_size: float = typer.Option(
        0.15, help="fraction of each training part held out for early stopping (0: none; the last epoch is kept)"
    ),
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
    labels_from_tags: bool = labels_from_tags_option(),
    genre_map: Optional[Path] = genre_map_option(),
    min_tracks: Optional[int] = min_tracks_option(),
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
    from ..cnn.augment import AugmentConfig
    from ..cnn.loop import TrainConfig
    from ..config import AudioConfig
    from ..device import precheck

    precheck(o["device"], o["allow_tf32"])  # an unusable device: one line before the dataset is read
    labels = tag_labels(o["labels_from_tags"], o["genre_map"], o["min_tracks"])

    train = TrainConfig(
        epochs=o["epochs"],
        batch_size=o["batch_size"],
        lr_schedule=o["lr_schedule"],
        weight_decay=o["weight_decay"],
        label_smoothing=o["label_smoothing"],
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
        train,
        aug,
        AudioConfig(clip_s=o["clip"]),
        run,
        lambda: load_tracks(o["data"], o["audio_dir"], o["subset"], labels),
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
    prog, cb = training_progress(title)
    try:
        res = call(cb)
    finally:
        prog.stop()
    _print_run(res)


@training_command(
    augment=cnn_recipe.AUGMENT, **{k: v for k, v in cnn_recipe.TRAIN.items() if k != "lr"}
)  # the measured recipe
def train_cnn_cmd(
    args: TrainingArgs,
    lr: float = typer.Option(cnn_recipe.TRAIN["lr"], help="Adam learning rate"),
    normalize: str = typer.Option(
        "standard", help="standard (per-band, fitted on training clips) | minmax (per image) | none"
    ),
    channels: str = typer.Option(",".join(map(str, cnn_recipe.CHANNELS)), help="filters per conv block"),
    dropout: float = typer.Option(0.5),
    block_order: str = typer.Option("conv-pool-bn-relu", help="conv-pool-bn-relu (faster on CPU) | conv-bn-relu-pool"),
):
    """Train the log-mel CNN from scratch; writes runs/<run-id>/ (metrics.json, model.pt). The
    defaults are the measured recipe (embedkit/cnn/recipe.py): 22.05 kHz / 96-mel log-mels."""
    from dataclasses import replace

    from ..cnn.train import train_cnn

    try:
        chans = tuple(int(c) for c in channels.split(",") if c.strip())
    except ValueError:
        fail(f"--channels must be comma-separated integers, got {channels!r}")
    if not chans or min(chans) < 1:
        fail("--channels needs at least one positive filter count")
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


@training_command(fixed={"normalize": "none"}, epochs=10, val_size=0.0, wave_aug="online")  # as `run --finetune`
def finetune_cmd(
    args: TrainingArgs,
    backbone: str = typer.Option(..., "--backbone", "-b", help="a registered PyTorch backbone (see `embedkit models`)"),
    frozen_epochs: int = typer.Option(3, help="epochs training only the new output layer (counted in --epochs)"),
    unfreeze: str = typer.Option(
        "auto", help="after the frozen epochs: all | top:N (last N blocks) | auto (musicnn: top:6, others: all)"
    ),
    head_lr: float = typer.Option(1e-2, help="new layer's rate while the backbone is frozen"),
    backbone_lr: float = typer.Option(5e-5, help="backbone rate once unfrozen"),
    finetune_head_lr: float = typer.Option(1e-4, help="new layer's rate once the backbone is unfrozen"),
    head_dropout: float = typer.Option(0.25),
):
    """Fine-tune a pretrained backbone with a new output layer (frozen, then unfrozen)."""
    from ..cnn.finetune import FinetuneConfig, finetune

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


def run_cmd(
    data: Optional[str] = typer.Argument(None, help="folder <label>/<file>, CSV manifest, FMA tracks.csv, or 'demo'"),
    demo: bool = typer.Option(
        False, "--demo", help="../shared/data/gtzan_mini when present, else a generated (synthetic) set"
    ),
    quick: bool = typer.Option(
        False, "--quick", help="smoke run: tiny-test + melstats, 2 folds, 10 s clips, 2 CNN epochs"
    ),
    backbones: Optional[str] = typer.Option(
        None,
        "--backbones",
        help="comma list; A+B fuses (default musicnn-msd,melstats,musicnn-msd+melstats; quick: tiny-test,melstats)",
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
    labels_from_tags: bool = labels_from_tags_option(),
    genre_map: Optional[Path] = genre_map_option(),
    min_tracks: Optional[int] = min_tracks_option(),
    db: Path = typer.Option(
        Path("library.sqlite"), "--db", help="with --labels-from-tags: where the untagged files' genres go"
    ),
):
    """The main job: extract, fit every head, train the CNN, (fine-tune), write the report.

    Finished runs and cached embeddings are reused: a second invocation redoes only what changed.
    With --labels-from-tags, DATA is a library labelled by its own genre tags; the best run then
    tags its untagged files into --db."""
    from ..device import precheck
    from ..pipeline import RunPlan, run_all

    precheck(device, allow_tf32)  # an unusable device: one line before any work
    if demo and data not in (None, "demo"):
        fail("give either DATA or --demo, not both")
    if data is None and not demo:
        fail("give a DATA folder / manifest, or --demo")
    plan = RunPlan.from_options(
        quick=quick,
        cnn_epochs=cnn_epochs,
        finetune=(finetune_backbone or True) if finetune else False,
        backbones=_csv_option(backbones),
        heads=_csv_option(heads),
        cv=cv,
        test_size=test_size,
        cnn=cnn,
        clip_s=clip,
        seed=seed,
        device=device,
        allow_tf32=allow_tf32,
    )
    labels = tag_labels(labels_from_tags, genre_map, min_tracks)
    if labels is not None and data is None:
        fail("--labels-from-tags needs DATA, the music folder")
    prog, cb = training_progress("training", announce_run_dir=False)
    kw = dict(
        cache=cache,
        runs=runs,
        report=out,
        audio_dir=audio_dir,
        subset=subset,
        workers=workers,
        threads=threads,
        log=lambda line: prog.console.print(line, highlight=False),
        progress=cb,
    )
    lib = None
    try:
        if labels is None:
            res = run_all(None if demo else data, plan, **kw)
        else:  # the same job on the tagged files, then the untagged ones are tagged
            from ..deploy.library import run_library

            lib = run_library(data, plan, labels=labels, db=db, tag_workers=workers, **kw)
            res = lib.pipeline
    finally:
        prog.stop()
    _print_comparison(res)
    if lib is not None:
        _print_library(lib, db)
    typer.echo(str(res.report))


def _print_library(lib, db: Path) -> None:
    """What --labels-from-tags learned and dropped, and where the untagged files' genres went."""
    tax, c = lib.taxonomy, console()
    say(c, "classes: " + ", ".join(f"{k} ({n})" for k, n in tax.get("classes", {}).items()))
    for name, why in {**tax.get("dropped_values", {}), **tax.get("dropped_classes", {})}.items():
        say(c, f"[yellow]dropped[/] {name}: {why}")
    for why, n in tax.get("tracks_not_used", {}).items():
        say(c, f"not training data: {n} track(s): {why}")
    if lib.tagged is not None:
        t = lib.tagged
        say(c, f"tagged {t.n_tagged} untagged file(s) with {lib.best.name} into {db} ({t.n_failed} failed)")


def _print_comparison(res) -> None:
    """`embedkit run`'s table: every run (new or reused), best first, and where the report is."""
    from rich.table import Table

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
