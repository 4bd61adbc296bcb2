"""Reading a file's own tags: where the genre, artist and album artist live in each format.

The one rule for *reading* tags, used upstream (``datasets.from_tags``: a library's own genre
tags as training labels, artists as groups) and by ``deploy.filetags`` (which writes genres
safely and reads them back through these same functions).

- MP3 / WAV / AIFF: ID3v2 (``TCON``, ``TPE1``, ``TPE2``); an MP3 with an APEv2 tag and no
  ID3v2 is read from the APEv2 tag.
- FLAC, Ogg Vorbis / Opus / FLAC: Vorbis comments (``GENRE``, ``ARTIST``, ``ALBUMARTIST``).
- M4A / MP4: ``©gen``, ``©ART``, ``aART``.
- WMA / ASF: ``WM/Genre``, ``Author``, ``WM/AlbumArtist``.
- WavPack, Monkey's Audio, Musepack: APEv2 ``Genre``, ``Artist``, ``Album Artist``.

    >>> read_library_tags("song.flac")                # doctest: +SKIP
    LibraryTags(genres=['Hip-Hop', 'Rap'], artist='MF DOOM', album_artist=None)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import TagWriteError, require

#: file extension -> tag format (the formats whose tags embedkit reads and writes)
TAG_FORMATS = {
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
    ".wma": "asf",
    ".asf": "asf",
    ".wv": "wavpack",
    ".ape": "ape",
    ".mpc": "mpc",
    ".mp+": "mpc",
    ".mpp": "mpc",
}
MP4_GENRE = "\xa9gen"
#: embedkit's provenance fields (what it wrote, with what score, model, date, version)
PROVENANCE = ("EMBEDKIT_GENRE", "EMBEDKIT_GENRE_SCORE", "EMBEDKIT_MODEL", "EMBEDKIT_DATE", "EMBEDKIT_VERSION")
MP4_FREEFORM = "----:com.embedkit:"
ASF_GENRE = "WM/Genre"
APE_GENRE = "Genre"
#: (artist, album artist, album, title) keys per tag kind
_TEXT_KEYS = {
    "id3": ("TPE1", "TPE2", "TALB", "TIT2"),
    "mp4": ("\xa9ART", "aART", "\xa9alb", "\xa9nam"),
    "asf": ("Author", "WM/AlbumArtist", "WM/AlbumTitle", "Title"),
    "ape": ("Artist", "Album Artist", "Album", "Title"),
    "vorbis": ("ARTIST", "ALBUMARTIST", "ALBUM", "TITLE"),
}


@dataclass(frozen=True)
class LibraryTags:
    """What a file says about itself: genre values (None: no genre field), artist, album artist;
    written_by_embedkit: the genre is one embedkit wrote (``tag --write-tags``), not a person's."""

    genres: list[str] | None
    artist: str | None = None
    album_artist: str | None = None
    written_by_embedkit: bool = False
    album: str | None = None
    title: str | None = None


def format_of(path: str | os.PathLike) -> str | None:
    """The tag format of ``path`` by its extension, or None."""
    return TAG_FORMATS.get(Path(path).suffix.lower())


def mutagen_class(fmt: str):
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
    elif fmt == "aiff":
        from mutagen.aiff import AIFF as cls
    elif fmt == "asf":
        from mutagen.asf import ASF as cls
    elif fmt == "wavpack":
        from mutagen.wavpack import WavPack as cls
    elif fmt == "ape":
        from mutagen.monkeysaudio import MonkeysAudio as cls
    elif fmt == "mpc":
        from mutagen.musepack import Musepack as cls
    else:
        from .errors import EmbedkitError

        raise EmbedkitError(f"unknown tag format {fmt!r}")
    return cls


def open_tags(path: Path, fmt: str):
    """The file opened with mutagen (an MP3 also gets ``_ek_ape``: its APEv2 tag or None);
    TagWriteError (path + reason) when it cannot be read."""
    require("mutagen", "pip install 'embedkit[tags]'", "reading and writing tags")
    import mutagen

    try:
        if fmt == "ogg":  # .ogg / .oga hold Vorbis, Opus or FLAC: ask the file
            from mutagen.oggflac import OggFLAC
            from mutagen.oggopus import OggOpus
            from mutagen.oggvorbis import OggVorbis

            for cls in (OggVorbis, OggOpus):
                try:
                    return cls(str(path))
                except mutagen.MutagenError:
                    pass
            return OggFLAC(str(path))
        f = mutagen_class(fmt)(str(path))
        if fmt == "mp3":
            from mutagen.apev2 import APENoHeaderError, APEv2

            try:
                f._ek_ape = APEv2(str(path))
            except APENoHeaderError:
                f._ek_ape = None
        return f
    except FileNotFoundError:
        raise TagWriteError(path, "file not found (it vanished)") from None
    except PermissionError:
        raise TagWriteError(path, "permission denied reading the file") from None
    except mutagen.MutagenError as exc:
        raise TagWriteError(path, f"not a readable {fmt.upper()} file ({exc})") from None


