"""Writing genres into the user's audio files, safely (mutagen).

    change = write_genres("song.mp3", ["Rock", "Pop"], scores=[0.91, 0.42], model="ab12...")
    change.status      # "written" | "would-write" | "unchanged" | "kept" | "uncertain" | "not-writable" | "failed"
    restore("song.mp3", change.before)  # undo

Formats, the genre field and how several genres are stored:

- MP3 / WAV / AIFF: ID3v2 ``TCON``, written in the version the file already uses (a file without
  an ID3v2 tag gets ``id3_version``): v2.4 one value per genre, v2.3 the genres joined with
  ``separator``. Existing frames keep their bytes, order and text encoding; the new frames use
  the encoding of the genre frame they replace (else the one most of the tag's text frames use)
  when it can hold the text. An MP3 carrying an APEv2 tag gets the genre in it too (an MP3 with
  APEv2 and no ID3v2 only there); an ID3v1 tag gets its genre byte set (255, "none", for a genre
  ID3v1 cannot name), so no tag in the file contradicts another.
- FLAC, Ogg Vorbis, Ogg Opus: Vorbis comments, one ``GENRE`` field per genre, in the place of the
  first genre field (same key spelling); every other field keeps its place.
- M4A / MP4 (AAC, ALAC): ``©gen``, one value per genre; the items keep the file's order.
- WMA / ASF: ``WM/Genre``, one attribute per genre, in the place of the first one.
- WavPack (.wv), Monkey's Audio (.ape), Musepack (.mpc): APEv2 ``Genre`` (values separated by
  NUL, the APEv2 multi-value form); other items keep their bytes and order, an ID3v1 tag behind
  it is kept (and its genre byte set, as for MP3).

ID3v2 and APEv2 are edited at the byte level (``_id3_render``, ``_ape_render``); the other
formats, and tags those editors leave alone (ID3v2.2, unsynchronisation, extended headers...),
through mutagen with a padding function that keeps the tag block's size.

Anything else is "not-writable". Provenance goes in custom fields (ID3 TXXX, Vorbis comments,
ASF and APEv2 items, MP4 freeform ``----:com.embedkit:...``): EMBEDKIT_GENRE (what embedkit
wrote), EMBEDKIT_GENRE_SCORE, EMBEDKIT_MODEL, EMBEDKIT_DATE, EMBEDKIT_VERSION.

Undo is exact: ``before`` (the state ``restore`` puts back) carries, beside the genre and
provenance values, a ``layout`` record of the file's tag block as it was (the file's size, the
Ogg comment packet's length, the original ID3 genre frames and APEv2 genre items as bytes, the
ID3v1 genre byte; JSON-safe, absent for a file without tags), so a write followed by
``restore`` gives back the original file byte for byte (tested per format in
tests/test_filetags_formats.py; the README's table of formats lists the exceptions, where every
tag value, version, encoding and order comes back). A ``before`` without ``layout`` (older
records) or one that no longer fits the file (its tags rewritten by another program since) is
restored value by value. Every tagged copy must also keep every other tag and picture
(``_others``) before it replaces the original.

Safety rules (each tested per format in tests/test_tagwrite.py):
- ``dry_run`` reads only and reports the change.
- A genre is "embedkit's" when the file's genre equals the EMBEDKIT_GENRE it carries; any other
  genre was set by a person and is kept unless ``overwrite``.
- No genres (an "uncertain" decision) -> nothing written.
- The audio stream is never rewritten: only tag blocks change, and every write goes to a copy in
  the same folder that must re-open with the expected tags, the same stream info and the same
  first decoded samples before it atomically replaces the original (os.replace, after fsync).
  The copy is created with the original's owner (where allowed) and permission bits before a
  byte is written into it: it is never readable by more people than the original. A crash or
  kill -9 at any point leaves the original untouched or fully tagged; at worst a hidden
  temporary ``.<name>.embedkit-<pid>.tmp`` stays behind (``clean_temporaries`` removes them).
- Read-only files (no write permission bit, or not writable by this user), files with several
  hard links (a replaced copy would separate them), files whose owner or group the copy could
  not keep, files that vanished or changed while being tagged are "failed" with a reason;
  ``write_many`` goes on with the rest.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import os
import re
import shutil
import stat
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..errors import EmbedkitError, TagWriteError
from ..processes import alive, started_at
from ..tags import (
    APE_GENRE,
    ASF_GENRE,
    MP4_FREEFORM,
    MP4_GENRE,
    PROVENANCE,
    containers,
    format_of,
    genre_values,
    has_id3v2,
    kind_of,
    open_tags,
    pairs,
    provenance_values,
)

_VERIFY_FRAMES = 4096
_NEW_ID3_PADDING = 1024
#: test hook: called with the temporary path just before it replaces the original
_before_replace: Callable[[Path], None] | None = None
#: test hook: called with the temporary path right after it is created, before any data is in it
_after_temp_created: Callable[[Path], None] | None = None


@dataclass
class TagState:
    """Genre and embedkit provenance of a file as read: genre None = no genre field.

    layout: how the file's tag block was laid out (JSON-safe, for a byte-exact ``restore``;
    ignored when comparing states)."""

    genre: list[str] | None
    provenance: dict[str, list[str]] = field(default_factory=dict)
    layout: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def written_by_embedkit(self) -> bool:
        return self.genre is not None and self.provenance.get("EMBEDKIT_GENRE") == self.genre

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"genre": self.genre, "provenance": dict(self.provenance)}
        if self.layout is not None:
            d["layout"] = self.layout
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | "TagState") -> "TagState":
        if isinstance(d, TagState):
            return d
        return cls(
            None if d.get("genre") is None else [str(x) for x in d["genre"]],
            {str(k): [str(x) for x in v] for k, v in (d.get("provenance") or {}).items()},
            d.get("layout") if isinstance(d.get("layout"), dict) else None,
        )


@dataclass
class TagChange:
    """What happened to one file. before: the TagState before, as a dict (None when unreadable)."""

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
# Opening files


# The reading rule (formats, opening, which tag block holds the genre) is embedkit.tags'.
_open, _kind, _has_id3v2, _containers = open_tags, kind_of, has_id3v2, containers


# ---------------------------------------------------------------------------------------------
# Genre and provenance: read / set (value level, on open mutagen objects)


_pairs = pairs


def _read_kind(kind: str, tags) -> TagState:
    if tags is None:
        return TagState(None)
    genre = genre_values(kind, tags)
    prov = {k: provenance_values(kind, tags, k) for k in PROVENANCE}
    return TagState(genre, {k: v for k, v in prov.items() if v})


def _read(f, fmt: str) -> TagState:
    kind, tags = _containers(f, fmt)[0]
    return _read_kind(kind, tags)


def _edit_pairs(pairs: list, state: TagState, genre_key: str, name_of: Callable[[str], str], value) -> list:
    """Genre and provenance entries of a list of (key, value) replaced by ``state``: the genre
    values go where the first genre entry was (with its key spelling), provenance at the end;
    every other entry keeps its place."""
    kept, at = [], None
    for k, v in pairs:
        name = name_of(k)
        if name == name_of(genre_key):
            if at is None:
                at, genre_key = len(kept), k
            continue
        if name in PROVENANCE:
            continue
        kept.append((k, v))
    if state.genre is not None:
        at = len(kept) if at is None else at
        kept[at:at] = [(genre_key, value(g)) for g in state.genre]
    kept += [(k, value(v)) for k in PROVENANCE for v in state.provenance.get(k, [])]
    return kept


def _set_kind(kind: str, tags, state: TagState) -> None:
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

        if state.genre is not None:
            tags[MP4_GENRE] = list(state.genre)  # an existing ©gen keeps its place
        else:
            tags.pop(MP4_GENRE, None)
        for k in PROVENANCE:
            tags.pop(MP4_FREEFORM + k, None)
            if state.provenance.get(k):
                tags[MP4_FREEFORM + k] = [MP4FreeForm(v.encode("utf-8")) for v in state.provenance[k]]
    elif kind == "asf":
        from mutagen.asf import ASFUnicodeAttribute

        list.__setitem__(
            tags, slice(None), _edit_pairs(_pairs(tags), state, ASF_GENRE, lambda k: k, ASFUnicodeAttribute)
        )
    elif kind == "ape":
        keys = {k.lower(): k for k in tags.keys()}
        for k in (APE_GENRE, *PROVENANCE):
            if k.lower() in keys:
                del tags[keys[k.lower()]]
        if state.genre is not None:
            tags[keys.get(APE_GENRE.lower(), APE_GENRE)] = list(state.genre)
        for k in PROVENANCE:
            if state.provenance.get(k):
                tags[keys.get(k.lower(), k)] = list(state.provenance[k])
    else:
        list.__setitem__(tags, slice(None), _edit_pairs(_pairs(tags), state, "GENRE", str.upper, str))


def _set(f, fmt: str, state: TagState) -> None:
    """Make the file's genre and provenance fields exactly ``state`` (None / missing: removed)."""
    for kind, tags in _containers(f, fmt):
        if tags is None:
            f.add_tags()
            tags = f.tags
        _set_kind(kind, tags, state)


