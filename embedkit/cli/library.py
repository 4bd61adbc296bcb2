"""Library commands: labels export / import (a person's labels in the results database) and audit
(the files' own genre tags that disagree with the model); each calls one function of
``embedkit.deploy.library``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, fail, say

labels_app = typer.Typer(
    no_args_is_help=True,
    help="A person's labels in the results database: export and import them as CSV.",
)


def labels_export_cmd(
    db: str = typer.Option(..., "--db", help="results database (SQLite path or SQLAlchemy URL)"),
    out: Path = typer.Option(..., "--out", "-o", help="CSV file to write"),
):
    """Write every label (fingerprint, path, label, source, reviewer, model, decision shown, times) as CSV."""
    from ..deploy.library import export_labels

    n = export_labels(db, out)
    say(console(), f"{n} label(s) -> {out}")


def labels_import_cmd(
    csv_path: Path = typer.Argument(..., help="CSV with a label column and a path or fingerprint column"),
    db: str = typer.Option(..., "--db", help="results database (SQLite path or SQLAlchemy URL)"),
    reviewer: Optional[str] = typer.Option(
        None, help="reviewer name for every row (default: the CSV's column, else none)"
    ),
    source: str = typer.Option("import", help="source recorded for rows without a source column"),
):
    """Import labels; a path is resolved to its content fingerprint, so the label follows the song."""
    from ..deploy.library import import_labels

    res = import_labels(db, csv_path, source=source, reviewer=reviewer)
    c = console()
    for line, why in res.problems[:20]:
        say(c, f"[yellow]not imported[/] {csv_path}:{line}: {why}")
    say(c, f"{res.n_written} of {res.n_rows} label(s) imported into {db}")
    if res.problems:
        raise typer.Exit(1)


def audit_cmd(
    db: str = typer.Option(..., "--db", help="results database the model tagged"),
    model: Optional[str] = typer.Option(
        None, "--model", help="run directory or model id (default: the only model there)"
    ),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="also write the ranking as CSV"),
    top: int = typer.Option(20, help="rows to print"),
):
    """Rank tracks whose own genre tag disagrees with a confident, calibrated decision."""
    if top < 0:
        fail("--top must be >= 0")
    from rich.markup import escape

    from ..deploy.library import audit

    rows = audit(db, model, out=out)
    c = console()
    for r in rows[:top]:
        say(
            c,
            f"{r['rank']:>3}  {r['score']:.2f}  {escape(r['path'])}: tagged {escape(r['tag'])!r}, "
            f"model says {r['decision']} ({r['p_decision']:.2f}; {r['tag_class']} {r['p_tag']:.2f})",
        )
    say(c, f"{len(rows)} track(s) whose tag disagrees with the model" + (f"; all in {out}" if out else ""))


def retrain_cmd(
    run: Path = typer.Argument(..., help="the run to retrain (head, cnn or finetune)"),
    db: str = typer.Option(..., "--db", help="results database holding the labels"),
    cache: Path = typer.Option(Path("cache"), help="embedding store root"),
    runs: Path = typer.Option(Path("runs"), help="where the new run goes"),
    promote: bool = typer.Option(False, "--promote", help="make the new model current: re-tag the library with it"),
    write_tags: bool = typer.Option(
        False, "--write-tags", help="with --promote: changed genres into the files' tags (undo: `embedkit untag`)"
    ),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all)"),
    workers: Optional[int] = typer.Option(None, help="extraction / tagging lanes (default: CPU count)"),
):
    """Train a new run on RUN's dataset plus the reviewed labels (a head on the stored embeddings;
    a CNN / fine-tune with its recipe, on the audio), scored with the old model on the audit
    labels neither was trained on."""
    if write_tags and not promote:
        fail("--write-tags goes with --promote")
    from ..deploy.library import promote as promote_run
    from ..deploy.library import retrain

    c = console()
    res = retrain(run, db, cache=cache, runs=runs, threads=threads, workers=workers, log=lambda s: say(c, s))
    data = (
        f"{res.n_reused} embedding(s) reused, {res.n_extracted} extracted"
        if res.metrics.get("kind") == "head"
        else f"trained on the audio ({res.metrics.get('kind')} recipe of {run})"
    )
    say(
        c,
        f"[green]{res.run_dir}[/]: {res.n_base} dataset track(s) + {res.n_labelled} label(s) "
        f"({res.n_relabelled} relabelled); {data}; "
        f"track accuracy {res.metrics['track_accuracy']:.3f}; {res.seconds:.1f} s",
    )
    if res.n_missing:
        say(c, f"[yellow]{res.n_missing} labelled track(s) left out[/]: changed since labelled, not in the store")
    for name in ("old", "new"):
        a = res.audit.get(name)
        if a:
            lo, hi = a["ci95"]
            say(c, f"audit labels ({a['n']}), {name} model: {a['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f})")
    if not res.audit:
        say(c, "no audit-sample labels: old and new models not compared on live tracks")
    if promote:
        p = promote_run(res.run_dir, db, write_tags=write_tags, workers=workers)
        say(c, f"promoted {res.run_dir}: {p.n_changed} of {p.n_tracks} decision(s) changed")
        ft = getattr(p.tagged, "file_tags", None)
        if ft is not None:
            say(c, "tags in files: " + ", ".join(f"{n} {k}" for k, n in sorted(ft.counts.items())))


def review_cmd(
    db: str = typer.Option(..., "--db", help="results database the model tagged"),
    model: Optional[str] = typer.Option(
        None, "--model", help="run directory or model id (default: the only model there)"
    ),
    host: str = typer.Option("127.0.0.1", help="address to listen on (loopback by default)"),
    port: int = typer.Option(8770, help="TCP port"),
    reviewer: str = typer.Option("", help="your name, recorded with each label"),
    size: int = typer.Option(60, help="tracks in the queue"),
    random_share: float = typer.Option(0.1, help="share of the queue drawn uniformly at random (the audit sample)"),
    seed: int = typer.Option(0, help="seed of the random sample"),
):
    """Serve a local page to accept / correct / skip the model's genres, one track at a time."""
    if size < 1:
        fail("--size must be >= 1")
    from ..deploy.review import serve_review

    def announce(url: str, state) -> None:
        kinds = {k: sum(q.kind == k for q in state.queue) for k in ("teach", "disagree", "random")}
        say(console(), f"review page: {url} ({', '.join(f'{n} {k}' for k, n in kinds.items())}; Ctrl-C to stop)")

    serve_review(
        db,
        model,
        host=host,
        port=port,
        reviewer=reviewer,
        announce=announce,
        n=size,
        random_share=random_share,
        seed=seed,
    )