def kind_of(fmt: str) -> str:
    """The tag kind of a format: id3 | mp4 | asf | ape | vorbis."""
    return {
        "mp3": "id3",
        "wav": "id3",
        "aiff": "id3",
        "mp4": "mp4",
        "asf": "asf",
        "wavpack": "ape",
        "ape": "ape",
        "mpc": "ape",
    }.get(fmt, "vorbis")


def has_id3v2(f) -> bool:
    tags = getattr(f, "tags", None)
    return tags is not None and getattr(tags, "version", (0,)) >= (2, 2, 0)


def containers(f, fmt: str) -> list[tuple[str, Any]]:
    """(kind, tags object or None) of every tag block that holds the file's genre; the first is
    the one read."""
    if fmt == "mp3":
        ape = getattr(f, "_ek_ape", None)
        if ape is not None and not has_id3v2(f):
            return [("ape", ape)]
        return [("id3", f.tags)] + ([("ape", ape)] if ape is not None else [])
    return [(kind_of(fmt), f.tags)]


def ape_values(v) -> list[str]:
    return [str(x) for x in v] if hasattr(v, "__iter__") and not isinstance(v, (str, bytes)) else [str(v)]


def pairs(tags) -> list[tuple[str, Any]]:
    """The (key, value) entries of a list-based mutagen tag (Vorbis comments, ASF), in order."""
    return list(list.__iter__(tags))


def values_of(kind: str, tags, key: str) -> list[str] | None:
    """The values of field ``key`` (the kind's own spelling) in a tag block; None: no such field."""
    if tags is None:
        return None
    if kind == "id3":
        frames = tags.getall(key)
        out = [g for fr in frames for g in fr.genres] if key == "TCON" else [str(t) for fr in frames for t in fr.text]
    elif kind == "mp4":
        out = [str(g) for g in tags.get(key, [])]
    elif kind == "asf":
        out = [str(v) for k, v in pairs(tags) if k == key]
    elif kind == "ape":
        v = tags.get(key)  # APEv2 keys are case-insensitive
        return ape_values(v) if v is not None else None
    else:
        out = [str(v) for k, v in pairs(tags) if k.upper() == key.upper()]
    return out or None


def genre_values(kind: str, tags) -> list[str] | None:
    """The genre values of a tag block (None: no genre field)."""
    key = {"id3": "TCON", "mp4": MP4_GENRE, "asf": ASF_GENRE, "ape": APE_GENRE}.get(kind, "GENRE")
    return values_of(kind, tags, key)


def provenance_values(kind: str, tags, name: str) -> list[str]:
    """The values of embedkit's provenance field ``name`` (one of PROVENANCE) in a tag block:
    ID3 TXXX, MP4 freeform ``----:com.embedkit:``, ASF / APEv2 items, Vorbis comments."""
    if tags is None:
        return []
    if kind == "id3":
        return [str(t) for fr in tags.getall(f"TXXX:{name}") for t in fr.text]
    if kind == "mp4":
        return [bytes(v).decode("utf-8", "replace") for v in tags.get(MP4_FREEFORM + name, [])]
    if kind == "asf":
        return [str(v) for k, v in pairs(tags) if k == name]
    if kind == "ape":
        return ape_values(tags[name]) if name in tags else []
    return [str(v) for k, v in pairs(tags) if k.upper() == name]


def read_library_tags(path: str | os.PathLike) -> LibraryTags:
    """Genres, artist and album artist of a file, from the tag block ``containers`` reads first
    (TagWriteError when unreadable or not a format with tags)."""
    p = Path(path)
    fmt = format_of(p)
    if fmt is None:
        raise TagWriteError(p, "not a format embedkit reads tags from")
    kind, tags = containers(open_tags(p, fmt), fmt)[0]
    a_key, aa_key, album_key, title_key = _TEXT_KEYS[kind]

    def first(key: str) -> str | None:
        vals = [v.strip() for v in (values_of(kind, tags, key) or []) if v.strip()]
        return vals[0] if vals else None

    raw = genre_values(kind, tags)
    genres = [g.strip() for g in raw if g.strip()] if raw is not None else None
    # a genre equal to the EMBEDKIT_GENRE it carries was written by embedkit: a prediction
    ours = raw is not None and provenance_values(kind, tags, "EMBEDKIT_GENRE") == raw
    return LibraryTags(
        genres or None, first(a_key), first(aa_key), bool(ours), album=first(album_key), title=first(title_key)
    )