def _save(f, fmt: str, id3_version: int, separator: str, padding: Callable | None = None) -> None:
    """Save a file ``_set`` changed (``padding``: a mutagen padding function)."""
    containers = _containers(f, fmt)
    for kind, tags in containers:
        if kind == "ape" and fmt == "mp3":
            _save_ape(tags, f.filename)
    if fmt == "mp3" and containers[0][0] == "ape":
        return
    if _kind(fmt) == "id3":
        kw = {"v1": 1} if fmt == "mp3" else {}
        f.save(v2_version=id3_version, v23_sep=separator, padding=padding, **kw)
    elif _kind(fmt) == "ape":
        _save_ape(f.tags, f.filename)
    elif fmt == "mp4":
        _save_mp4_in_order(f, padding)
    else:
        f.save(padding=padding)


def _save_mp4_in_order(f, padding) -> None:
    """Save an MP4 keeping its items in the file's order (mutagen sorts them by its own idea of
    relevance, which would move a person's items around)."""
    import mutagen.mp4 as m

    order = {k: i for i, k in enumerate(f.tags.keys())}
    sort_key = getattr(m, "_item_sort_key", None)
    if sort_key is None:  # another mutagen: its own order
        return f.save(padding=padding)
    m._item_sort_key = lambda key, value: order.get(key, len(order))
    try:
        f.save(padding=padding)
    finally:
        m._item_sort_key = sort_key


def _save_ape(tags, filename: str) -> None:
    """APEv2 save that keeps an ID3v1 tag after it (mutagen's save drops it)."""
    with open(filename, "rb") as fh:
        fh.seek(0, 2)
        v1 = b""
        if fh.tell() >= 128:
            fh.seek(-128, 2)
            v1 = fh.read(128)
    v1 = v1 if v1[:3] == b"TAG" else b""
    tags.save(filename)
    if v1:
        with open(filename, "rb+") as fh:
            fh.seek(-128, 2)
            if fh.read(128) != v1:
                fh.seek(0, 2)
                fh.write(v1)


def _fingerprint(v) -> str:
    """A tag value as comparable text; large binary data (pictures) by its hash, not its repr."""
    if isinstance(v, list):
        return "[" + ", ".join(_fingerprint(x) for x in v) + "]"
    blob = v if isinstance(v, (bytes, bytearray)) else getattr(v, "data", getattr(v, "value", None))
    if isinstance(blob, (bytes, bytearray)) and len(blob) > 4096:
        rest = {k: x for k, x in getattr(v, "__dict__", {}).items() if not isinstance(x, (bytes, bytearray))}
        return f"{type(v).__name__}<{len(blob)} bytes sha256 {hashlib.sha256(blob).hexdigest()}> {rest!r}"
    return repr(v)


