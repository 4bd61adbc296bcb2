"""Deployment commands: tag, untag (genres in the files), stream, export, serve."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ..audio.excerpts import DEFAULT_EXCERPT
from .common import (
    console,
    device_option,
    fail,
    job_exit,
    margin_option,
    max_genres_option,
    multi_option,
    multi_threshold_option,
    not_music_option,
    precision_option,
    run_job,
    say,
    summarise_job,
    tf32_option,
    threshold_option,
)


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
    not_music: Optional[float] = not_music_option(),
    checkpoint: Optional[str] = typer.Option(
        None, help="backbone weights of a head run on PANNs / AST (as in extract)"
    ),
    device: str = device_option(),
    allow_tf32: bool = tf32_option(),
):
    """Genre of a live stream as it plays: a window every hop, smoothed probabilities, the
    decision with hysteresis and change events, as JSON Lines on stdout (a final summary line
    ends it). Stops cleanly at end of stream, Ctrl-C or a closed pipe."""
    from ..deploy.stream import JsonLinesWriter, LiveView, StreamConfig, stream
    from ..device import precheck

    precheck(device, allow_tf32)  # an unusable device: one line before the source is opened
    if view not in ("auto", "json", "live"):
        fail(f"--view must be auto, json or live, got {view!r}")
    if fmt is not None and fmt not in ("f32le", "s16le"):
        fail(f"--format must be f32le or s16le, got {fmt!r}")
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
            not_music=not_music,
        )
    except KeyboardInterrupt:  # before the stream started (loading the model): nothing to keep
        fail("interrupted before the stream started", 130)
    finally:
        if live:
            emit.close()
    if summary["end"] == "broken pipe":
        # The reader of stdout left (`| head`): stop quietly, and keep Python's exit-time flush
        # of the dead pipe from printing a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    elif summary["end"] == "interrupted":
        fail(
            f"interrupted after {summary['audio_s']:.1f} s of audio ({summary['windows']} windows); summary written",
            130,
        )


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
    from ..errors import EmbedkitError

    if fmt.lower() != "onnx":
        fail(f"unknown --format {fmt!r}; the one export format is onnx")
    from ..deploy.onnx_export import export_onnx, parity_check
    from ..deploy.tagger import load_tagger

    tagger = load_tagger(run, checkpoint=checkpoint)
    info = export_onnx(tagger, out)
    meta = info["metadata"]
    c = console()
    say(
        c,
        f"wrote {out} ({info['bytes'] / 1e6:.1f} MB, {info['seconds']:.1f} s): {meta['kind']} model, {len(meta['labels'])} labels, "
        f"windows of {meta['window_samples']} samples @ {meta['sample_rate']} Hz",
    )
    if parity:
        diff = parity_check(tagger, out)
        c.print(f"parity: max |onnxruntime - torch| = {diff:.2e} on generated windows", highlight=False)
        if diff > 1e-4:
            raise EmbedkitError(f"{out}: onnxruntime differs from the torch model by {diff:.2e} (> 1e-4)")
    typer.echo(str(out))


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
    excerpt: str = typer.Option(
        DEFAULT_EXCERPT,
        help="what is listened to: first | middle | spread:N | full (middle: as cheap as first, not fooled by an intro; bench/bench_excerpts.py)",
    ),
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
    not_music: Optional[float] = not_music_option(),
    write_tags: bool = typer.Option(
        False,
        "--write-tags",
        help="write the decided genres into the files (needs --db, which records the previous values for `embedkit untag`)",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="with --write-tags: show what would change, write nothing"),
    overwrite: bool = typer.Option(False, "--overwrite", help="with --write-tags: replace genres a person set"),
    id3v23: bool = typer.Option(
        False,
        "--id3v23",
        help="MP3/WAV/AIFF without an ID3v2 tag: create ID3v2.3 (several genres joined with --separator) instead of v2.4; a file with one keeps its version",
    ),
    separator: str = typer.Option("; ", help="ID3v2.3 genre separator"),
    device: str = device_option(),
    allow_tf32: bool = tf32_option(),
    precision: str = precision_option(),
):
    """Put genres on music nobody labelled: tag files with a trained model (one row per track;
    bad files are recorded and skipped)."""
    from rich.markup import escape

    from ..deploy.batch import Excerpt, tag
    from ..deploy.writeback import FileTagOptions
    from ..device import precheck

    ex = Excerpt.parse(excerpt)  # bad values fail before anything is read
    is_onnx = model.suffix.lower() == ".onnx"
    if runtime not in ("auto", "torch", "onnx"):
        fail(f"--runtime must be auto, torch or onnx, got {runtime!r}")
    if runtime == "onnx" and not is_onnx:
        fail(
            f"--runtime onnx runs an exported model: `embedkit export {model} --format onnx -o model.onnx`, then tag with model.onnx"
        )
    if runtime == "torch" and is_onnx:
        fail(f"{model} is an ONNX model; it runs with --runtime onnx (or auto)")
    if workers is not None and workers < 1:
        fail("--workers must be >= 1")
    if batch_size is not None and batch_size < 1:
        fail("--batch-size must be >= 1")
    if not dask:  # an unusable device or precision: one line before anything is read
        precheck(device, allow_tf32, precision)
    if (dry_run or overwrite) and not write_tags:
        fail("--dry-run and --overwrite apply to --write-tags")
    if write_tags and not dry_run and not db:
        fail("--write-tags needs --db: the database records the previous genres so `embedkit untag` can restore them")
    file_tags = (
        FileTagOptions(dry_run=dry_run, overwrite=overwrite, id3_version=3 if id3v23 else 4, separator=separator)
        if write_tags
        else None
    )
    res, log_note = run_job(
        "tag",
        dask,
        lambda executor, progress: tag(
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
            not_music=not_music,
            file_tags=file_tags,
            workers=workers,
            batch_size=batch_size,
            checkpoint=checkpoint,
            executor=executor,
            retry_failed=retry_failed,
            keep_rows=max(table, 0),
            progress=progress,
            device=device,
            precision=precision,
            allow_tf32=allow_tf32,
        ),
    )
    _print_tag_table(res, ex, table)
    summarise_job(
        res,
        f"{res.n_tagged} tracks tagged ({ex}, {res.windows} windows), {res.n_done_before} already in the database"
        + (f" ({res.n_redecided} decided again under this rule)" if res.n_redecided else ""),
        lines=[
            escape(f"results: {db} (table tags, model_id {res.model_id}; failures in tag_failures)") if db else "",
            escape(f"wrote {out}") if out else "",
            *(escape(line) for line in res.inputs.summary()),
        ],
    )
    if write_tags:
        _summarise_changes(res.file_tags)
    if log_note:
        say(console(), escape(log_note))
    job_exit(res, "tagged", strict)


def _print_tag_table(res, ex, table: int) -> None:
    """The first ``table`` tracks' genres: the command's output, on stdout."""
    if not (table and res.rows):
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

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
    Console().print(t)
    if res.n_inputs > table and len(res.rows) >= table:
        console().print(f"(first {table} of {res.n_inputs} tracks; --out x.csv / --db for all)", highlight=False)


def _summarise_changes(report, max_lines: int = 20) -> None:
    """What --write-tags / untag did (or would do): one line per file not simply written."""
    from rich.markup import escape

    c = console()
    for ch in report.notes[:max_lines]:
        status = "would write" if ch.status == "would-write" else f"[yellow]{ch.status}[/]"
        say(c, f"{status} {escape(ch.path)}: {escape(ch.reason)}")
    if getattr(report, "n_removed", 0):
        shown = ", ".join(report.removed[:3]) + (", ..." if report.n_removed > 3 else "")
        say(c, escape(f"removed {report.n_removed} temporary copies left by a killed tag writer: {shown}"))
    say(
        c,
        "tags in files"
        + (" (dry run, nothing written)" if report.dry_run else "")
        + ": "
        + (", ".join(f"{n} {s}" for s, n in report.counts.most_common()) or "no files"),
    )


def untag_cmd(
    model: Path = typer.Argument(..., help="the run directory / model file whose genres to remove"),
    paths: Optional[List[str]] = typer.Argument(
        None,
        help="only these files or folders (default: every file the model wrote genres into); a moved or "
        "renamed file is found there by its content",
    ),
    db: str = typer.Option(..., help="the results database `tag --write-tags` recorded the previous genres in"),
    dry_run: bool = typer.Option(False, "--dry-run", help="show what would be restored, write nothing"),
    force: bool = typer.Option(False, "--force", help="restore even where a person changed the genre since"),
):
    """Undo `embedkit tag --write-tags`: put back the genres the files held before."""
    from ..deploy.writeback import untag_files

    _summarise_changes(untag_files(model, db, paths, dry_run=dry_run, force=force))


def serve_cmd(
    model: Path = typer.Argument(
        ..., help="finished run directory, head.skops / model.pt, or an exported model.onnx (onnxruntime, no torch)"
    ),
    host: str = typer.Option("127.0.0.1", help="address to listen on (loopback by default)"),
    port: int = typer.Option(8000, help="TCP port"),
    checkpoint: Optional[str] = typer.Option(None, help="backbone weights for PANNs / AST head runs"),
    excerpt: str = typer.Option(DEFAULT_EXCERPT, help="default excerpt: first | middle | spread:N | full (as `tag`)"),
    threshold: Optional[float] = threshold_option(),
    multi: Optional[bool] = multi_option(),
    multi_threshold: Optional[float] = multi_threshold_option(),
    margin: Optional[float] = margin_option(),
    max_genres: Optional[int] = max_genres_option(),
    not_music: Optional[float] = not_music_option(),
    max_mb: Optional[float] = typer.Option(
        None, help="largest upload in MB (413 above; default: --max-audio-s of CD audio as WAV, 106 MB for 600 s)"
    ),
    max_audio_s: float = typer.Option(600.0, help="seconds of audio one request may decode (excerpt=full: 413 above)"),
    max_windows: int = typer.Option(256, help="windows one request may tag (spread:N beyond: 422)"),
    body_timeout: float = typer.Option(30.0, help="seconds an upload may take (408 after)"),
    chunk_timeout: float = typer.Option(10.0, help="seconds an upload may send nothing (408 after)"),
    max_pending: int = typer.Option(32, help="complete requests in progress before 503 + Retry-After"),
    max_uploads: int = typer.Option(64, help="uploads received at once; when full, the longest-idle one gives way"),
    max_uploads_per_client: int = typer.Option(16, help="uploads received at once from one client address"),
    spool_dir: Optional[str] = typer.Option(
        None, help="directory for upload spool files (default: <temp>/embedkit-serve-<uid>; cleaned at start)"
    ),
    token: Optional[str] = typer.Option(
        None,
        envvar="EMBEDKIT_SERVE_TOKEN",
        help="require Authorization: Bearer TOKEN (env EMBEDKIT_SERVE_TOKEN); needed for a non-loopback --host",
    ),
    insecure_no_token: bool = typer.Option(
        False, "--insecure-no-token", help="serve a non-loopback --host without a token (anyone reaching the port)"
    ),
    allow_host: Optional[List[str]] = typer.Option(
        None, "--allow-host", help="another Host name the server answers to (repeatable; '*': any)"
    ),
    allow_origin: Optional[List[str]] = typer.Option(
        None, "--allow-origin", help="another web page origin allowed to POST, e.g. https://app.example (repeatable)"
    ),
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
    from ..audio.excerpts import Excerpt
    from ..calibration import DecisionRule
    from ..deploy.serve import LOOPBACK_HOSTS, ServeConfig, bind_config, is_loopback, serve
    from ..device import precheck

    precheck(device, allow_tf32, "fp32")  # an unusable device fails before the model loads

    Excerpt.parse(excerpt)
    if (max_mb is not None and max_mb <= 0) or body_timeout <= 0 or chunk_timeout <= 0 or max_audio_s <= 0:
        fail("--max-mb, --max-audio-s, --body-timeout and --chunk-timeout must be positive")
    if min(max_pending, max_batch_windows, decode_workers, max_windows, max_uploads, max_uploads_per_client) < 1:
        fail("--max-pending, --max-batch-windows, --decode-workers, --max-windows and --max-uploads* must be >= 1")
    # bad values: one line
    DecisionRule().with_overrides(threshold, multi, multi_threshold, margin, max_genres, not_music)
    cfg = ServeConfig(
        max_bytes=None if max_mb is None else int(max_mb * 1024 * 1024),
        max_audio_s=max_audio_s,
        max_windows=max_windows,
        body_timeout_s=body_timeout,
        chunk_timeout_s=chunk_timeout,
        max_pending=max_pending,
        max_uploads=max_uploads,
        max_uploads_per_client=max_uploads_per_client,
        spool_dir=spool_dir,
        token=token or None,
        allowed_hosts=LOOPBACK_HOSTS + tuple(allow_host or ()),
        allowed_origins=tuple(allow_origin or ()),
        batch_wait_ms=batch_wait_ms,
        max_batch_windows=max_batch_windows,
        decode_workers=decode_workers,
        excerpt=excerpt,
        threshold=threshold,
        multi=multi,
        multi_threshold=multi_threshold,
        margin=margin,
        max_genres=max_genres,
        not_music=not_music,
        db=db,
    )
    bind_config(host, cfg, insecure_no_token)  # a refused --host: one line before the model loads
    if not is_loopback(host) and cfg.token is None:
        print(
            f"embedkit serve: WARNING: --insecure-no-token: {host}:{port} answers ANYONE who can reach it, with no "
            "token"
            + (" and any Host name" if host in ("0.0.0.0", "::") else "")
            + "; they can tag audio"
            + (" and write rows into --db" if db else ""),
            file=sys.stderr,
        )
    console().print(f"embedkit serve: loading {model}; then http://{host}:{port}/ (docs at /docs)", highlight=False)
    serve(
        model,
        host=host,
        port=port,
        cfg=cfg,
        checkpoint=checkpoint,
        device=device,
        allow_tf32=allow_tf32,
        insecure_no_token=insecure_no_token,
    )
