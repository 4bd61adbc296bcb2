"""What "the same audio" means, in one place: a fingerprint of the file's bytes.

Two paths whose bytes are equal are the same audio (extracted once, tagged once); a file
replaced or edited in place is new audio, whatever its path. Every stage that decides "already
done" (the embedding store, the CNN clip caches, the tagging database) asks this module.

The fingerprint is a hash of every byte of the file, 128 bits, in one of two schemes; the
string says which:

- ``blake3`` (``SCHEME``, every artefact made now): ``"b3-"`` + the first 32 hex digits of the
  BLAKE3 of the bytes. ~2.5-2.9 GB/s on one core, twice SHA-256's speed here, which matters when
  tagging full-length songs: hashing a 12 MB song was a tenth of the CPU of tagging its first
  30 s with SHA-256 (bench/bench_tag.py).
- ``sha256`` (``LEGACY``): the first 32 hex digits of the SHA-256, what embedkit used before.
  Stores, clip caches and results databases made then record no scheme; they keep SHA-256 for
  as long as they exist (``artefact_scheme``), so none of their rows is orphaned or duplicated
  by an upgrade.

An artefact holds fingerprints of one scheme and compares a file against its rows in that
scheme; fingerprints of two schemes never compare equal. The (size, mtime_ns, inode) of a
file only decides when a cached fingerprint must be recomputed; it never decides on its own
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

#: hex digits kept of the hash (128 bits: collisions are not a practical concern).
DIGITS = 32
_CHUNK = 1 << 20
#: the scheme of every artefact made now
SCHEME = "blake3"
#: the scheme of artefacts that record none (made before schemes existed), and of model ids
LEGACY = "sha256"
SCHEMES = ("blake3", "sha256")
_PREFIX = {"blake3": "b3-", "sha256": ""}


def scheme_of(fp: str) -> str:
    """The scheme of a fingerprint string (``blake3`` or ``sha256``)."""
    return "blake3" if fp.startswith("b3-") else "sha256"


def artefact_scheme(recorded: str | None) -> str:
    """The scheme an artefact uses: the one it recorded, LEGACY when it recorded none (made
    before schemes existed). Raises EmbedkitError for a scheme this embedkit does not know."""
    if recorded is None:
        return LEGACY
    if recorded not in SCHEMES:
        from .errors import EmbedkitError

        raise EmbedkitError(f"fingerprint scheme {recorded!r} is not one this embedkit knows ({', '.join(SCHEMES)})")
    return recorded


def _hasher(scheme: str):
    if scheme == "blake3":
        from blake3 import blake3

        return blake3()
    if scheme == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown fingerprint scheme {scheme!r}")


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


def hash_file(path: str | os.PathLike, scheme: str = SCHEME) -> str:
    """The fingerprint of the bytes of ``path`` in ``scheme`` (see the module docstring).
    Raises AudioError naming the file."""
    h = _hasher(scheme)
    buf = bytearray(_CHUNK)  # one buffer, refilled: no allocation (and page faults) per chunk
    view = memoryview(buf)
    try:
        with open(path, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                h.update(view[:n])
    except FileNotFoundError:
        raise AudioError(path, "file not found") from None
    except IsADirectoryError:
        raise AudioError(path, "is a directory, not an audio file") from None
    except OSError as exc:
        raise AudioError(path, f"cannot read file ({exc.strerror or type(exc).__name__})") from None
    return _PREFIX[scheme] + h.hexdigest()[:DIGITS]


#: fingerprints remembered by this process (the least recently used go first): enough for a dataset
#: that one process extracts, then trains on; bounded so a long-running service stays flat
CACHE_SIZE = 20_000
_cache: OrderedDict[tuple[FileStat, str], str] = OrderedDict()  # (stat, scheme) -> fingerprint
_lock = threading.Lock()


def identify(
    path: str | os.PathLike,
    known: dict[FileStat, str] | None = None,
    remember: bool = True,
    scheme: str = SCHEME,
) -> tuple[FileStat, str]:
    """(stat, fingerprint in ``scheme``) of ``path``; see ``fingerprint``. The stat is taken
    before hashing, so a caller that records both and later sees the same stat may trust the
    fingerprint. remember=False: leave the process cache as it is (a job that sees each file
    once and keeps its own record, like ``embedkit tag`` with its database)."""
    st = FileStat.of(path)
    if known is not None:
        hit = known.get(st)
        if hit is not None and scheme_of(hit) == scheme:
            return st, hit
    key = (st, scheme)
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
    if hit is not None:
        return st, hit
    digest = hash_file(st.path, scheme)
    # The file may have changed while it was read: only cache when the stat still matches.
    if remember and FileStat.of(path) == st:
        with _lock:
            _cache[key] = digest
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
    return st, digest


def fingerprint(path: str | os.PathLike, known: dict[FileStat, str] | None = None, scheme: str = SCHEME) -> str:
    """Content fingerprint of ``path`` in ``scheme``.

    known: fingerprints recorded earlier (e.g. by a store), keyed by FileStat; used when the
    file's stat is unchanged and the recorded fingerprint is of ``scheme``, so re-runs over
    unchanged files read no bytes. A file whose stat changed is re-hashed. Thread-safe; results
    are also cached for the process.
    """
    return identify(path, known, scheme=scheme)[1]


def identify_many(
    paths: Sequence[str | os.PathLike],
    known: dict[FileStat, str] | None = None,
    workers: int | None = None,
    scheme: str = SCHEME,
) -> list[tuple[FileStat, str] | AudioError]:
    """``identify`` of every path, hashed in parallel threads (both hashes release the GIL); in
    ``paths`` order, an AudioError (missing, unreadable file) in place of a result."""

    def one(p):
        try:
            return identify(p, known, scheme=scheme)
        except AudioError as exc:
            return exc

    if len(paths) < 2:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(
        max(1, min(workers or os.cpu_count() or 1, len(paths))), thread_name_prefix="embedkit-hash"
    ) as pool:
        return list(pool.map(one, paths))


def has_scheme(tracks, scheme: str) -> bool:
    """True when the ``fingerprint`` column of a track table is all of ``scheme`` (None values
    aside); False when it has other fingerprints or no such column."""
    return "fingerprint" in tracks and all(scheme_of(f) == scheme for f in tracks["fingerprint"].dropna())


def with_fingerprints(tracks, known: dict[FileStat, str] | None = None, scheme: str | None = SCHEME):
    """A track table (DataFrame with a ``path`` column) with a ``fingerprint`` column in
    ``scheme`` (None for a file that cannot be read); returned unchanged when it already has
    one in that scheme (scheme=None: in any scheme), recomputed when it has one in another."""
    if "fingerprint" in tracks and (scheme is None or has_scheme(tracks, scheme)):
        return tracks
    res = identify_many(list(tracks["path"]), known, scheme=scheme or SCHEME)
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
