"""What every command shares: errors as one line, the stderr console, the one progress bar, the
one end-of-job summary (extract, tag), the shared options (device, precision, TF32, the
decision rule) and library warnings as one line each.

Nothing heavy at module level: `embedkit --help` imports this (and typer) only."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, Optional

import typer


def fail(msg: str, code: int = 1):
    """The command's error: one line on stderr, exit ``code``."""
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
        from ..errors import ConfigError, EmbedkitError

        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            fail(option_message(exc))
        except EmbedkitError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            fail(
                "interrupted; finished work is kept (extraction and `embedkit run` resume by themselves; train-cnn / finetune with --resume RUN_DIR)",
                130,
            )
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:  # a bug or an unforeseen input: still one line, no traceback
            if os.environ.get("EMBEDKIT_DEBUG"):
                raise
            from ..errors import first_line

            fail(f"internal error: {first_line(exc, with_type=True)} (set EMBEDKIT_DEBUG=1 for the traceback)")

    return wrapper


def console():
    from rich.console import Console

    return Console(stderr=True)


def say(c, text: str, **kw) -> None:
    """One message line as is (no highlighting, no wrapping inside words)."""
    c.print(text, highlight=False, soft_wrap=True, **kw)


def load_tracks(data: Path, audio_dir: Optional[Path], subset: str = "small", labels_from_tags=None):
    from ..datasets import load_dataset

    return load_dataset(data, audio_dir=audio_dir, subset=subset, labels_from_tags=labels_from_tags)


# -- the one progress bar ----------------------------------------------------------------------


def progress_bar(description: str = "", *, unit: Optional[str] = None, info: bool = False):
    """The commands' progress bar on stderr: description, bar, done/total (or, ``info``, a free
    text field of each task), the speed in ``unit``/s when given, elapsed time and ETA.

    Returns (progress, callback(done, total)). The callback counts one task named
    ``description`` and shows the bar on its first report of work to do, so an error while a
    model loads prints no empty bar and a run with nothing to do shows none. Event-driven
    callers (training) add their own tasks (with ``info=``) and start the progress themselves.
    Stop it with ``progress.stop()`` (idempotent)."""
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
            return Text(f"{task.speed:.1f} {unit}/s" if task.speed else f"- {unit}/s")

    prog = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}") if info else MofNCompleteColumn(),
        *((Rate(),) if unit else ()),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console(),
        transient=False,
    )
    task = None

    def callback(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            task = prog.add_task(description, total=None, info="")
        if total:
            prog.start()  # idempotent
        prog.update(task, completed=done, total=total)

    return prog, callback


def run_job(description: str, dask: Optional[str], call: Callable[[Any, Callable], Any], log_home=None):
    """A batch job (extract, tag) in a command's setting (``jobs.job_environment``: what native
    decoders print goes to a decoder log instead of between progress lines; with ``dask`` the
    executor is a Dask client, closed afterwards) under the progress bar, counting tracks.

    call(executor, progress) runs the job and returns its result; log_home(result): where a
    non-empty decoder log is kept. Returns (result, note: 'decoder messages: PATH' or '')."""
    from ..jobs import job_environment

    with job_environment(dask) as env:
        prog, cb = progress_bar(description, unit="tracks")
        try:
            res = call(env.executor, cb)
        finally:
            prog.stop()
        if log_home is not None:
            env.log_home = log_home(res)
    return res, env.note


# -- the one end-of-job summary (extract, tag) ---------------------------------------------------


def device_line(info: dict) -> str:
    """'device cuda:0 (NVIDIA H200), fp32' for a summary line ('' when nothing ran)."""
    if not info:
        return ""
    extra = "" if info.get("precision", "fp32") == "fp32" else f", {info['precision']}"
    return f"device {info.get('device')} ({info.get('name')}){extra}"


def summarise_job(
    res,
    headline: str,
    *,
    after_failed: str = "",
    lines: tuple[str, ...] | list[str] = (),
    all_failures: str = "",
    max_lines: int = 20,
) -> None:
    """What a batch job did (``res``: a ``jobs.JobResult``), on stderr: ``headline`` (rich
    markup; the job's own counts) + the counters every job reports (failed now, ``after_failed``,
    failed in earlier runs, seconds, tracks/s, device); one 'skipped PATH: reason' line per
    failure, at most ``max_lines``, then a count by reason and ``all_failures`` (where the full
    list is); then ``lines`` (rich markup: escape file names). ``job_exit`` then decides the exit status."""
    from collections import Counter

    from rich.markup import escape  # file names may contain [brackets]

    c = console()
    rate = f", {res.n_done / res.seconds:.1f} tracks/s" if res.n_done and res.seconds > 0 else ""
    say(
        c,
        headline
        + f", {res.n_failed} failed"
        + after_failed
        + (
            f" (+{res.n_failed_before} failed in earlier runs; --retry-failed retries them)"
            if res.n_failed_before
            else ""
        )
        + f", {res.seconds:.1f} s{rate}"
        + (f"; {escape(device_line(res.device))}" if getattr(res, "device", None) else ""),
    )
    for f in res.failures[:max_lines]:
        say(c, f"[yellow]skipped[/] {escape(f['path'])}: {escape(f['reason'])}")
    if len(res.failures) > max_lines:
        reasons = Counter(f["reason"].split(" (")[0].split(":")[0] for f in res.failures)
        say(
            c,
            escape(
                f"... and {len(res.failures) - max_lines} more; by reason: "
                + ", ".join(f"{r} x{n}" for r, n in reasons.most_common(5))
            ),
        )
        if all_failures:
            say(c, escape(all_failures))
    for line in lines:
        if line:
            say(c, line)


def job_exit(res, verb: str, strict: bool) -> None:
    """The exit rule of a batch job: 1 when nothing usable came of it (``nothing_done``), and
    with --strict when any input failed (in this run or an earlier one)."""
    if res.nothing_done:
        fail(f"nothing could be {verb}: {res.n_failed_total} of {res.n_inputs} files failed")
    if strict and res.n_failed_total:
        fail(f"--strict: {res.n_failed_total} of {res.n_inputs} files failed")


def print_warnings(caught) -> None:
    """Library warnings (padding, skipped manifest rows, ...) as one line each, no source lines."""
    from rich.markup import escape  # file names may contain [brackets]

    from ..errors import first_line

    c = console()
    seen = set()
    for w in caught:
        if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning)):
            continue  # addressed to developers, not to the person running the command
        msg = first_line(w.message, limit=None) if str(w.message).strip() else w.category.__name__
        if msg not in seen:
            seen.add(msg)
            say(c, f"[yellow]warning[/] {escape(msg)}")


