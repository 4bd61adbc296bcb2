"""`embedkit` command line. Each command validates its arguments, calls one library function
and prints a summary. Heavy libraries are imported inside commands so `--help` is instant.
Errors raised on purpose (EmbedkitError) become one line on stderr and exit code 1."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import List, Optional

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


def handle_errors(fn):
    """Turn library errors into one clear line and a non-zero exit; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import EmbedkitError

        try:
            return fn(*args, **kwargs)
        except EmbedkitError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted; finished work is kept and the next run resumes", 130)

    return wrapper


def console():
    from rich.console import Console

    return Console(stderr=True)


def track_progress(description: str):
    """A rich progress bar driven by callback(done, total); returns (progress, callback)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    prog = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console(), transient=False,
    )  # fmt: skip
    task = prog.add_task(description, total=None)

    def callback(done: int, total: int):
        prog.update(task, completed=done, total=total)

    return prog, callback


@app.command("models")
@handle_errors
def models_cmd(pattern: str = typer.Argument("*", help="glob over backbone names")):
    """List registered backbones with sample rate, embedding size and weight source."""
    from rich.console import Console
    from rich.table import Table

    from .backbones import list_backbones

    table = Table(title="embedkit backbones")
    for col in ("name", "sample rate", "dim", "segment", "weights", "licence", "needs"):
        table.add_column(col)
    for s in list_backbones(pattern):
        table.add_row(s.name, f"{s.sample_rate} Hz", str(s.embedding_dim), f"{s.segment_s:g} s", s.weights, s.license, s.requires or "-")
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
    return PreprocessConfig(AudioConfig(clip_s=clip_s if clip_s > 0 else None, offset_s=offset_s, pad_mode=pad), SegmentConfig(segment_s, hop_s or segment_s))


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
    workers: Optional[int] = typer.Option(None, help="decode threads (default: CPU count)"),
    batch_size: int = typer.Option(32, help="segments per forward pass"),
    outputs: List[str] = typer.Option([], "--output", help="extra outputs to store, e.g. taggram"),
    retry_failed: bool = typer.Option(False, help="retry files recorded as failed by earlier runs"),
    strict: bool = typer.Option(False, help="exit non-zero if any file failed"),
    dask: Optional[str] = typer.Option(None, help="run shards on a Dask cluster: scheduler address, or 'local'"),
):
    """Extract per-segment embeddings into a resumable Parquet store."""
    from .extract import extract

    prep = _prep(clip, offset, pad, segment, hop)
    if batch_size < 1:
        _fail("--batch-size must be >= 1")
    tracks = _load_tracks(data, audio_dir, subset)
    executor = None
    if dask:
        from .distributed import dask_client

        executor = dask_client(dask)
    prog, cb = track_progress(f"extract {backbone}")
    with prog:
        res = extract(tracks, backbone, cache=cache, checkpoint=checkpoint, prep=prep, workers=workers, batch_size=batch_size, outputs=tuple(outputs), executor=executor, retry_failed=retry_failed, progress=cb)
    c = console()
    c.print(
        f"[green]{res.store.root}[/]: {res.n_extracted} tracks extracted ({res.n_segments} segments), "
        f"{res.n_skipped} already done, {res.n_failed} failed, {res.seconds:.1f} s"
    )
    for f in res.failures:
        c.print(f"[yellow]skipped[/] {f['path']}: {f['reason']}")
    nothing = res.n_extracted == 0 and res.n_skipped == 0
    if nothing or (strict and res.n_failed):
        _fail(f"{res.n_failed} of {res.n_tracks} files failed" + (" (nothing could be extracted)" if nothing else ""))


def main():  # console-script entry point
    app(prog_name="embedkit")


if __name__ == "__main__":
    sys.exit(main())