def _others(f, fmt: str) -> list:
    """Every tag of an open file but the genre and embedkit's fields, as comparable text, and its
    pictures: a tagged copy must keep them all."""
    ours = {"GENRE", *PROVENANCE}
    out: list = []
    for kind, tags in _containers(f, fmt):
        if tags is None:
            continue
        if kind == "id3":
            items = [(k, v) for k, v in tags.items() if k != "TCON" and k[5:] not in PROVENANCE]
        elif kind == "mp4":
            items = [(k, v) for k, v in tags.items() if k != MP4_GENRE and k[len(MP4_FREEFORM) :] not in PROVENANCE]
        elif kind == "ape":
            items = [(k, v) for k, v in tags.items() if k.upper() not in ours]
        elif kind == "asf":
            items = [(k, v) for k, v in _pairs(tags) if k != ASF_GENRE and k not in PROVENANCE]
        else:
            items = [(k, v) for k, v in _pairs(tags) if k.upper() not in ours]
        out += sorted((kind, str(k), _fingerprint(v)) for k, v in items)
    out += [("picture", p.type, p.mime, p.desc, p.data) for p in getattr(f, "pictures", None) or []]
    return out


def _as_read(state: TagState, fmt: str, id3_version: int, separator: str) -> TagState:
    """``state`` as it reads back once saved (ID3v2.3 joins multiple values with the separator)."""
    if _kind(fmt) != "id3" or id3_version != 3:
        return state
    join = lambda v: None if v is None else [separator.join(v)]  # noqa: E731
    return TagState(join(state.genre), {k: join(v) for k, v in state.provenance.items()})


# ---------------------------------------------------------------------------------------------
# ID3v2 at the byte level: frames other than the genre and embedkit's are kept as they are


class _Unsupported(Exception):
    """A tag layout the byte-level editor leaves to mutagen (value-level write)."""


@dataclass
class _Id3:
    major: int
    rev: int
    flags: int
    frames: list[bytes]
    size: int  # whole tag: header + frames + padding


def _syncsafe(b: bytes) -> int:
    return (b[0] << 21) | (b[1] << 14) | (b[2] << 7) | b[3]


def _to_syncsafe(n: int) -> bytes:
    return bytes([(n >> 21) & 0x7F, (n >> 14) & 0x7F, (n >> 7) & 0x7F, n & 0x7F])


def _id3_parse(data: bytes) -> _Id3 | None:
    """The ID3v2 tag at the start of ``data`` (None: no tag). Raises _Unsupported for what the
    byte-level editor does not handle (v2.2, unsynchronisation, extended header, footer, bad
    frames)."""
    if len(data) < 10 or data[:3] != b"ID3":
        return None
    major, rev, flags = data[3], data[4], data[5]
    if major not in (3, 4) or flags & 0xF0:  # unsync, extended header, experimental, footer
        raise _Unsupported(f"ID3v2.{major} flags {flags:#x}")
    size = _syncsafe(data[6:10])
    body = data[10 : 10 + size]
    if len(body) != size:
        raise _Unsupported("truncated ID3v2 tag")
    frames, pos = [], 0
    while pos + 10 <= size and body[pos] != 0:
        fid = body[pos : pos + 4]
        if not re.fullmatch(rb"[A-Z0-9]{4}", fid):
            raise _Unsupported(f"frame id {fid!r}")
        n = _syncsafe(body[pos + 4 : pos + 8]) if major == 4 else struct.unpack(">I", body[pos + 4 : pos + 8])[0]
        if pos + 10 + n > size:
            raise _Unsupported("frame past the end of the tag")
        frames.append(body[pos : pos + 10 + n])
        pos += 10 + n
    if body[pos:].strip(b"\0"):
        raise _Unsupported("data after the padding")
    return _Id3(major, rev, flags, frames, 10 + size)


def _id3_role(frame: bytes, major: int) -> str | None:
    """ "genre" for TCON, the provenance key for embedkit's TXXX frames, else None."""
    fid = frame[:4]
    if fid not in (b"TCON", b"TXXX"):
        return None
    fl = struct.unpack(">H", frame[8:10])[0]
    if fl & (0x004F if major == 4 else 0x00E0):  # grouped / compressed / encrypted / unsync / data length
        raise _Unsupported("a genre or TXXX frame with format flags")
    if fid == b"TCON":
        return "genre"
    d = frame[10:]
    if not d:
        return None
    enc, rest = d[0], d[1:]
    if enc in (1, 2):
        end = next((i for i in range(0, len(rest) - 1, 2) if rest[i : i + 2] == b"\0\0"), len(rest))
        desc = rest[:end].decode("utf-16" if enc == 1 else "utf-16-be", "replace")
    else:
        desc = rest.split(b"\0", 1)[0].decode("latin-1" if enc == 0 else "utf-8", "replace")
    return desc if desc in PROVENANCE else None


def _id3_encoding(frames: list[bytes], major: int, texts: list[str]) -> int:
    """The text encoding for new frames: that of the genre frame replaced, else the one most
    text frames use, else UTF-8 (v2.4) / Latin-1 (v2.3); upgraded only when it cannot hold the
    text (Latin-1 -> UTF-16 in v2.3, UTF-8 in v2.4)."""
    used = [fr[10] for fr in frames if fr[:1] == b"T" and len(fr) > 10 and fr[10] <= 3]
    genre = [fr[10] for fr in frames if fr[:4] == b"TCON" and len(fr) > 10 and fr[10] <= 3]
    if genre:
        enc = genre[0]
    elif used:
        enc = max(set(used), key=used.count)
    else:
        enc = 3 if major == 4 else 0
    if major == 3 and enc > 1:
        enc = 1
    if enc == 0:
        try:
            "".join(texts).encode("latin-1")
        except UnicodeEncodeError:
            enc = 1 if major == 3 else 3
    return enc


