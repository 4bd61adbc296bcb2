"""A person's own genre taxonomy, from the raw genre tags of their files.

Raw values are normalised to a key (``genre_key``: case, accents, punctuation and spacing
ignored, "&" read as "and"), so "Hip-Hop", "Hip Hop", "hip hop" and "HipHop" are one genre; its
name is the spelling most files use. An optional genre map (TOML) then merges, renames, drops
and folds sub-genres into parents::

    drop = ["other", "unknown", "podcast"]   # these values are not genres: tracks with only
                                             # them are neither training data nor tagged next
    unmapped = "keep"                        # or "drop": only the classes the map names
    [map]                                    # raw value (matched by its key) -> class
    "hip hop" = "Hip-Hop"                    # rename (and merge every spelling of it)
    "rap" = "Hip-Hop"                        # merge
    "alt rock" = "Rock"                      # a sub-genre into its parent
    "indie rock" = "Rock"

Multi-valued genre tags: the **primary** value is used, the first value that maps to a class
(values the map drops are skipped). Heads and the CNN are single-label softmax classifiers,
evaluated by accuracy; tag editors put the main genre first; and a second genre on a few tracks
would otherwise make a class count twice. The record counts the multi-valued tracks.

Classes with fewer than ``min_tracks`` tracks are dropped (their tracks leave the training
data), since a class with a handful of tracks can neither be learned nor evaluated in K folds.
The record (``Taxonomy.record``) lists the mapping used, the classes and their counts, and what
was dropped and why; it goes into the run's ``metrics.json`` under ``taxonomy``.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DatasetError

DEFAULT_MIN_TRACKS = 5


def genre_key(raw: str) -> str:
    """The normalised key of a genre value: "Hip-Hop", "hip hop", "HIPHOP" -> "hiphop";
    "R&B" -> "randb"; "Électro" -> "electro"."""
    s = unicodedata.normalize("NFKD", str(raw)).encode("ascii", "ignore").decode()
    s = s.lower().replace("&", " and ")
    return re.sub(r"[^a-z0-9]+", "", s)


def artist_key(raw: str | None) -> str | None:
    """An artist's group key: case and punctuation ignored, "feat." guests dropped."""
    if not raw:
        return None
    main = re.split(r"\s+(?:feat\.?|ft\.?|featuring)\s+", raw, maxsplit=1, flags=re.I)[0]
    key = genre_key(main)
    return key or None


@dataclass(frozen=True)
class GenreMap:
    """A parsed genre map: ``mapping`` genre key -> class name, ``drop`` genre keys,
    ``keep_unmapped`` (unmapped = "keep")."""

    mapping: dict[str, str] = field(default_factory=dict)
    drop: frozenset[str] = frozenset()
    keep_unmapped: bool = True
    source: str | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GenreMap":
        """Read a TOML genre map; DatasetError (one line naming the file) when it does not parse
        or says something impossible."""
        import tomllib

        p = Path(path)
        try:
            doc = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DatasetError(f"{p}: genre map not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{p}: cannot read the genre map ({exc})") from None
        except tomllib.TOMLDecodeError as exc:
            raise DatasetError(f"{p}: genre map is not valid TOML ({exc})") from None
        return cls.from_dict(doc, str(p))

    @classmethod
    def from_dict(cls, doc: dict[str, Any], source: str = "genre map") -> "GenreMap":
        unknown = sorted(set(doc) - {"map", "drop", "unmapped"})
        if unknown:
            raise DatasetError(f"{source}: unknown key(s) {unknown}; use [map], drop = [...], unmapped = keep|drop")
        raw_map = doc.get("map", {})
        if not isinstance(raw_map, dict):
            raise DatasetError(f'{source}: [map] must be a table of "raw genre" = "class"')
        drop = doc.get("drop", [])
        if not isinstance(drop, list) or not all(isinstance(d, str) for d in drop):
            raise DatasetError(f"{source}: drop must be a list of genre names")
        unmapped = doc.get("unmapped", "keep")
        if unmapped not in ("keep", "drop"):
            raise DatasetError(f'{source}: unmapped must be "keep" or "drop", not {unmapped!r}')
        mapping: dict[str, str] = {}
        for raw, target in raw_map.items():
            if not isinstance(target, str) or not target.strip() or not genre_key(target):
                raise DatasetError(
                    f"{source}: {raw!r} maps to nothing ({target!r}); give a class name, or list it under drop"
                )
            key = genre_key(raw)
            if not key:
                raise DatasetError(f"{source}: {raw!r} is not a genre name (no letters or digits)")
            if key in mapping and mapping[key] != target.strip():
                raise DatasetError(f"{source}: {raw!r} maps to both {mapping[key]!r} and {target.strip()!r}")
            mapping[key] = target.strip()
        drops = frozenset(genre_key(d) for d in drop)
        both = sorted(k for k in mapping if k in drops)
        if both:
            raise DatasetError(f"{source}: {both[0]!r} is both mapped and dropped")
        return cls(mapping, drops, unmapped == "keep", source)


