"""What "the same audio" means, in one place: a fingerprint of the file's bytes.

Two paths whose bytes are equal are the same audio (extracted once, tagged once); a file
replaced or edited in place is new audio, whatever its path. Every stage that decides "already
done" (the embedding store, the CNN clip caches, the tagging database) asks this module.

The fingerprint is the SHA-256 of the file's bytes (hex, first 32 digits: 128 bits). Hashing
runs at ~1-2 GB/s, far below the cost of decoding the same bytes. The (size, mtime_ns, inode)
of a file only decides when a cached fingerprint must be recomputed; it never decides on its own
that two different paths hold the same audio.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .errors import AudioError

#: hex digits kept of the SHA-256 (128 bits: collisions are not a practical concern).
DIGITS = 32
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileStat:
    """The cheap part of a file's identity: enough to know when to re-hash it."""

    path: str  # absolute
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> "FileStat":
        p = Path(path)
        try:
            st = p.stat()
        except FileNotFoundError:
            raise AudioError(p, "file not found") from None
        except OSError as exc:
            raise AudioError(p, f"cannot read file ({exc.strerror or type(exc).__name__})") from None
        if not p.is_file():
            raise AudioError(p, "is a directory, not an audio file" if p.is_dir() else "not a regular file")
        return cls(str(p.resolve()), int(st.st_size), int(st.st_mtime_ns), int(st.st_ino))


def hash_file(path: str | os.PathLike) -> str:
    """SHA-256 of the bytes of ``path`` (first DIGITS hex digits). Raises AudioError naming the file."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    except FileNotFoundError:
        raise AudioError(path, "file not found") from None
    except IsADirectoryError:
        raise AudioError(path, "is a directory, not an audio file") from None
    except OSError as exc:
        raise AudioError(path, f"cannot read file ({exc.strerror or type(exc).__name__})") from None
    return h.hexdigest()[:DIGITS]


#: fingerprints remembered by this process (the least recently used go first): enough for a dataset
#: that one process extracts, then trains on; bounded so a long-running service stays flat
CACHE_SIZE = 20_000
_cache: OrderedDict[FileStat, str] = OrderedDict()
_lock = threading.Lock()


def identify(
    path: str | os.PathLike, known: dict[FileStat, str] | None = None, remember: bool = True
) -> tuple[FileStat, str]:
    """(stat, fingerprint) of ``path``; see ``fingerprint``. The stat is taken before hashing,
    so a caller that records both and later sees the same stat may trust the fingerprint.
    remember=False: leave the process cache as it is (a job that sees each file once and keeps
    its own record, like ``embedkit tag`` with its database)."""
    st = FileStat.of(path)
    if known is not None and st in known:
        return st, known[st]
    with _lock:
        hit = _cache.get(st)
        if hit is not None:
            _cache.move_to_end(st)
    if hit is not None:
        return st, hit
    digest = hash_file(st.path)
    # The file may have changed while it was read: only cache when the stat still matches.
    if remember and FileStat.of(path) == st:
        with _lock:
            _cache[st] = digest
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
    return st, digest


def fingerprint(path: str | os.PathLike, known: dict[FileStat, str] | None = None) -> str:
    """Content fingerprint of ``path``.

    known: fingerprints recorded earlier (e.g. by a store), keyed by FileStat; used when the
    file's stat is unchanged, so re-runs over unchanged files read no bytes. A file whose stat
    changed is re-hashed. Thread-safe; results are also cached for the process.
    """
    return identify(path, known)[1]


def identify_many(
    paths: Sequence[str | os.PathLike], known: dict[FileStat, str] | None = None, workers: int | None = None
) -> list[tuple[FileStat, str] | AudioError]:
    """``identify`` of every path, hashed in parallel threads (hashlib releases the GIL); in
    ``paths`` order, an AudioError (missing, unreadable file) in place of a result."""

    def one(p):
        try:
            return identify(p, known)
        except AudioError as exc:
            return exc

    if len(paths) < 2:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(
        max(1, min(workers or os.cpu_count() or 1, len(paths))), thread_name_prefix="embedkit-hash"
    ) as pool:
        return list(pool.map(one, paths))


def with_fingerprints(tracks, known: dict[FileStat, str] | None = None):
    """A track table (DataFrame with a ``path`` column) with a ``fingerprint`` column added
    (None for a file that cannot be read); returned unchanged when it already has one."""
    if "fingerprint" in tracks:
        return tracks
    res = identify_many(list(tracks["path"]), known)
    out = tracks.copy()
    out["fingerprint"] = [None if isinstance(r, AudioError) else r[1] for r in res]
    out.attrs = dict(tracks.attrs)
    return out


def load_known(file: str | os.PathLike) -> dict[FileStat, str]:
    """Fingerprints saved by ``save_known``; {} when the file is absent or unreadable (it is
    only a cache: a lost entry costs one re-hash)."""
    try:
        rows = json.loads(Path(file).read_text())
        return {FileStat(r[0], int(r[1]), int(r[2]), int(r[3])): str(r[4]) for r in rows}
    except (OSError, ValueError, TypeError, IndexError):
        return {}


def save_known(file: str | os.PathLike, entries: Iterable[tuple[FileStat, str]]) -> None:
    """Write (stat, fingerprint) pairs atomically, one entry per path (the latest wins)."""
    from .io import atomic_write_text

    by_path = {st.path: (st, fp) for st, fp in entries}
    rows = [[st.path, st.size, st.mtime_ns, st.inode, fp] for st, fp in by_path.values()]
    atomic_write_text(file, json.dumps(rows))
