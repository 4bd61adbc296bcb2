"""Backbone registry.

Each family module registers its specs with a loader at import; the family modules import no
heavy library at module level, so listing models is instant and needs no weights.

    >>> from embedkit.backbones import list_backbones, load_backbone
    >>> [s.name for s in list_backbones()]            # doctest: +SKIP
    >>> bb = load_backbone("musicnn-msd")              # doctest: +SKIP
    >>> bb.embed(segments)  # [B, 80000] @ 16 kHz -> [B, 200]
"""

from __future__ import annotations

import fnmatch

from ..errors import BackboneError
from .base import Backbone, BackboneSpec
from .registry import _IDENTIFY, _REGISTRY, register_backbone


def _ensure_registered() -> None:
    # Importing the family modules registers them (cheap: no torch at module level).
    from . import melstats, tiny  # noqa: F401

    for optional in ("musicnn", "panns", "ast"):
        try:
            __import__(f"{__name__}.{optional}")
        except ModuleNotFoundError as exc:  # module not written yet / removed
            if exc.name != f"{__name__}.{optional}":
                raise


def list_backbones(pattern: str = "*") -> list[BackboneSpec]:
    _ensure_registered()
    return [spec for name, (spec, _) in sorted(_REGISTRY.items()) if fnmatch.fnmatch(name, pattern)]


def get_spec(name: str) -> BackboneSpec:
    _ensure_registered()
    if name not in _REGISTRY:
        valid = ", ".join(sorted(_REGISTRY))
        raise BackboneError(f"unknown backbone {name!r}; valid names: {valid}")
    return _REGISTRY[name][0]


def load_backbone(name: str, checkpoint: str | None = None, **kwargs) -> Backbone:
    """Build a backbone with its weights. ``checkpoint`` is a file or directory for families
    whose weights are not packaged (PANNs, AST)."""
    spec = get_spec(name)
    return _REGISTRY[name][1](spec, checkpoint=checkpoint, **kwargs)


def identify_weights(name: str, checkpoint: str | None = None) -> tuple[str, BackboneSpec] | None:
    """(weights_id, spec) of ``name`` with ``checkpoint`` as ``load_backbone`` would give them,
    without building the network; None when the family cannot tell before loading."""
    spec = get_spec(name)
    fn = _IDENTIFY.get(name)
    return fn(spec, checkpoint) if fn is not None else None


__all__ = [
    "Backbone",
    "BackboneSpec",
    "register_backbone",
    "list_backbones",
    "get_spec",
    "load_backbone",
    "identify_weights",
]
