"""Commands on datasets and embeddings: models, extract, fit, predict, report."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import (
    console,
    device_option,
    fail,
    genre_map_option,
    job_exit,
    labels_from_tags_option,
    min_tracks_option,
    precision_option,
    print_warnings,
    progress_bar,
    run_job,
    say,
    summarise_job,
    tag_labels,
    tf32_option,
)


def models_cmd(pattern: str = typer.Argument("*", help="glob over backbone names")):
    """List registered backbones with sample rate, embedding size and weight source."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from ..backbones import list_backbones

    specs = list_backbones(pattern)
    if not specs:
        fail(f"no backbone matches {pattern!r}; valid names: {', '.join(s.name for s in list_backbones())}")
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


def _prep(clip_s: float, offset_s: float, pad: str, segment_s: float, hop_s: Optional[float]):
    from ..config import AudioConfig, PreprocessConfig, SegmentConfig

    if pad not in ("loop", "zero"):
        fail(f"--pad must be 'loop' or 'zero', got {pad!r}")
    if segment_s <= 0 or (hop_s is not None and hop_s <= 0):
        fail("--segment and --hop must be positive")
    return PreprocessConfig(
        AudioConfig(clip_s=clip_s if clip_s > 0 else None, offset_s=offset_s, pad_mode=pad),
        SegmentConfig(segment_s, hop_s or segment_s),
    )


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
    labels_from_tags: bool = labels_from_tags_option(),
    genre_map: Optional[Path] = genre_map_option(),
    min_tracks: Optional[int] = min_tracks_option(),
):
    """Extract per-segment embeddings into a resumable Parquet store."""
    import warnings

    from rich.markup import escape  # file names may contain [brackets]

    from ..datasets import load_dataset
    from ..device import precheck
    from ..extract import extract

    prep = _prep(clip, offset, pad, segment, hop)
    if "+" in backbone:  # a fused backbone has no store of its own: `fit -b a+b` joins the parts' stores
        parts = [p for p in backbone.split("+") if p]
        fail(
            f"{backbone} is a fusion: extract each part into its own store "
            f"({'; '.join(f'embedkit extract {data} -b {p}' for p in parts)}), then `embedkit fit -b {backbone}`"
        )
    labels = tag_labels(labels_from_tags, genre_map, min_tracks)
    if batch_size is not None and batch_size < 1:
        fail("--batch-size must be >= 1")
    if workers is not None and workers < 1:
        fail("--workers must be >= 1")

    def job(executor, progress):
        try:
            return extract(
                tracks,
                backbone,
                cache=cache,
                checkpoint=checkpoint,
                prep=prep,
                workers=workers,
                batch_size=batch_size,
                outputs=tuple(outputs),
                executor=executor,
                retry_failed=retry_failed,
                progress=progress,
                device=device,
                allow_tf32=allow_tf32,
                precision=precision,
            )
        except OSError as exc:  # disk full, permissions on --cache, ...
            fail(f"{getattr(exc, 'filename', None) or cache}: {exc.strerror or exc}")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:  # errors become one line in handle_errors
            if not dask:  # an unusable device or precision: one line before the dataset is read
                precheck(device, allow_tf32, precision)
            tracks = load_dataset(data, audio_dir=audio_dir, subset=subset, labels_from_tags=labels)
            # extract() builds the model only when there is work (a no-op re-run loads nothing)
            # and reports progress once it is loaded: the bar starts then, so a missing or
            # corrupt checkpoint is one error line rather than an error under an empty bar.
            res, log_note = run_job(
                f"extract {backbone}", dask, job, log_home=lambda res: res.store.root / "decoder.log"
            )
        finally:
            print_warnings(caught)
    summarise_job(
        res,
        f"[green]{escape(str(res.store.root))}[/]: {res.n_extracted} tracks extracted ({res.n_segments} segments), "
        f"{res.n_done_before} already done",
        after_failed=f", {res.n_shared} share their audio with another track (extracted once)" if res.n_shared else "",
        all_failures=f"all failures: pandas.read_parquet('{res.store.failures_dir}')",
        lines=[
            f"[yellow]note[/] {len(res.notes)} clip(s) adjusted to the clip length, e.g. {escape(res.notes[0])}"
            if res.notes
            else "",
            escape(log_note),
        ],
    )
    job_exit(res, "extracted", strict)


def report_cmd(
    runs: List[Path] = typer.Argument(
        None, help="run directories, metrics.json files or folders of runs (default: runs/)"
    ),
    out: Path = typer.Option(Path("reports/report.html"), "--out", "-o", help="HTML file to write"),
    title: Optional[str] = typer.Option(None, help="report title"),
):
    """Write one self-contained HTML comparison of every run's metrics.json."""
    from ..report import build_report

    path, ctx = build_report(list(runs or [Path("runs")]), out, title=title)
    c = console()
    for s in ctx["skipped"]:
        c.print(f"[yellow]skipped[/] {s['path']}: {s['reason']}")
    best = ctx["runs"][0]
    c.print(f"{len(ctx['runs'])} runs; best: {best.label} ({100 * best.acc:.1f} % track accuracy)")
    typer.echo(str(path))


