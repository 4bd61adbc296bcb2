"""Fused embeddings from the stores that exist: ``-b musicnn-msd+musicnn-mtt+melstats``.

Each part's embeddings are read from its own store (``embedkit.store``; nothing is
re-extracted) for the same tracks and joined window by window on (track, segment): the parts
share one segment grid (``embedkit.backbones.fused`` says why), so row k of a track is the
same seconds of audio in every part. A fusion whose stores do not hold the same tracks and
windows is refused in one line naming how many tracks are missing from which backbone's store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .backbones.fused import fused_spec, fused_weights_id, parse_parts
from .errors import ConfigError, ConfigMismatchError, DatasetError, StoreError


@dataclass(frozen=True)
class FusionConfig:
    """How a fused head combines its parts; stored in the run's config and the head bundle.

    parts: backbone names, in column order. dims: their embedding sizes.
    fusion: "concat" (one head on the concatenation) | "stack" (a logistic regression over
        per-part heads' out-of-fold log-probabilities).
    weighting: concat only (None for stack): "equal" (each part's standardised block scaled to
        the same total variance) | "none" (per-column standardisation alone) | one weight per part.
    align: how rows are joined ("segment": window k of a track in every part).
    """

    parts: tuple[str, ...]
    dims: tuple[int, ...] = ()
    fusion: str = "concat"
    weighting: Any = "equal"
    align: str = "segment"
    extra: dict[str, Any] = field(default_factory=dict)

    def head_fusion(self) -> dict[str, Any]:
        return {"fusion": self.fusion, "dims": list(self.dims), "weighting": self.weighting}

    def to_dict(self) -> dict[str, Any]:
        w = self.weighting
        if w is not None and not isinstance(w, str):
            w = [float(x) for x in w]
        return {
            "parts": list(self.parts),
            "dims": list(self.dims),
            "fusion": self.fusion,
            "weighting": w,
            "align": self.align,
        }


def head_run_name(backbone: str, head: str, fusion: str = "concat") -> str:
    """The run name of a head: "musicnn-msd+lr"; a fused one shows its fusion,
    "concat(musicnn-msd+melstats)+lr"."""
    from .backbones.fused import is_fused

    return f"{fusion}({backbone})+{head}" if is_fused(backbone) else f"{backbone}+{head}"


def check_fusion(fusion: str, weighting) -> None:
    from .heads.fused import FUSIONS, WEIGHTINGS

    if fusion not in FUSIONS:
        raise ConfigError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}", field="fusion")
    if isinstance(weighting, str) and weighting not in WEIGHTINGS:
        raise ConfigError(
            f"unknown part weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}", field="weighting"
        )


@dataclass
class FusedStores:
    """The stores of a fusion's parts (in order) and what they agree on."""

    parts: list[str]
    stores: list[Any]

    @property
    def root(self) -> Path:
        """Not a folder: the parts' store folder names joined by '+' (what run identities hash)."""
        return Path("+".join(s.root.name for s in self.stores))

    @property
    def metas(self) -> list[dict[str, Any]]:
        return [s.meta() for s in self.stores]

    def spec(self) -> dict[str, Any]:
        m = self.metas
        return fused_spec([x["backbone"] for x in m], [x.get("weights_id", "none") for x in m]).to_dict()

    def weights_id(self) -> str:
        return fused_weights_id([x.get("weights_id", "none") for x in self.metas])

    def preprocess(self) -> dict[str, Any]:
        """The one preprocessing every part's store was extracted with (refused otherwise)."""
        m = self.metas
        first = m[0]["preprocess"]
        for name, x in zip(self.parts[1:], m[1:]):
            if x["preprocess"] != first:
                raise ConfigMismatchError(
                    f"fused backbone {'+'.join(self.parts)}: the {name} store was extracted with other preprocessing "
                    f"than the {self.parts[0]} store ({x['preprocess']['segments']} vs {first['segments']}); "
                    "the parts must share one segment grid: extract them with the same --segment-s/--hop-s/clip options"
                )
        return first

    def dataset_tracks(self):
        return self.stores[0].dataset_tracks()


def open_stores(name: str, cache: str | os.PathLike, prep=None) -> FusedStores:
    """Every part's store under ``cache`` (``store.find_store``; a missing one is a StoreError
    telling which `embedkit extract` to run)."""
    from .store import find_store

    parts = parse_parts(name)
    return FusedStores(parts, [find_store(cache, p, prep) for p in parts])


def read_fused(fs: FusedStores, tracks: pd.DataFrame | None = None, output: str = "embedding"):
    """(segment table, X float32 [N, sum D]) of ``tracks`` (default: the dataset extracted last
    into the first part's store), the parts' columns side by side in part order, rows joined on
    (track_id, segment). StoreError (one line) when the parts' stores do not hold the same
    tracks and windows."""
    from .embeddings import read_embeddings

    if output != "embedding":
        raise ConfigError("a fused head reads the parts' embeddings only (output 'embedding')", field="output")
    fs.preprocess()
    if tracks is None:
        tracks = fs.dataset_tracks()
    got = []
    for name, st in zip(fs.parts, fs.stores):
        try:
            got.append(read_embeddings(st, output, tracks))
        except StoreError:
            raise
        except DatasetError as exc:  # no track of the dataset in this part's store
            from .errors import first_line

            raise StoreError(f"fused backbone {'+'.join(fs.parts)}: {name}: {first_line(exc)}") from None
    keys = [pd.MultiIndex.from_arrays([s["track_id"].to_numpy(), s["segment"].to_numpy()]) for s, _ in got]
    tracks_of = [set(s["track_id"]) for s, _ in got]
    every = set().union(*tracks_of)
    missing = [(n, len(every - t)) for n, t in zip(fs.parts, tracks_of) if every - t]
    if missing:
        say = ", ".join(f"{k} track(s) missing from the {n} store" for n, k in missing)
        raise StoreError(
            f"fused backbone {'+'.join(fs.parts)}: the stores do not line up: {say} (of {len(every)}); "
            "extract them into every part's store first"
        )
    base = keys[0]
    for name, k in zip(fs.parts[1:], keys[1:]):
        if len(k) != len(base) or not k.equals(base):
            n_bad = len(set(base.get_level_values(0)[~base.isin(k)]) | set(k.get_level_values(0)[~k.isin(base)]))
            raise StoreError(
                f"fused backbone {'+'.join(fs.parts)}: {n_bad} track(s) have other windows in the {name} store than in the "
                f"{fs.parts[0]} store; the parts must share one segment grid"
            )
    seg = got[0][0]
    X = np.concatenate([x for _, x in got], axis=1)
    for name, (s, _) in zip(fs.parts[1:], got[1:]):
        if not np.allclose(s["start_s"].to_numpy(), seg["start_s"].to_numpy(), atol=1e-3):
            raise StoreError(f"fused backbone {'+'.join(fs.parts)}: the {name} store's windows start at other times")
    seg.attrs["missing_from_store"] = max(int(s.attrs.get("missing_from_store", 0)) for s, _ in got)
    return seg, np.ascontiguousarray(X, dtype=np.float32)


def extraction_cost(fs: FusedStores) -> dict[str, float] | None:
    """The parts' extraction costs added up (a fused tagger runs every part)."""
    from .embeddings import extraction_cost as one

    costs = [one(s) for s in fs.stores]
    if any(c is None for c in costs):
        return None
    ms = sum(c["ms_per_track"] for c in costs)
    tracks = min(c["tracks"] for c in costs)
    return {"seconds": ms * tracks / 1000.0, "tracks": tracks, "ms_per_track": ms}