def _id3_new_frames(state: TagState, major: int, separator: str, enc: int) -> tuple[bytes | None, list[bytes]]:
    """(the TCON frame or None, the TXXX provenance frames) for ``state``, as bytes."""
    from mutagen.id3 import TCON, TXXX
    from mutagen.id3._tags import save_frame
    from mutagen.id3._util import ID3SaveConfig

    cfg = ID3SaveConfig(major, separator)

    def render(fr) -> bytes:
        return save_frame(fr._get_v23_frame(sep=separator) if major == 3 else fr, config=cfg)

    tcon = render(TCON(encoding=enc, text=list(state.genre))) if state.genre else None
    prov = [  # (empty values render as nothing)
        render(TXXX(encoding=enc, desc=k, text=list(state.provenance[k])))
        for k in PROVENANCE
        if state.provenance.get(k)
    ]
    return tcon, prov


def _id3_render(
    tag: _Id3 | None,
    state: TagState,
    major: int,
    separator: str,
    *,
    target: int | None,
    original: list[tuple[int, bytes]] | None = None,
) -> bytes:
    """The whole ID3v2 tag with the genre and provenance frames of ``state`` (b"": no tag).

    target: the tag's size to keep (None: its present size; 0: no tag once nothing is left in
    it); original: (index, bytes) of the genre / provenance frames to put back as they were."""
    frames = tag.frames if tag is not None else []
    kept, at = [], None
    for fr in frames:
        role = _id3_role(fr, major)
        if role is None:
            kept.append(fr)
        elif role == "genre" and at is None:
            at = len(kept)
    if original is not None:
        for i, fr in sorted(original):
            kept.insert(min(i, len(kept)), fr)
    else:
        texts = list(state.genre or []) + [v for vs in state.provenance.values() for v in vs]
        tcon, prov = _id3_new_frames(state, major, separator, _id3_encoding(frames, major, texts))
        if tcon is not None:
            kept.insert(len(kept) if at is None else at, tcon)
        kept += prov
    if not kept and target == 0:
        return b""
    body = b"".join(kept)
    want = (tag.size if tag is not None else 0) if not target else target
    pad = want - 10 - len(body)
    if pad < 0:  # it does not fit: grow, with room for later edits
        pad = _NEW_ID3_PADDING
    head = (tag.major, tag.rev, tag.flags) if tag is not None else (major, 0, 0)
    return b"ID3" + bytes(head) + _to_syncsafe(len(body) + pad) + body + b"\0" * pad


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _id3_layout(tag: _Id3 | None, v1_genre: int | None) -> dict[str, Any] | None:
    """What a byte-exact undo needs of an ID3 file; None for a file without ID3 tags."""
    if tag is None and v1_genre is None:
        return None
    ours = []
    if tag is not None:
        ours = [[i, _b64(fr)] for i, fr in enumerate(tag.frames) if _id3_role(fr, tag.major) is not None]
    return {"id3_size": tag.size if tag is not None else 0, "id3_frames": ours, "id3v1_genre": v1_genre}


def _v1_genre_byte(genres: list[str] | None) -> int:
    from mutagen._constants import GENRES

    if genres:
        low = [g.lower() for g in GENRES]
        if genres[0].lower() in low:
            return low.index(genres[0].lower())
    return 255


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        head = fh.read(10)
        if head[:3] == b"ID3" and len(head) == 10:
            head += fh.read(_syncsafe(head[6:10]))
    return head


def _v1_of(path: Path) -> int | None:
    """The ID3v1 genre byte of an MP3 / APE-tagged file (None: no ID3v1 tag)."""
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        if fh.tell() < 128:
            return None
        fh.seek(-128, 2)
        t = fh.read(128)
    return t[127] if t[:3] == b"TAG" else None


def _set_v1(fh, genre_byte: int) -> None:
    fh.seek(-128, 2)
    if fh.read(3) == b"TAG":
        fh.seek(-1, 2)
        fh.write(bytes([genre_byte]))


def _iff(fileobj, fmt: str):
    if fmt == "wav":
        from mutagen.wave import _WaveFile

        return _WaveFile(fileobj), "id3"
    from mutagen.aiff import AIFFFile

    return AIFFFile(fileobj), "ID3"


def _iff_tag(path: Path, fmt: str) -> tuple[bytes, bool]:
    """(the ID3 chunk's data, whether there is one) of a WAV / AIFF file."""
    with open(path, "rb") as fh:
        iff, cid = _iff(fh, fmt)
        if cid not in iff:
            return b"", False
        ch = iff[cid]
        fh.seek(ch.data_offset)
        return fh.read(ch.data_size), True


# ---------------------------------------------------------------------------------------------
# APEv2 at the byte level: items other than the genre and embedkit's keep their bytes and order

_APE_HAS_HEADER, _APE_IS_HEADER = 0x80000000, 0x20000000


@dataclass
class _Ape:
    start: int  # offset of the tag (its header, or its first item without one)
    end: int  # offset just past its footer
    header: bytes  # b"" when the tag has none
    footer: bytes
    items: list[bytes]


