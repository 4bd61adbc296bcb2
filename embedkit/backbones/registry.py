"""Where backbone families register (imported by each family module and by the package, which
holds the lookups): a module of its own, so the families never import their package back."""

from __future__ import annotations

from typing import Callable

from ..errors import BackboneError
from .base import Backbone, BackboneSpec

_REGISTRY: dict[str, tuple[BackboneSpec, Callable[..., Backbone]]] = {}
#: name -> identify(spec, checkpoint) -> (weights_id, spec as loaded) | None, without building the network
_IDENTIFY: dict[str, Callable[..., "tuple[str, BackboneSpec] | None"]] = {}


def register_backbone(
    spec: BackboneSpec,
    loader: Callable[..., Backbone],
    identify: Callable[..., "tuple[str, BackboneSpec] | None"] | None = None,
) -> None:
    """Register ``loader(spec, checkpoint=None, **kw) -> Backbone`` under ``spec.name``.

    identify(spec, checkpoint): the ``weights_id`` and spec the loader would produce, computed
    cheaply (a checkpoint file's hash); lets ``extract`` see that nothing is left to do without
    building the model. None (or returning None): only a loaded backbone knows them."""
    if spec.name in _REGISTRY:
        raise BackboneError(f"backbone {spec.name!r} registered twice")
    _REGISTRY[spec.name] = (spec, loader)
    if identify is not None:
        _IDENTIFY[spec.name] = identify
