"""What a batch job is given to tag: files, folders, path lists and stdin -> audio paths."""

from __future__ import annotations

import csv
import io
import os
import sys
from pathlib import Path
from typing import Iterable

from ..errors import EmbedkitError

LIST_SUFFIXES = (".txt", ".csv", ".tsv", ".lst", ".m3u", ".m3u8")


def expand_inputs(inputs: Iterable[str | os.PathLike], stdin=None) -> list[str]:
    """Audio paths from files, folders (recursive, audio extensions), path lists (.txt, .m3u,
    .csv with a ``path`` column or paths in the first column; relative entries are relative to
    the list) and ``-`` (one path per line on stdin). Order kept, duplicates dropped. A path
    that does not exist is kept: it becomes a recorded failure, not an abort."""
    from ..audio.decoding import AUDIO_EXTENSIONS

    out: dict[str, None] = {}

    def add(p: Path) -> None:
        out.setdefault(str(p.absolute()), None)

    for item in inputs:
        s = str(item)
        if s == "-":
            for line in stdin or sys.stdin:
                if line.strip():
                    add(Path(line.strip()).expanduser())
            continue
        p = Path(s).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix.lower() in AUDIO_EXTENSIONS and q.is_file())
            for q in found:
                add(q)
        elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
            for q in _read_list(p):
                add(q)
        else:
            add(p)
    return list(out)


def _read_list(p: Path) -> list[Path]:
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise EmbedkitError(f"{p}: cannot read the path list ({exc})") from None
    entries: list[str] = []
    if p.suffix.lower() in (".csv", ".tsv"):
        rows = list(csv.reader(io.StringIO(text), delimiter="\t" if p.suffix.lower() == ".tsv" else ","))
        if rows:
            header = [h.strip().lower() for h in rows[0]]
            col = header.index("path") if "path" in header else 0
            body = rows[1:] if "path" in header else rows
            entries = [r[col].strip() for r in body if len(r) > col and r[col].strip()]
    else:
        entries = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return [q if q.is_absolute() else p.parent / q for q in (Path(e).expanduser() for e in entries)]
