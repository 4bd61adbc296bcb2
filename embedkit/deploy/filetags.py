"""Writing genres into the user's audio files, safely (mutagen).

    change = write_genres("song.mp3", ["Rock", "Pop"], scores=[0.91, 0.42], model="ab12...")
    change.status      # "written" | "would-write" | "unchanged" | "kept" | "uncertain" | "not-writable" | "failed"
    restore("song.mp3", change.before)  # undo

Formats: MP3 (ID3v2.4 TCON with one value per genre; ID3v2.3 joins them with ``separator`` on
request), FLAC / OGG Vorbis / Opus (one GENRE field per value), M4A/MP4 (©gen), WAV / AIFF (an
ID3 chunk). Anything else is "not-writable". Provenance goes in custom fields (ID3 TXXX, Vorbis
comments, MP4 freeform ``----:com.embedkit:...``): EMBEDKIT_GENRE (what embedkit wrote),
EMBEDKIT_GENRE_SCORE, EMBEDKIT_MODEL, EMBEDKIT_DATE, EMBEDKIT_VERSION.

Safety rules (each tested per format in tests/test_tagwrite.py):
- ``dry_run`` reads only and reports the change.
- A genre is "embedkit's" when the file's genre equals the EMBEDKIT_GENRE it carries; any other
  genre was set by a person and is kept unless ``overwrite``.
- No genres (an "uncertain" decision) -> nothing written.
- The audio stream is never rewritten: only tag blocks change (mutagen), and every write goes to
  a copy in the same folder that must re-open with the expected tags, the same stream info and
  the same first decoded samples before it atomically replaces the original (os.replace, after
  fsync), with the original's permission bits (and owner, where allowed). A crash or kill -9 at
  any point leaves the original untouched or fully tagged; at worst a hidden temporary
  ``.<name>.embedkit-<pid>.tmp`` stays behind (``clean_temporaries`` removes them).
- Read-only files (no write permission bit, or not writable by this user), files with several
  hard links (a replaced copy would separate them), files that vanished or changed while being
  tagged are "failed" with a reason; ``write_many`` goes on with the rest.
- ``before`` records the genre and provenance fields as they were, for ``restore``.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..errors import EmbedkitError, TagWriteError, require

PROVENANCE = ("EMBEDKIT_GENRE", "EMBEDKIT_GENRE_SCORE", "EMBEDKIT_MODEL", "EMBEDKIT_DATE", "EMBEDKIT_VERSION")
WRITABLE = {
    ".mp3": "mp3",
    ".flac": "flac",
    ".ogg": "ogg",
    ".oga": "ogg",
    ".opus": "opus",
    ".m4a": "mp4",
    ".mp4": "mp4",
    ".m4b": "mp4",
    ".wav": "wav",
    ".aif": "aiff",
    ".aiff": "aiff",
}
MP4_FREEFORM = "----:com.embedkit:"
MP4_GENRE = "\xa9gen"
_VERIFY_FRAMES = 4096
#: test hook: called with the temporary path just before it replaces the original
_before_replace: Callable[[Path], None] | None = None


@dataclass
class TagState:
    """Genre and embedkit provenance of a file as read: genre None = no genre field."""

    genre: list[str] | None
    provenance: dict[str, list[str]] = field(default_factory=dict)

    @property
    def written_by_embedkit(self) -> bool:
        return self.genre is not None and self.provenance.get("EMBEDKIT_GENRE") == self.genre

    def to_dict(self) -> dict[str, Any]:
        return {"genre": self.genre, "provenance": dict(self.provenance)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | "TagState") -> "TagState":
        if isinstance(d, TagState):
            return d
        return cls(
            None if d.get("genre") is None else [str(x) for x in d["genre"]],
            {str(k): [str(x) for x in v] for k, v in (d.get("provenance") or {}).items()},
        )


@dataclass
class TagChange:
    """What happened to one file. before: the TagState before (None when unreadable)."""

    path: str
    status: str
    reason: str = ""
    format: str = ""
    genres: list[str] = field(default_factory=list)
    before: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Format adapters: read / set the genre and provenance fields of an open mutagen file


def _open(path: Path, fmt: str):
    require("mutagen", "pip install 'embedkit[tags]'", "writing tags")
    import mutagen

    try:
        if fmt == "mp3":
            from mutagen.mp3 import MP3 as cls
        elif fmt == "flac":
            from mutagen.flac import FLAC as cls
        elif fmt == "ogg":
            from mutagen.oggvorbis import OggVorbis as cls
        elif fmt == "opus":
            from mutagen.oggopus import OggOpus as cls
        elif fmt == "mp4":
            from mutagen.mp4 import MP4 as cls
        elif fmt == "wav":
            from mutagen.wave import WAVE as cls
        else:
            from mutagen.aiff import AIFF as cls
        return cls(str(path))
    except FileNotFoundError:
        raise TagWriteError(path, "file not found (it vanished)") from None
    except PermissionError:
        raise TagWriteError(path, "permission denied reading the file") from None
    except mutagen.MutagenError as exc:
        raise TagWriteError(path, f"not a readable {fmt.upper()} file ({exc})") from None


def _kind(fmt: str) -> str:
    return {"mp3": "id3", "wav": "id3", "aiff": "id3", "mp4": "mp4"}.get(fmt, "vorbis")


def _read(f, fmt: str) -> TagState:
    tags = f.tags
    if tags is None:
        return TagState(None)
    kind = _kind(fmt)
    if kind == "id3":
        frames = tags.getall("TCON")
        genre = [g for fr in frames for g in fr.genres] or None
        prov = {k: [str(t) for fr in tags.getall(f"TXXX:{k}") for t in fr.text] for k in PROVENANCE}
    elif kind == "mp4":
        genre = [str(g) for g in tags.get(MP4_GENRE, [])] or None
        prov = {k: [bytes(v).decode("utf-8", "replace") for v in tags.get(MP4_FREEFORM + k, [])] for k in PROVENANCE}
    else:
        genre = [str(g) for g in tags.get("GENRE", [])] or None
        prov = {k: [str(v) for v in tags.get(k, [])] for k in PROVENANCE}
    return TagState(genre, {k: v for k, v in prov.items() if v})


def _set(f, fmt: str, state: TagState) -> None:
    """Make the file's genre and provenance fields exactly ``state`` (None / missing: removed)."""
    if f.tags is None:
        f.add_tags()
    tags, kind = f.tags, _kind(fmt)
    if kind == "id3":
        from mutagen.id3 import TCON, TXXX

        tags.delall("TCON")
        if state.genre is not None:
            tags.add(TCON(encoding=3, text=list(state.genre)))
        for k in PROVENANCE:
            tags.delall(f"TXXX:{k}")
            if state.provenance.get(k):
                tags.add(TXXX(encoding=3, desc=k, text=list(state.provenance[k])))
    elif kind == "mp4":
        from mutagen.mp4 import MP4FreeForm

        tags.pop(MP4_GENRE, None)
        if state.genre is not None:
            tags[MP4_GENRE] = list(state.genre)
        for k in PROVENANCE:
            tags.pop(MP4_FREEFORM + k, None)
            if state.provenance.get(k):
                tags[MP4_FREEFORM + k] = [MP4FreeForm(v.encode("utf-8")) for v in state.provenance[k]]
    else:
        for k in ("GENRE", *PROVENANCE):
            if k in tags:
                del tags[k]
        if state.genre is not None:
            tags["GENRE"] = list(state.genre)
        for k in PROVENANCE:
            if state.provenance.get(k):
                tags[k] = list(state.provenance[k])