# -- the shared options: ONE definition each ------------------------------------------------------
_DEVICE_HELP = "where networks run: auto (CUDA, else Apple MPS, else CPU) | cpu | cuda | cuda:N | mps"
_TF32_HELP = (
    "CUDA: allow TF32 matmuls/convolutions (faster; ~1e-3 relative difference from the CPU; off by default for parity)"
)
_PRECISION_HELP = "inference precision: fp32 | bf16 | fp16 (autocast; fp16 on accelerators only; changes results slightly, see README)"


def device_option():
    return typer.Option("auto", "--device", help=_DEVICE_HELP)


def tf32_option():
    return typer.Option(False, "--allow-tf32", help=_TF32_HELP)


def precision_option():
    return typer.Option("fp32", "--precision", help=_PRECISION_HELP)


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


def not_music_option():
    return typer.Option(
        None,
        "--not-music",
        help="at or above this not-music score a track is 'not-music' (default: the model's, chosen on its held-out tracks)",
    )


# -- labels from a library's own genre tags (embedkit.taxonomy) --------------------------------


def labels_from_tags_option():
    return typer.Option(
        False,
        "--labels-from-tags",
        help="DATA is a music folder in any layout: labels from the files' genre tags, artists as CV groups; untagged files are not training data",
    )


def genre_map_option():
    return typer.Option(
        None, "--genre-map", help="with --labels-from-tags: a TOML genre map ([map] raw = class, drop = [...])"
    )


def min_tracks_option():
    return typer.Option(
        None, "--min-tracks", help="with --labels-from-tags: drop classes with fewer tracks (default 5)"
    )


def tag_labels(labels_from_tags: bool, genre_map: Optional[Path], min_tracks: Optional[int]):
    """The ``taxonomy.TagLabels`` the three options describe (None without --labels-from-tags)."""
    if not labels_from_tags:
        if genre_map is not None or min_tracks is not None:
            fail("--genre-map and --min-tracks go with --labels-from-tags")
        return None
    from ..taxonomy import DEFAULT_MIN_TRACKS, TagLabels

    if min_tracks is not None and min_tracks < 1:
        fail("--min-tracks must be >= 1")
    return TagLabels(str(genre_map) if genre_map else None, DEFAULT_MIN_TRACKS if min_tracks is None else min_tracks)