def _ape_find(fh) -> tuple[_Ape | None, int]:
    """(the APEv2 tag at the end of the file, before an ID3v1 tag, or None; where a new tag
    would go). Raises _Unsupported for what the byte-level editor leaves to mutagen."""
    fh.seek(0, 2)
    end = fh.tell()
    if end >= 128:
        fh.seek(end - 128)
        if fh.read(3) == b"TAG":
            end -= 128
    if end < 32:
        return None, end
    fh.seek(end - 32)
    footer = fh.read(32)
    if footer[:8] != b"APETAGEX":
        fh.seek(0)
        if fh.read(8) == b"APETAGEX":
            raise _Unsupported("an APEv2 tag at the start of the file")
        return None, end
    version, size, count, flags = struct.unpack("<4I", footer[8:24])
    if version != 2000 or flags & _APE_IS_HEADER or size < 32 or size > end:
        raise _Unsupported(f"APE tag version {version}, flags {flags:#x}")
    first = end - size
    start = first - (32 if flags & _APE_HAS_HEADER else 0)
    if start < 0:
        raise _Unsupported("APE tag past the start of the file")
    fh.seek(start)
    header = fh.read(32) if flags & _APE_HAS_HEADER else b""
    if header and header[:8] != b"APETAGEX":
        raise _Unsupported("APE header missing")
    body = fh.read(size - 32)
    items, pos = [], 0
    for _ in range(count):
        if pos + 9 > len(body):
            raise _Unsupported("APE item past the end of the tag")
        n = struct.unpack("<I", body[pos : pos + 4])[0]
        k = body.find(b"\0", pos + 8)
        if k < 0 or k + 1 + n > len(body):
            raise _Unsupported("bad APE item")
        items.append(body[pos : k + 1 + n])
        pos = k + 1 + n
    if pos != len(body):
        raise _Unsupported("data after the APE items")
    return _Ape(start, end, header, footer, items), end


def _ape_key(item: bytes) -> bytes:
    return item[8 : item.index(b"\0", 8)]


def _ape_role(item: bytes) -> str | None:
    name = _ape_key(item).decode("ascii", "replace").upper()
    return "genre" if name == APE_GENRE.upper() else name if name in PROVENANCE else None


def _ape_item(key: bytes, values: list[str]) -> bytes:
    value = "\0".join(values).encode("utf-8")
    return struct.pack("<2I", len(value), 0) + key + b"\0" + value


def _ape_render(tag: _Ape | None, state: TagState, *, drop_empty: bool, original) -> bytes:
    """The whole APEv2 tag with the genre and provenance of ``state`` (b"": no tag)."""
    kept, at, key = [], None, APE_GENRE.encode("ascii")
    for it in tag.items if tag is not None else []:
        role = _ape_role(it)
        if role is None:
            kept.append(it)
        elif role == "genre" and at is None:
            at, key = len(kept), _ape_key(it)
    if original is not None:
        for i, it in sorted(original):
            kept.insert(min(i, len(kept)), it)
    else:
        if state.genre is not None:
            kept.insert(len(kept) if at is None else at, _ape_item(key, list(state.genre)))
        kept += [_ape_item(k.encode("ascii"), list(state.provenance[k])) for k in PROVENANCE if state.provenance.get(k)]
    if not kept and drop_empty:
        return b""
    body = b"".join(kept)
    if tag is not None:
        header, footer = tag.header, tag.footer
    else:  # as mutagen writes a new tag: header and footer
        footer = b"APETAGEX" + struct.pack("<4I", 2000, 0, 0, _APE_HAS_HEADER) + b"\0" * 8
        header = b"APETAGEX" + struct.pack("<4I", 2000, 0, 0, _APE_HAS_HEADER | _APE_IS_HEADER) + b"\0" * 8

    def counted(block: bytes) -> bytes:
        return block[:12] + struct.pack("<2I", len(body) + 32, len(kept)) + block[20:] if block else b""

    return counted(header) + body + counted(footer)


def _ape_edit(path: Path, state: TagState, restoring: bool, lay: dict[str, Any] | None) -> None:
    """Put ``state`` into the APEv2 tag of ``path`` (in place; the temporary copy)."""
    original = None
    if restoring and lay is not None and "ape_items" in lay:
        original = [(int(i), base64.b64decode(b)) for i, b in lay["ape_items"]]
    with open(path, "rb+") as fh:
        tag, where = _ape_find(fh)
        drop = restoring and (lay is None or lay.get("ape") is False)  # an undo: no tag when the file had none
        data = _ape_render(tag, state, drop_empty=drop, original=original)
        start, end = (tag.start, tag.end) if tag is not None else (where, where)
        fh.seek(end)
        tail = fh.read()
        fh.seek(start)
        fh.write(data + tail)
        fh.truncate()


