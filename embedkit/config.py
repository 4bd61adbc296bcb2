"""Configuration dataclasses. Every artefact stores the config that produced it (as JSON)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal


def to_dict(obj) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def from_dict(cls, data: dict[str, Any]):
    """Build a dataclass from a dict, ignoring unknown keys (forward compatibility)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def stable_hash(obj: Any, n: int = 12) -> str:
    """Short SHA-256 of a JSON-serialisable object with sorted keys (stable across runs)."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    payload = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:n]


@dataclass(frozen=True)
class AudioConfig:
    """How a file becomes the canonical clip.

    clip_s: every clip is brought to this length (None keeps the native length).
    offset_s: where the kept part of a longer clip starts.
    pad_mode: "loop" repeats a short clip, "zero" pads with silence.
    min_duration_s: clips shorter than this are rejected (they cannot hold one segment).
    """

    clip_s: float | None = 30.0
    offset_s: float = 0.0
    pad_mode: Literal["loop", "zero"] = "loop"
    min_duration_s: float = 1.0


@dataclass(frozen=True)
class SegmentConfig:
    """Fixed windows over the clip: window k covers [round(k*hop_s*sr), +round(segment_s*sr))."""

    segment_s: float = 5.0
    hop_s: float = 5.0


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything between a file on disk and the backbone input. Part of every store key."""

    audio: AudioConfig = field(default_factory=AudioConfig)
    segments: SegmentConfig = field(default_factory=SegmentConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessConfig":
        return cls(
            audio=from_dict(AudioConfig, data.get("audio", {})),
            segments=from_dict(SegmentConfig, data.get("segments", {})),
        )
