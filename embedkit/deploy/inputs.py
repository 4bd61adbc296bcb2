"""What a batch job is given to tag: files, folders, path lists and stdin -> audio paths.

A folder scan takes every file the decoder can open (``decoding.scan_kind``, the rule a
``<label>/<file>`` dataset folder shares): names with an audio extension at once, any other file
when its leading bytes are an audio format (an MP3 saved without extension, an M4A named .dat).
The rest is counted as not audio, by kind, and unreadable folders and unusable list entries are
named one per line in ``InputReport``: nothing is skipped without a word.
"""

from __future__ import annotations

import csv
import io
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable
from urllib.parse import urlsplit
from urllib.request import url2pathname

from ..errors import EmbedkitError

#: a list entry with a scheme (http://, rtsp://, smb://...); one letter is a Windows drive (C:\)
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
#: encodings tried in order for a path list: UTF-8 (with or without BOM), then Windows' cp1252
#: (classic .m3u files from Winamp / Windows Media Player), then Latin-1 (never fails)
LIST_ENCODINGS = ("utf-8-sig", "cp1252", "latin-1")


@dataclass
class InputReport:
    """What ``expand_inputs`` left out and why.

    not_audio: (path, kind) of files in the folders scanned that are not audio ("JPEG image",
    "unrecognised content"...); problems: one line each for an unreadable folder, a list entry
    that is a URL, a list read with a fallback encoding."""

    not_audio: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def summary(self, examples: int = 1) -> list[str]:
        """Lines for the terminal: the not-audio count by kind (with an example path), then the
        problems."""
        from ..audio.decoding import not_audio_note

        head = [not_audio_note(self.not_audio, examples=examples)] if self.not_audio else []
        return head + list(self.problems)


def expand_inputs(inputs: Iterable[str | os.PathLike], stdin=None, report: InputReport | None = None) -> list[str]:
    """Audio paths from files, folders (recursive: every file the decoder can open), path lists
    (.txt, .m3u/.m3u8, .csv with a ``path`` column or paths in the first column; relative
    entries are relative to the list; ``file://`` URLs accepted) and ``-`` (one path per line on
    stdin). Order kept, duplicates dropped. A path that does not exist is kept: it becomes a
    recorded failure, not an abort. What is left out (files that are not audio, unreadable
    folders, URL entries) goes to ``report`` when one is given."""
    from ..audio.decoding import LIST_SUFFIXES, scan_kind

    rep = report if report is not None else InputReport()
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
            for q in sorted(_walk(p, rep)):
                kind = scan_kind(q)
                if kind is None:
                    add(q)
                else:
                    rep.not_audio.append((str(q), kind))
        elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
            for q in _read_list(p, rep):
                add(q)
        else:
            add(p)
    return list(out)


def _walk(root: Path, rep: InputReport) -> Iterable[Path]:
    """Every file under ``root`` (following links to folders once); an unreadable folder is
    reported, not skipped without a word."""
    seen: set[tuple[int, int]] = set()

    def unreadable(exc: OSError) -> None:
        where = exc.filename or root
        rep.problems.append(f"{where}: cannot read this folder ({exc.strerror or exc}); its files were not scanned")

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        try:
            st = os.stat(dirpath)
            key = (st.st_dev, st.st_ino)
        except OSError:
            key = None
        if key is not None:
            if key in seen:  # a link back up the tree
                dirnames[:] = []
                continue
            seen.add(key)
        for f in filenames:
            yield Path(dirpath) / f


def _decode_list(p: Path, rep: InputReport) -> str:
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise EmbedkitError(f"{p}: cannot read the path list ({exc.strerror or exc})") from None
    for enc in LIST_ENCODINGS:
        try:
            text = raw.decode(enc)
        except UnicodeDecodeError:
            continue
        if enc != LIST_ENCODINGS[0]:
            rep.problems.append(f"{p}: not UTF-8; read as {enc}")
        return text
    raise AssertionError("latin-1 decodes any bytes")  # pragma: no cover


def _read_list(p: Path, rep: InputReport | None = None) -> list[Path]:
    rep = rep if rep is not None else InputReport()
    text = _decode_list(p, rep)
    entries: list[tuple[int, str]] = []
    if p.suffix.lower() in (".csv", ".tsv"):
        rows = list(csv.reader(io.StringIO(text), delimiter="\t" if p.suffix.lower() == ".tsv" else ","))
        if rows:
            header = [h.strip().lower() for h in rows[0]]
            col = header.index("path") if "path" in header else 0
            first = 2 if "path" in header else 1
            body = rows[1:] if "path" in header else rows
            entries = [(i + first, r[col].strip()) for i, r in enumerate(body) if len(r) > col and r[col].strip()]
    else:
        entries = [
            (i + 1, line.strip())
            for i, line in enumerate(text.splitlines())
            if line.strip() and not line.lstrip().startswith("#")
        ]
    paths = []
    for line_no, e in entries:
        if _URL_RE.match(e):
            parts = urlsplit(e)
            if parts.scheme.lower() != "file" or parts.netloc not in ("", "localhost"):
                rep.problems.append(f"{p}:{line_no}: {e}: URLs are not supported (give a local path or a file:// URL)")
                continue
            q = Path(url2pathname(parts.path))  # percent-decoded; /C:/x -> C:\\x on Windows
        else:
            q = Path(e).expanduser()
        paths.append(q if q.is_absolute() else p.parent / q)
    return paths
