"""Library commands on the results database: similar, playlist, index (``embedkit.deploy.similar``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, fail

DB_HELP = "results database written by `embedkit tag --db` (SQLite file or SQLAlchemy URL)"
MODEL_HELP = "run directory, model file or model id whose vectors to use (default: the database's only one)"


def similar_cmd(
    query: str = typer.Argument(..., help="a library track (path or fingerprint) or any audio file"),
    db: str = typer.Option(..., "--db", help=DB_HELP),
    k: int = typer.Option(10, "-k", help="number of results"),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    max_per_artist: Optional[int] = typer.Option(None, "--max-per-artist", help="at most N results per artist"),
    exclude_same_album: bool = typer.Option(False, "--exclude-same-album", help="no results from the query's album"),
    genre: Optional[str] = typer.Option(None, "--genre", help="only tracks decided as this genre"),
    min_confidence: Optional[float] = typer.Option(
        None, "--min-confidence", help="only tracks whose decided (or --genre) probability is at least this"
    ),
    keep_duplicates: bool = typer.Option(
        False, "--keep-duplicates", help="list near-duplicates of the query among the results"
    ),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="write the results: .csv, .jsonl or .m3u8"),
    excerpt: Optional[str] = typer.Option(None, help="an audio file outside the library: what is listened to"),
    checkpoint: Optional[str] = typer.Option(None, help="backbone weights of a head run on PANNs / AST"),
):
    """The tracks of a tagged library most similar to QUERY, with rules (artist cap, album,
    genre, confidence); near-duplicates of the query are listed apart."""
    from ..deploy.similar import Rules, check_out, similar, write_hits

    if k < 1:
        fail(f"-k must be >= 1, got {k}")
    check_out(out)
    rules = Rules(
        max_per_artist=max_per_artist,
        exclude_same_album=exclude_same_album,
        genre=genre,
        min_confidence=min_confidence,
        duplicates="keep" if keep_duplicates else "collapse",
    )
    res = similar(db, query, k, rules, model=model, excerpt=excerpt, checkpoint=checkpoint)
    if out is not None:
        write_hits(out, res.hits, res.labels)
        console().print(f"{len(res.hits)} results -> {out}", highlight=False)
    _print_hits(res)


def _print_hits(res) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(show_edge=False, pad_edge=False)
    for col in ("#", "track", "score", "artist", "album", "genre", "p"):
        t.add_column(col, overflow="fold")
    for i, h in enumerate(res.hits, 1):
        tr = h.track
        p = "" if tr.top_p is None else f"{tr.top_p:.2f}"
        t.add_row(
            str(i),
            escape(tr.path),
            f"{h.score:.3f}",
            escape(tr.artist or ""),
            escape(tr.album or ""),
            escape(tr.decision or ""),
            p,
        )
    Console().print(t)
    c = console()
    for h in res.duplicates:
        c.print(
            f"near-duplicate of the query: {escape(h.track.path)} (cosine {h.embedding_cosine:.3f})", highlight=False
        )
    if len(res.hits) == 0:
        c.print("no track of the library passes the rules", highlight=False)
    c.print(f"{res.n_library} tracks, {res.index_kind} index, {res.seconds * 1000:.0f} ms", highlight=False)


def playlist_cmd(
    db: str = typer.Option(..., "--db", help=DB_HELP),
    genre: Optional[str] = typer.Option(None, "--genre", help="the tracks that best fit this genre"),
    seed: Optional[str] = typer.Option(None, "--seed", help="a radio from this track (library track or audio file)"),
    length: int = typer.Option(25, "--length", "-n", help="tracks in the playlist"),
    min_confidence: Optional[float] = typer.Option(
        None, "--min-confidence", help="only tracks whose decided (or --genre) probability is at least this"
    ),
    max_per_artist: Optional[int] = typer.Option(
        None, "--max-per-artist", help="at most N tracks per artist (radio default: 2)"
    ),
    keep_duplicates: bool = typer.Option(
        False, "--keep-duplicates", help="radio: allow near-duplicates of tracks already in it"
    ),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="write the playlist: .m3u8 (or .csv / .jsonl)"),
):
    """A playlist from a tagged library: --genre G (its best-fitting tracks) or --seed TRACK (a
    radio: a walk through similar tracks, no artist twice in a row), as M3U8 with paths
    relative to the playlist."""
    from ..deploy.similar import Hit, check_out, genre_playlist, radio, write_hits

    if genre is None and seed is None:
        fail("give --genre GENRE (best-fitting tracks) or --seed TRACK (a radio)")
    if length < 1:
        fail(f"--length must be >= 1, got {length}")
    check_out(out)
    if seed is not None:
        pl = radio(
            db,
            seed,
            length,
            max_per_artist=2 if max_per_artist is None else max_per_artist,
            model=model,
            genre=genre,
            min_confidence=min_confidence,
            duplicates="keep" if keep_duplicates else "collapse",
        )
    else:
        pl = genre_playlist(db, genre, length, min_confidence, max_per_artist, model=model)
    hits = [Hit(t, s) for t, s in zip(pl.tracks, pl.scores)]
    if out is not None:
        write_hits(out, hits, pl.labels)
    from rich.markup import escape

    c = console()
    for i, (t, s) in enumerate(zip(pl.tracks, pl.scores), 1):
        typer.echo(f"{i:3d}  {s:.3f}  {t.artist or '-'}  {t.path}")
    if pl.missing:
        c.print(f"{len(pl.missing)} library tracks left out: their files are gone (e.g. {escape(pl.missing[0])})")
    c.print(
        f"{pl.kind} playlist of {len(pl.tracks)} tracks" + (f" -> {out}" if out is not None else ""), highlight=False
    )


def index_cmd(
    db: str = typer.Option(..., "--db", help=DB_HELP),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    rebuild: bool = typer.Option(False, "--rebuild", help="build it again from the database (new mean)"),
    codec: Optional[str] = typer.Option(
        None, help="how the approximate index stores vectors: SQ8 (default), SQ6, SQ4, SQfp16, Flat"
    ),
    nlist: Optional[int] = typer.Option(None, help="k-means cells (default: about 2 sqrt(N))"),
    nprobe: Optional[int] = typer.Option(None, help="cells searched per query (default: tuned at build)"),
    recall: Optional[float] = typer.Option(None, help="recall@10 the search is tuned to at build (default 0.98)"),
    rows_dtype: Optional[str] = typer.Option(None, help="rows re-ranked exactly: float16 (default) | float32"),
):
    """Bring the similarity index of a library up to date (tracks tagged since are added), or
    --rebuild it from the database. Index settings given here are kept by every later use
    (`similar`, `playlist`, `radio`, `serve`); an index built with others is rebuilt with them."""
    from ..deploy.similar import update_index

    given = {"codec": codec, "nlist": nlist, "nprobe": nprobe, "recall": recall, "rows_dtype": rows_dtype}
    info, added = update_index(db, model, rebuild=rebuild, settings={k: v for k, v in given.items() if v is not None})
    console().print(
        f"index of model {info.model_id}: {info.n} tracks, {info.kind}, {info.dim}-d space"
        + (" (rebuilt)" if rebuild else f" ({added} added or updated)"),
        highlight=False,
    )
