"""``embedkit monitor``: the tags going into a library over time, as one page or one exit code
(``embedkit.deploy.monitor``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, say


def monitor_cmd(
    db: str = typer.Option(
        ..., "--db", help="results database of `embedkit tag` / `serve --db` (path or SQLAlchemy URL)"
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="write the page here (default monitor.html unless --check)"
    ),
    check: bool = typer.Option(False, "--check", help="exit 1 with one line per limit the latest period breaches"),
    period: str = typer.Option("week", help="day | week (ISO weeks, UTC)"),
    model: Optional[str] = typer.Option(None, help="only this model id (a unique prefix is enough)"),
    max_uncertain: float = typer.Option(0.35, help="limit: share of tracks decided 'uncertain'"),
    max_not_music: float = typer.Option(0.10, help="limit: share of tracks decided 'not-music'"),
    max_drift: float = typer.Option(0.05, help="limit: genre drift, PSI of the mix against the training prior"),
    min_tracks: int = typer.Option(
        100, help="drift is checked on periods with at least this many tracks given a genre"
    ),
):
    """Per model and per day or week: tracks tagged, uncertain and not-music rates, genre drift
    against the training prior, confidence, and live accuracy on audited tracks."""
    from ..deploy.monitor import Limits, build_monitor, summarise
    from ..deploy.monitor import check as check_limits

    limits = Limits(max_uncertain, max_not_music, max_drift, min_tracks)
    if out is not None or not check:
        path, summary, breaches = build_monitor(db, out or Path("monitor.html"), period, model, limits)
        n = sum(len(m["periods"]) for m in summary["models"])
        say(console(), f"{len(summary['models'])} model(s), {n} period(s) -> {path}")
    else:
        breaches = check_limits(summarise(db, period, model), limits)
    if check:
        for line in breaches:
            typer.echo(line)
        if breaches:
            raise typer.Exit(1)
        say(console(), "every model's latest period is within the limits")