def _save(f, fmt: str, id3_version: int, separator: str) -> None:
    if _kind(fmt) == "id3":
        f.save(v2_version=id3_version, v23_sep=separator)
    else:
        f.save()


def _as_read(state: TagState, fmt: str, id3_version: int, separator: str) -> TagState:
    """``state`` as it reads back once saved (ID3v2.3 joins multiple values with the separator)."""
    if _kind(fmt) != "id3" or id3_version != 3:
        return state
    join = lambda v: None if v is None else [separator.join(v)]  # noqa: E731
    return TagState(join(state.genre), {k: join(v) for k, v in state.provenance.items()})


# ---------------------------------------------------------------------------------------------
# The one safe write path


def format_of(path: str | os.PathLike) -> str | None:
    """The writable format of ``path`` by its extension, or None."""
    return WRITABLE.get(Path(path).suffix.lower())


def _stream_info(f) -> tuple:
    i = f.info
    return (
        round(float(getattr(i, "length", 0.0) or 0.0), 6),
        getattr(i, "sample_rate", None),
        getattr(i, "channels", None),
    )


def _first_samples(path: Path):
    """The first decoded frames (None where libsndfile cannot decode the format, e.g. M4A)."""
    import soundfile as sf

    try:
        with sf.SoundFile(str(path)) as fh:
            return fh.read(_VERIFY_FRAMES, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError):
        return None