def _ape_layout(path: Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        tag, _ = _ape_find(fh)
    if tag is None:
        return {"ape": False}
    return {"ape": True, "ape_items": [[i, _b64(it)] for i, it in enumerate(tag.items) if _ape_role(it)]}


# ---------------------------------------------------------------------------------------------
# Layout of the other formats: padding kept, sizes restored


def _ogg_comment_packet(path: Path) -> int | None:
    """Length of the Vorbis / Opus comment packet of an Ogg file (None: not found)."""
    from mutagen.ogg import OggPage

    with open(path, "rb") as fh:
        try:
            page = OggPage(fh)
            serial = page.serial
            while not page.packets or not page.packets[0].startswith((b"\x03vorbis", b"OpusTags")):
                page = OggPage(fh)
            pages = [page]
            while not (pages[-1].complete or len(pages[-1].packets) > 1):
                page = OggPage(fh)
                if page.serial == serial:
                    pages.append(page)
            return len(OggPage.to_packets(pages, strict=False)[0])
        except (EOFError, Exception):  # noqa: BLE001 - any parse problem: no layout, value-level undo
            return None


def _layout_of(path: Path, f, fmt: str) -> dict[str, Any] | None:
    """The layout record of a file as it is now (see TagState.layout); None: nothing to record
    (no tag) or not readable (the undo is then value by value)."""

    try:
        return _layout(path, f, fmt)
    except Exception:  # noqa: BLE001 - whatever the layout's reading hits, the undo is then value by value
        return None


def _layout(path: Path, f, fmt: str) -> dict[str, Any] | None:
    if _kind(fmt) == "id3":
        try:
            if fmt == "mp3":
                tag = _id3_parse(_read_head(path))
                v1 = _v1_of(path)
            else:
                data, _ = _iff_tag(path, fmt)
                tag, v1 = _id3_parse(data), None
        except _Unsupported:
            return {"size": path.stat().st_size}
        lay = _id3_layout(tag, v1)
        if fmt == "mp3" and _has_ape(path):
            lay = {**(lay or {}), **_ape_layout(path)}
        if lay is not None:
            lay["size"] = path.stat().st_size
        return lay
    lay: dict[str, Any] = {"size": path.stat().st_size}
    if _kind(fmt) == "ape":
        try:
            lay.update(_ape_layout(path))
        except _Unsupported:
            pass
        lay["id3v1_genre"] = _v1_of(path)
    if fmt in ("ogg", "opus"):
        n = _ogg_comment_packet(path)
        if n is not None:
            lay["packet"] = n
    return lay


def _padding_func(delta: int | None) -> Callable:
    """A mutagen padding function that keeps the tag block's size (the file's size does not
    change) or, with ``delta`` (bytes the block is to shrink by: a restore to the original size),
    gives that back; a block that must grow gets mutagen's default padding."""

    def pad(info) -> int:
        if delta is not None and info.padding - delta >= 0:
            return info.padding - delta
        return info.padding if info.padding >= 0 else info.get_default_padding()

    return pad


# ---------------------------------------------------------------------------------------------
# The one safe write path


def _stream_info(f) -> tuple:
    i = f.info
    from mutagen.mp3 import MPEGInfo

    # an MP3 without a Xing / VBRI header has its length estimated from the file's size, which a
    # tag at its end changes: leave it to the decoded-samples check
    estimated = isinstance(i, MPEGInfo) and not getattr(i, "encoder_info", "") and i.bitrate_mode == 0
    return (
        None if estimated else round(float(getattr(i, "length", 0.0) or 0.0), 6),
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


def _create_temp(path: Path, st0: os.stat_result):
    """Create the empty temporary copy, owner-only at first, then with the original's owner
    (where allowed) and permission bits, before a byte is written: it is never readable by
    anyone the original does not let read it. Returns (tmp path, open binary file)."""
    tmp = _tmp_path(path)
    tmp.unlink(missing_ok=True)  # left by a killed process that had this pid: dead, since we have it
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        mode = stat.S_IMODE(st0.st_mode) & 0o777
        uid, gid = st0.st_uid, st0.st_gid
        if hasattr(os, "fchown"):
            st = os.fstat(fd)
            if (st.st_uid, st.st_gid) != (uid, gid):
                try:
                    os.fchown(fd, uid if os.geteuid() == 0 else -1, gid)
                except OSError:
                    pass
                st = os.fstat(fd)
            if st.st_uid != uid:
                raise TagWriteError(
                    path, f"file belongs to user {uid}; a tagged copy would belong to you (not written)"
                )
            # another group would get the group's rights: refuse unless they grant nothing beyond "other"
            if st.st_gid != gid and (mode >> 3) & 0o7 & ~mode:
                raise TagWriteError(
                    path,
                    f"cannot give the tagged copy the file's group ({gid}); its group rights would go to another group (not written)",
                )
        os.fchmod(fd, mode | stat.S_IRUSR | stat.S_IWUSR) if hasattr(os, "fchmod") else os.chmod(tmp, mode)
        if _after_temp_created is not None:
            _after_temp_created(tmp)
        return tmp, os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


def _final_mode(tmp: Path, st0: os.stat_result) -> None:
    os.chmod(tmp, stat.S_IMODE(st0.st_mode))  # the exact bits (setgid and friends included)


def _v1_target(new: TagState, lay: dict[str, Any] | None) -> int:
    """The ID3v1 genre byte for ``new``: the recorded one on an exact undo, else the genre's
    ID3v1 number (255: none)."""
    if lay is not None and lay.get("id3v1_genre") is not None:
        return int(lay["id3v1_genre"])
    return _v1_genre_byte(new.genre)


def _copy_into(path: Path, out, start: int = 0) -> None:
    """Append ``path`` from byte ``start`` to the open file ``out`` (in the kernel where it can:
    sendfile, as shutil.copyfile does)."""
    out.flush()
    with open(path, "rb") as src:
        size = os.fstat(src.fileno()).st_size
        pos = start
        if hasattr(os, "sendfile"):
            try:
                while pos < size:
                    n = os.sendfile(out.fileno(), src.fileno(), pos, min(size - pos, 1 << 30))
                    if n == 0:
                        break
                    pos += n
            except OSError:  # a filesystem without it: the rest by reading and writing
                pass
            out.seek(0, os.SEEK_END)
        src.seek(pos)
        shutil.copyfileobj(src, out, 1 << 20)


def _fill(path: Path, fmt: str, tmp: Path, out, new: TagState, version: int, separator: str, restoring: bool, lay):
    """Write the tagged copy of ``path`` into ``out`` (open on ``tmp``; closed on return): the
    byte-level ID3 editor where it applies, else a copy edited by mutagen. restoring: an undo
    (``lay``: the layout to give back, None for a value-level undo)."""
    if _kind(fmt) in ("id3", "ape"):
        try:
            return _fill_bytes(path, fmt, tmp, out, new, version, separator, restoring, lay)
        except _Unsupported:
            out.close()
            out = open(tmp, "wb")  # noqa: SIM115 - closed below; truncated, mode kept
    _copy_into(path, out)
    out.close()
    f = _open(tmp, fmt)
    _set(f, fmt, new)
    delta = None
    if lay is not None:
        if fmt in ("ogg", "opus"):
            now = _ogg_comment_packet(tmp)
            if now is not None and lay.get("packet") is not None:
                delta = now - int(lay["packet"])
        elif lay.get("size") is not None:
            delta = tmp.stat().st_size - int(lay["size"])
    # the original had no padding at all (MP4: no "free" atom beside the ilst; FLAC: no PADDING
    # block), while mutagen always writes one: it is written empty, then taken out
    no_padding = []
    overhead = {"mp4": 8, "flac": 4}.get(fmt)

    def padding(info) -> int:
        if overhead is not None and delta is not None and info.padding - delta == -overhead:
            no_padding.append(True)
            return 0
        return _padding_func(delta)(info)

    _save(f, fmt, version, separator, padding=padding)
    if no_padding:
        _mp4_drop_empty_free(tmp) if fmt == "mp4" else _flac_drop_empty_padding(tmp)
    if fmt == "mp3" or _kind(fmt) == "ape":
        _update_v1(tmp, new, lay if restoring else None)


def _mp4_drop_empty_free(path: Path) -> None:
    """Remove the empty 8-byte "free" atom mutagen left after the ilst (a restore to a file that
    had none), with the sizes of its parents and the chunk offsets after it."""
    from mutagen._util import delete_bytes
    from mutagen.mp4 import Atoms, MP4Tags

    with open(path, "rb+") as fh:
        atoms = Atoms(fh)
        trail = atoms.path(b"moov", b"udta", b"meta", b"ilst")
        meta, ilst = trail[-2:]
        i = meta.children.index(ilst)
        if i + 1 >= len(meta.children):
            return
        free = meta.children[i + 1]
        if free.name != b"free" or free.length != 8:
            return
        delete_bytes(fh, 8, free.offset)
        tags = MP4Tags.__new__(MP4Tags)  # its offset bookkeeping, as after its own resize
        tags._MP4Tags__update_parents(fh, trail[:-1], -8)
        tags._MP4Tags__update_offsets(fh, atoms, -8, free.offset)


def _flac_drop_empty_padding(path: Path) -> None:
    """Remove the empty PADDING block mutagen wrote last (a restore to a FLAC that had none)."""
    from mutagen._util import delete_bytes

    with open(path, "rb+") as fh:
        head = fh.read(10)
        pos = 10 + _syncsafe(head[6:10]) if head[:3] == b"ID3" else 0  # an ID3v2 tag before "fLaC"
        fh.seek(pos)
        if fh.read(4) != b"fLaC":
            return
        pos += 4
        prev = None
        while True:
            fh.seek(pos)
            h = fh.read(4)
            if len(h) < 4:
                return
            last, kind, n = h[0] & 0x80, h[0] & 0x7F, int.from_bytes(h[1:4], "big")
            if last:
                break
            prev, pos = pos, pos + 4 + n
        if kind != 1 or n != 0 or prev is None:
            return
        fh.seek(prev)
        b = fh.read(1)[0]
        fh.seek(prev)
        fh.write(bytes([b | 0x80]))
        delete_bytes(fh, 4, pos)


def _update_v1(path: Path, new: TagState, lay: dict[str, Any] | None) -> None:
    if _v1_of(path) is not None:
        with open(path, "rb+") as fh:
            _set_v1(fh, _v1_target(new, lay))


def _fill_bytes(path, fmt, tmp, out, new, version, separator, restoring, lay) -> None:
    """The byte-level editors: ID3v2 (MP3, WAV, AIFF) and APEv2 (MP3, WavPack, APE, Musepack)."""
    if _kind(fmt) == "ape":
        _copy_into(path, out)
        out.close()
        _ape_edit(tmp, new, restoring, lay)
        _update_v1(tmp, new, lay if restoring else None)
        return
    original = None
    if restoring and lay is not None and "id3_frames" in lay:
        original = [(int(i), base64.b64decode(b)) for i, b in lay["id3_frames"]]
    target = None  # a write keeps the tag's size; an undo gives it the recorded one (0: none)
    if restoring and (lay is None or "id3_size" in lay):  # (no layout: the file had no tags)
        target = int(lay["id3_size"]) if lay is not None else 0
    if fmt == "mp3":
        tag = _id3_parse(_read_head(path))
        ape_only = tag is None and _has_ape(path)  # the genre goes into the APEv2 tag alone
        data = (
            b""
            if ape_only
            else _id3_render(tag, new, tag.major if tag else version, separator, target=target, original=original)
        )
        out.write(data)
        _copy_into(path, out, tag.size if tag is not None else 0)
        out.close()
        if _has_ape(tmp):  # an APEv2 tag (beside an ID3v2 one or alone) gets the same genre
            _ape_edit(tmp, new, restoring, lay)
        _update_v1(tmp, new, lay if restoring else None)
        return
    data, present = _iff_tag(path, fmt)
    tag = _id3_parse(data)
    if present and tag is None:
        raise _Unsupported("an ID3 chunk without an ID3v2 tag")
    new_tag = _id3_render(tag, new, tag.major if tag else version, separator, target=target, original=original)
    rest = data[tag.size :] if tag is not None else b""
    _copy_into(path, out)
    out.close()
    with open(tmp, "rb+") as fh:
        iff, cid = _iff(fh, fmt)
        if not new_tag and not rest:
            if cid in iff:
                iff[cid].delete()
            return
        if cid not in iff:
            iff.insert_chunk(cid)
        ch = iff[cid]
        ch.resize(len(new_tag + rest))
        ch.write(new_tag + rest)


def _has_ape(path: Path) -> bool:
    from mutagen.apev2 import APENoHeaderError, APEv2

    try:
        APEv2(str(path))
        return True
    except APENoHeaderError:
        return False


def _replace_with_tagged_copy(
    path: Path,
    fmt: str,
    orig,
    new: TagState,
    st0: os.stat_result,
    id3_version: int,
    separator: str,
    restoring: bool = False,
) -> None:
    """Temporary copy (owner and mode first) -> tag it -> verify against ``orig`` (the
    original, opened) -> fsync -> atomic replace. An undo whose layout record does not fit the
    file any more (tags rewritten by another program since) is done value by value. Raises
    TagWriteError."""
    import mutagen
    import numpy as np

    tmp = None
    layouts = [new.layout, None] if restoring and new.layout is not None else [new.layout if restoring else None]
    try:
        for i, lay in enumerate(layouts):
            try:
                tmp, out = _create_temp(path, st0)
            except FileExistsError:
                raise TagWriteError(path, f"cannot create the temporary copy {_tmp_path(path).name}") from None
            try:
                _fill(path, fmt, tmp, out, new, id3_version, separator, restoring, lay)
            except FileNotFoundError:
                raise TagWriteError(path, "file not found (it vanished)") from None
            finally:
                out.close()
            # verify the copy before it replaces anything
            back = _open(tmp, fmt)
            if _read(back, fmt) == _as_read(new, fmt, id3_version, separator):
                break
            if i == len(layouts) - 1:
                raise TagWriteError(path, "the tagged copy did not read back with the new tags; file left unchanged")
            tmp.unlink()
            tmp = None
        if _others(back, fmt) != _others(orig, fmt):
            raise TagWriteError(path, "the tagged copy's other tags differ; file left unchanged")
        if _stream_info(back) != _stream_info(orig):
            raise TagWriteError(path, "the tagged copy's audio stream info differs; file left unchanged")
        a, b = _first_samples(path), _first_samples(tmp)
        if (a is None) != (b is None) or (a is not None and not np.array_equal(a, b)):
            raise TagWriteError(path, "the tagged copy does not decode to the same audio; file left unchanged")
        _final_mode(tmp, st0)
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
    except (mutagen.MutagenError, ValueError, struct.error) as exc:  # a tag block mutagen cannot rewrite
        raise TagWriteError(path, f"cannot write its tags ({exc}); file left unchanged") from None
    finally:
        if tmp is not None:
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


def _file_id3_version(f, fmt: str, requested: int) -> int:
    """The ID3v2 version a write uses: the file's own (v2.2 is written as v2.3), else ``requested``."""
    if _kind(fmt) != "id3" or not _has_id3v2(f):
        return requested
    return 4 if f.tags.version[1] == 4 else 3


def _apply(
    path: str | os.PathLike,
    decide: Callable[[TagState, Callable], tuple[str, str, TagState | None]],
    dry_run: bool,
    id3_version: int,
    separator: str,
    genres: list[str],
    restoring: bool = False,
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
            f"{p.suffix or 'no extension'}: embedkit writes genres into MP3, FLAC, OGG, Opus, M4A/MP4, WAV, AIFF, "
            "WMA, WavPack, APE and Musepack only",
        )
        return out
    try:
        orig = _open(p, fmt)
        state = _read(orig, fmt)
        state.layout = _layout_of(p, orig, fmt)
    except TagWriteError as exc:
        out.reason = exc.problem
        return out
    except OSError as exc:
        out.reason = f"cannot read file ({exc.strerror or type(exc).__name__})"
        return out
    version = _file_id3_version(orig, fmt, id3_version)
    if fmt == "mp3" and _containers(orig, fmt)[0][0] == "ape":
        version = 4  # the genre goes into the APEv2 tag: multi-value, nothing joined
    out.before = state.to_dict()
    status, reason, new = decide(state, lambda st: _as_read(st, fmt, version, separator))
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
        _replace_with_tagged_copy(p, fmt, orig, new, st0, version, separator, restoring)
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
    genre a person set. id3_version: for a file without an ID3v2 tag, 4 (one value per genre,
    the default) or 3 (joined with ``separator``: ID3v2.3 has no multi-value frames); a file
    with one keeps its version. ``before`` in the result is what ``restore`` takes to undo the
    write (with its ``layout``, byte for byte). Never raises for a bad file: the returned
    TagChange says what happened ("failed" with the reason)."""
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
    ``before``; with its ``layout``, the tag block as it was, byte for byte, where the rest of
    the tags did not change since). Refuses ("kept") when the file's genre is no longer the one
    embedkit wrote (a person changed it since) unless ``force``."""
    prev = TagState.from_dict(previous)

    def decide(state: TagState, as_read):
        if state == prev:
            return "unchanged", "already as before", None
        if not state.written_by_embedkit and not force:
            now = "no genre" if state.genre is None else repr("; ".join(state.genre))
            return "kept", f"genre is now {now}, not what embedkit wrote; pass force to restore anyway", None
        was = "no genre" if prev.genre is None else repr("; ".join(prev.genre))
        return "written", f"restored {was}", prev

    return _apply(path, decide, dry_run, id3_version, separator, prev.genre or [], restoring=True)


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


# ---------------------------------------------------------------------------------------------
# Temporaries left by killed writers

_TMP_NAME = re.compile(r"^\..+\.embedkit-([1-9][0-9]{0,9})\.tmp$")


def clean_temporaries(folder: str | os.PathLike, *, recursive: bool = False) -> list[Path]:
    """Remove temporaries a killed tag writer left in ``folder`` (``.<name>.embedkit-<pid>.tmp``,
    regular files only, of processes no longer running; a pid now used by a process that started
    after the temporary was last written counts as gone). Returns the removed paths; one that
    cannot be removed is left and not returned."""
    removed = []
    pattern = "**/.*.embedkit-*.tmp" if recursive else ".*.embedkit-*.tmp"
    for tmp in Path(folder).glob(pattern):
        m = _TMP_NAME.match(tmp.name)
        if m is None:
            continue
        try:
            st = tmp.lstat()
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):  # never follow or remove a link or folder of that name
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or (alive(pid) and not _started_after(pid, st.st_mtime)):
            continue  # a writer still at work (this process included)
        try:
            tmp.unlink()
        except FileNotFoundError:
            continue
        except OSError:
            continue
        removed.append(tmp)
    return removed


def _started_after(pid: int, when: float) -> bool:
    """Whether process ``pid`` started after ``when`` (epoch seconds): its pid was reused since
    (Linux /proc; elsewhere False)."""
    start = started_at(pid)
    return start is not None and start > when + 1.0