@dataclass
class Taxonomy:
    """The classes learned from raw genre values: ``label_of(values)`` -> class or None (with the
    reason), and the ``record`` of what was mapped and dropped."""

    genre_map: GenreMap
    names: dict[str, str]  # genre key -> display name (the most common spelling)
    min_tracks: int = DEFAULT_MIN_TRACKS
    below_floor: dict[str, int] = field(default_factory=dict)
    spellings: dict[str, list[str]] = field(default_factory=dict)  # key -> every raw spelling seen

    @classmethod
    def build(
        cls, values: list[list[str] | None], genre_map: GenreMap | None = None, min_tracks: int = DEFAULT_MIN_TRACKS
    ):
        """From every track's raw genre values (None: untagged)."""
        if min_tracks < 1:
            raise DatasetError(f"--min-tracks must be >= 1, got {min_tracks}")
        gm = genre_map or GenreMap()
        spellings: dict[str, Counter] = {}
        for vals in values:
            for v in vals or ():
                spellings.setdefault(genre_key(v), Counter())[v.strip()] += 1
        names = {k: c.most_common(1)[0][0] for k, c in spellings.items() if k}
        tax = cls(gm, names, min_tracks, spellings={k: sorted(c) for k, c in spellings.items() if k})
        counts = Counter(c for c in (tax._primary(v)[0] for v in values) if c is not None)
        tax.below_floor = {c: n for c, n in counts.items() if n < min_tracks}
        return tax

    def class_of(self, raw: str) -> tuple[str | None, str]:
        """(class, "") or (None, why) for one raw value (before the floor)."""
        key = genre_key(raw)
        if not key:
            return None, "empty genre value"
        if key in self.genre_map.drop:
            return None, "dropped by the genre map"
        if key in self.genre_map.mapping:
            return self.genre_map.mapping[key], ""
        if not self.genre_map.keep_unmapped:
            return None, "not in the genre map (unmapped = drop)"
        return self.names.get(key, raw.strip()), ""

    def _primary(self, values: list[str] | None) -> tuple[str | None, str]:
        if not values:
            return None, "untagged"
        why = ""
        for v in values:
            c, why = self.class_of(v)
            if c is not None:
                return c, ""
        return None, why

    def label_of(self, values: list[str] | None) -> tuple[str | None, str]:
        """The track's class (the primary value's), or None and why ("untagged" for no genre)."""
        c, why = self._primary(values)
        if c is not None and c in self.below_floor:
            return None, f"class {c!r} has {self.below_floor[c]} track(s), below --min-tracks {self.min_tracks}"
        return c, why

    def record(self, values: list[list[str] | None]) -> dict[str, Any]:
        """JSON-safe: the mapping used (raw spelling -> class), classes with track counts, the
        dropped values and classes with their reasons, the multi-value policy."""
        mapping: dict[str, str | None] = {}
        dropped_values: dict[str, str] = {}
        for raw in sorted(r for rs in self.spellings.values() for r in rs):
            c, why = self.class_of(raw)
            mapping[raw] = c
            if c is None:
                dropped_values[raw] = why
        labels = Counter()
        dropped_tracks = Counter()
        for v in values:
            c, why = self.label_of(v)
            if c is not None:
                labels[c] += 1
            else:
                dropped_tracks["untagged" if why == "untagged" else why] += 1
        unused = sorted(k for k in self.genre_map.mapping if k not in self.names)
        return {
            "genre_map": self.genre_map.source,
            "min_tracks": self.min_tracks,
            "multi_value_policy": "primary (the first value that maps to a class)",
            "multi_valued_tracks": sum(1 for v in values if v and len(v) > 1),
            "classes": dict(sorted(labels.items())),
            "mapping": mapping,
            "dropped_values": dropped_values,
            "dropped_classes": {
                c: f"{n} track(s), below --min-tracks {self.min_tracks}" for c, n in sorted(self.below_floor.items())
            },
            "tracks_not_used": dict(sorted(dropped_tracks.items())),
            "unused_map_entries": unused,
        }


@dataclass(frozen=True)
class TagLabels:
    """Options of ``--labels-from-tags``: labels from the files' own genre tags."""

    genre_map: str | None = None
    min_tracks: int = DEFAULT_MIN_TRACKS

    def load_map(self) -> GenreMap | None:
        return GenreMap.load(self.genre_map) if self.genre_map else None