def _writable(path: Path, st: os.stat_result) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if not st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) or not os.access(path, os.W_OK):
        return "read-only file (no write permission)"
    if st.st_nlink > 1:  # replacing the file would leave the other names on the old bytes
        return f"file has {st.st_nlink} hard links; a tagged copy would separate them (not written)"
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return f"folder {path.parent} is not writable (the tagged copy is written beside the file)"
    return None


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.embedkit-{os.getpid()}.tmp")


def _copy_owner_and_mode(tmp: Path, st0: os.stat_result) -> None:
    try:
        if os.geteuid() == 0 and (st0.st_uid, st0.st_gid) != (os.getuid(), os.getgid()):
            os.chown(tmp, st0.st_uid, st0.st_gid)
    except (AttributeError, OSError):  # no geteuid (Windows) / not allowed: the copy stays ours
        pass
    os.chmod(tmp, stat.S_IMODE(st0.st_mode))


def _replace_with_tagged_copy(
    path: Path, fmt: str, orig, new: TagState, st0: os.stat_result, id3_version: int, separator: str
) -> None:
    """Copy -> tag the copy -> verify against ``orig`` (the original, opened) -> owner and mode
    -> fsync -> atomic replace. Raises TagWriteError."""
    import numpy as np

    tmp = _tmp_path(path)
    try:
        try:
            shutil.copyfile(path, tmp)
        except FileNotFoundError:
            raise TagWriteError(path, "file not found (it vanished)") from None
        f = _open(tmp, fmt)
        _set(f, fmt, new)
        _save(f, fmt, id3_version, separator)
        # verify the copy before it replaces anything
        back = _open(tmp, fmt)
        if _read(back, fmt) != _as_read(new, fmt, id3_version, separator):
            raise TagWriteError(path, "the tagged copy did not read back with the new tags; file left unchanged")
        if _stream_info(back) != _stream_info(orig):
            raise TagWriteError(path, "the tagged copy's audio stream info differs; file left unchanged")
        a, b = _first_samples(path), _first_samples(tmp)
        if (a is None) != (b is None) or (a is not None and not np.array_equal(a, b)):
            raise TagWriteError(path, "the tagged copy does not decode to the same audio; file left unchanged")
        _copy_owner_and_mode(tmp, st0)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        try:
            st1 = path.stat()
        except FileNotFoundError:
            raise TagWriteError(path, "file vanished while being tagged") from None
        if (st1.st_size, st1.st_mtime_ns, st1.st_ino) != (st0.st_size, st0.st_mtime_ns, st0.st_ino):
            raise TagWriteError(path, "file changed while being tagged; left as it is now")
        if _before_replace is not None:
            _before_replace(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise TagWriteError(path, f"cannot write ({exc.strerror or type(exc).__name__})") from None
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _prepare(path: str | os.PathLike) -> tuple[Path, str | None, os.stat_result | None, str]:
    p = Path(path)
    fmt = format_of(p)
    try:
        st0 = p.stat()
    except FileNotFoundError:
        return p, fmt, None, "file not found (it vanished)"
    except OSError as exc:
        return p, fmt, None, f"cannot read file ({exc.strerror or type(exc).__name__})"
    if p.is_symlink():  # tag the file the link points to; the link stays a link
        p = p.resolve()
    return p, fmt, st0, ""


def _apply(
    path: str | os.PathLike,
    decide: Callable[[TagState, Callable], tuple[str, str, TagState | None]],
    dry_run: bool,
    id3_version: int,
    separator: str,
    genres: list[str],
) -> TagChange:
    """Shared by write and restore: read, let ``decide(state, as_read)`` choose (status, reason,
    new state or None for no write; ``as_read`` maps a state to how it reads back once saved),
    then write safely unless ``dry_run``."""
    if id3_version not in (3, 4):
        raise EmbedkitError(f"ID3 version must be 3 or 4, got {id3_version}")
    p, fmt, st0, problem = _prepare(path)
    out = TagChange(str(path), "failed", problem, fmt or "", list(genres))
    if problem:
        return out
    if fmt is None:
        out.status, out.reason = (
            "not-writable",
            f"{p.suffix or 'no extension'}: embedkit writes genres into MP3, FLAC, OGG, Opus, M4A, WAV and AIFF only",
        )
        return out
    try:
        orig = _open(p, fmt)
        state = _read(orig, fmt)
    except TagWriteError as exc:
        out.reason = exc.problem
        return out
    out.before = state.to_dict()
    status, reason, new = decide(state, lambda st: _as_read(st, fmt, id3_version, separator))
    out.status, out.reason = status, reason
    if new is None:
        return out
    if dry_run:
        out.status = "would-write"
        return out
    bad = _writable(p, st0)
    if bad:
        out.status, out.reason = "failed", bad
        return out
    try:
        _replace_with_tagged_copy(p, fmt, orig, new, st0, id3_version, separator)
    except TagWriteError as exc:
        out.status, out.reason = "failed", exc.problem
    return out


def write_genres(
    path: str | os.PathLike,
    genres: Sequence[str],
    *,
    scores: Sequence[float] | None = None,
    model: str = "",
    date: str | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    id3_version: int = 4,
    separator: str = "; ",
) -> TagChange:
    """Write ``genres`` (empty: an uncertain decision, nothing written) into ``path``.

    scores: the calibrated probability of each genre (EMBEDKIT_GENRE_SCORE); model: the model id
    (EMBEDKIT_MODEL); date: ISO date of the tagging (default: now, UTC). overwrite: replace a
    genre a person set. id3_version 3 joins several genres with ``separator`` (ID3v2.3 has no
    multi-value frames); 4 (default) stores one value each. Never raises for a bad file: the
    returned TagChange says what happened ("failed" with the reason)."""
    from .. import __version__

    genres = [str(g) for g in genres]
    if scores is not None and len(scores) != len(genres):
        raise EmbedkitError(f"{len(scores)} scores for {len(genres)} genres")
    prov = {
        "EMBEDKIT_GENRE": genres,
        "EMBEDKIT_GENRE_SCORE": [f"{float(s):.4f}" for s in scores] if scores is not None else [],
        "EMBEDKIT_MODEL": [model] if model else [],
        "EMBEDKIT_DATE": [date or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")],
        "EMBEDKIT_VERSION": [__version__],
    }
    new = TagState(genres, {k: v for k, v in prov.items() if v})

    def decide(state: TagState, as_read):
        if not genres:
            return "uncertain", "uncertain: no genre written", None
        if state.genre is not None and not state.written_by_embedkit and not overwrite:
            return (
                "kept",
                f"genre {'; '.join(state.genre)!r} was set by a person (not by embedkit); pass overwrite to replace it",
                None,
            )
        if (
            state.genre == as_read(new).genre
            and state.written_by_embedkit
            and state.provenance.get("EMBEDKIT_MODEL") == as_read(new).provenance.get("EMBEDKIT_MODEL")
        ):
            return "unchanged", "already tagged with these genres by this model", None
        was = "no genre" if state.genre is None else repr("; ".join(state.genre))
        return "written", f"{was} -> {'; '.join(genres)!r}", new

    return _apply(path, decide, dry_run, id3_version, separator, genres)


def restore(
    path: str | os.PathLike,
    previous: dict[str, Any] | TagState,
    *,
    dry_run: bool = False,
    force: bool = False,
    id3_version: int = 4,
    separator: str = "; ",
) -> TagChange:
    """Undo: put back the genre and provenance fields recorded in ``previous`` (a TagChange's
    ``before``). Refuses ("kept") when the file's genre is no longer the one embedkit wrote (a
    person changed it since) unless ``force``."""
    prev = TagState.from_dict(previous)

    def decide(state: TagState, as_read):
        if state == prev:
            return "unchanged", "already as before", None
        if not state.written_by_embedkit and not force:
            now = "no genre" if state.genre is None else repr("; ".join(state.genre))
            return "kept", f"genre is now {now}, not what embedkit wrote; pass force to restore anyway", None
        was = "no genre" if prev.genre is None else repr("; ".join(prev.genre))
        return "written", f"restored {was}", prev

    return _apply(path, decide, dry_run, id3_version, separator, prev.genre or [])


def read_tags(path: str | os.PathLike) -> TagState:
    """The genre and embedkit provenance of a file (TagWriteError when unreadable or not a
    writable format)."""
    p = Path(path)
    fmt = format_of(p)
    if fmt is None:
        raise TagWriteError(p, "not a format embedkit writes tags into")
    return _read(_open(p, fmt), fmt)


def write_many(
    items: Iterable[tuple[str | os.PathLike, Sequence[str], Sequence[float] | None]], **kwargs
) -> list[TagChange]:
    """``write_genres`` over (path, genres, scores) items; a failure is recorded and the rest go on."""
    return [write_genres(p, g, scores=s, **kwargs) for p, g, s in items]


def clean_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove temporaries a killed tag writer left in ``folder`` (``.*.embedkit-<pid>.tmp`` of
    processes no longer running). Returns the removed paths."""
    removed = []
    for tmp in Path(folder).glob(".*.embedkit-*.tmp"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1].split(".")[0])
        except ValueError:
            continue
        if _alive(pid):  # a writer still at work (this process included)
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