def fit_cmd(
    data: Optional[Path] = typer.Argument(
        None, help="only the tracks of this dataset (folder, manifest or FMA tracks.csv), with its labels"
    ),
    backbone: Optional[str] = typer.Option(
        None,
        "--backbone",
        "-b",
        help="whose embeddings (the store under --cache); a+b+c: the parts' embeddings of each window joined",
    ),
    head: str = typer.Option("lr", "--head", help="lr | lgbm | mlp"),
    fusion: str = typer.Option(
        "concat", "--fusion", help="fused backbones: concat (one head) | stack (a head over per-part heads)"
    ),
    weighting: str = typer.Option(
        "equal", "--part-weights", help="fused concat: equal (same total variance per part) | none"
    ),
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
    labels_from_tags: bool = labels_from_tags_option(),
    genre_map: Optional[Path] = genre_map_option(),
    min_tracks: Optional[int] = min_tracks_option(),
):
    """Train a head on stored embeddings and evaluate it per track (default protocol: the
    dataset's split when it has one, else a stratified 80/20 holdout by track)."""
    if backbone is None and store is None:
        fail("name the embeddings: --backbone NAME (or --store DIR)")
    if sum([cv is not None, holdout is not None, split]) > 1:
        fail("choose one protocol: --cv K, --holdout FRACTION or --split")
    if holdout is not None and not 0 < holdout < 1:
        fail("--holdout needs a fraction between 0 and 1")
    labels = tag_labels(labels_from_tags, genre_map, min_tracks)
    if labels is not None and data is None:
        fail("--labels-from-tags needs DATA, the music folder")
    from ..fit import fit_head

    prog, cb = progress_bar(f"fit {backbone or store}+{head}")
    try:
        res = fit_head(
            backbone,
            head,
            cache=cache,
            store=store,
            data=data,
            audio_dir=audio_dir,
            labels_from_tags=labels,
            runs=runs,
            protocol="split" if split else "holdout" if holdout is not None else "auto",
            cv=cv,
            test_size=holdout or 0.2,
            seed=seed,
            pca=pca,
            search=search,
            threads=threads,
            progress=cb,
            fusion=fusion,
            weighting=weighting,
        )
    finally:
        prog.stop()
    m = res.metrics
    std = f" +/- {m['track_accuracy_std']:.3f}" if "track_accuracy_std" in m else ""
    p = m["protocol"]
    desc = f"{p['k']}-fold CV" if p["type"] == "cv" else p["type"]
    c = console()
    say(
        c,
        f"[green]{res.run_dir}[/]: {m['name']} ({desc}{', grouped' if p['grouped'] else ''}) track accuracy {m['track_accuracy']:.3f}{std} (mean prob), "
        f"{m['track_accuracy_vote']:.3f} (vote), segment {m['segment_accuracy']:.3f}; train {m['train_seconds']:.1f} s, "
        f"inference {m['inference_ms_per_track']:.2f} ms/track, bundle {m['model_bytes'] / 1e3:.0f} kB",
    )
    if data is None:
        say(
            c,
            f"dataset: {m['dataset']['source']} (the last one extracted into {m['store'] or next(iter(m['stores'].values()))}; pass DATA to fit another)",
        )
    if m["dataset"].get("missing_from_store"):
        c.print(
            f"[yellow]note[/]: {m['dataset']['missing_from_store']} track(s) of {data or m['dataset']['source']} are not in the store (failed or not extracted) and were left out",
            highlight=False,
        )


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
    from ..fit import predict_store
    from ..io import atomic_write_text

    df, b = predict_store(bundle, cache=cache, store=store, data=data, audio_dir=audio_dir)
    c = console()
    known = df["label"].isin(b.labels)
    msg = f"{len(df)} tracks predicted with {b.spec['name']}+{b.head} ({len(b.labels)} labels)"
    if known.any():
        acc = float((df.loc[known, "pred"] == df.loc[known, "label"]).mean())
        msg += f"; accuracy {acc:.3f} on the {int(known.sum())} tracks with a known label"
        if df["in_training"].any():
            msg += f" ({int(df['in_training'].sum())} of them were used to train the head)"
    say(c, msg)
    if data is None:
        say(
            c,
            f"dataset: {df.attrs.get('source')} (the last one extracted into the store; pass DATA to predict another)",
        )
    if out is not None:
        atomic_write_text(out, df.to_csv(index=False))
        c.print(f"wrote {out}", highlight=False)
    else:
        for r in df.head(20).itertuples():
            typer.echo(f"{r.track_id}\t{r.pred}\t{r.confidence:.3f}")
