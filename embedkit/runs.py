"""What every trainer agrees on about a run: the protocol, run ids, the dataset fingerprint,
and the one check that an artefact matches what it is used with.

Heads (``fit``), the scratch CNN and fine-tuning (``cnn.loop``) and the pipeline all choose
their protocol with :func:`choose_protocol`, name runs with :func:`run_id`, fingerprint the
track table with :func:`dataset_fingerprint`, and refuse a mismatched artefact (a store built
with other preprocessing, a head bundle fed other embeddings, a resume with other options)
through :func:`check_match`, so the rule and its message live here once.
"""

from __future__ import annotations

import datetime as _dt
import re
import secrets
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Sequence

import pandas as pd

from .config import stable_hash
from .errors import ConfigError, ConfigMismatchError

#: protocols a caller may ask for; "auto" resolves to "split" or "holdout" (see choose_protocol)
PROTOCOLS = ("auto", "holdout", "split", "cv")


# ---------------------------------------------------------------------------------------------
# Protocol


def check_cv(cv: int | None) -> None:
    """K-fold needs K >= 2 (None: no cross-validation)."""
    if cv is not None and cv < 2:
        raise ConfigError(f"cv needs K >= 2 folds, got {cv}", field="cv")


def has_split(tracks: pd.DataFrame) -> bool:
    """The dataset brings its own split: a split column with train and test tracks."""
    return "split" in tracks and {"train", "test"} <= set(tracks["split"].dropna())


def choose_protocol(tracks: pd.DataFrame, cv: int | None = None, protocol: str = "auto") -> str:
    """The evaluation protocol of every trainer: ``cv=K`` -> "cv"; "auto" -> "split" when the
    dataset has train and test tracks, else an 80/20 "holdout"; "holdout" / "split" as asked."""
    check_cv(cv)
    if cv:
        return "cv"
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}", field="protocol")
    if protocol == "cv":
        raise ConfigError("protocol 'cv' needs the number of folds (cv=K)", field="protocol")
    if protocol == "auto":
        return "split" if has_split(tracks) else "holdout"
    return protocol


# ---------------------------------------------------------------------------------------------
# Run ids and dataset identity


def _slug(kind: str, name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", f"{kind}-{name}").strip("-")


def run_id(kind: str, name: str, identity: dict[str, Any] | None = None) -> str:
    """Run directory name. With ``identity`` deterministic (``<kind>-<name>-<hash>``: the same
    identity finds the same, possibly finished, run: the pipeline's reuse); without it fresh
    (``<time>-<kind>-<name>-<random>``: every standalone command makes a new run)."""
    if identity is not None:
        return f"{_slug(kind, name)}-{stable_hash(identity, 10)}"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{_slug(kind, name)}-{secrets.token_hex(2)}"


def dataset_fingerprint(tracks: pd.DataFrame) -> str:
    """Hash of what a run learns from: track ids, paths, labels, splits, groups and the content
    of every file (its ``fingerprint`` column in whatever scheme, or ``embedkit.identity`` when
    the table has none), so a file replaced in place makes a new dataset, never a reused run."""
    from .identity import with_fingerprints

    t = with_fingerprints(tracks, scheme=None).sort_values("track_id")
    return stable_hash([[r.track_id, r.path, r.label, r.split, r.group, r.fingerprint] for r in t.itertuples()], 16)


# ---------------------------------------------------------------------------------------------
# The one artefact-mismatch check


def diff(stored: Any, given: Any, keys: Sequence[str] | None = None, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Every differing leaf of two JSON-like trees as (dotted path, stored, given), compared
    after a JSON round trip (tuples and lists, 30 and 30.0 of a float field compare equal).
    ``keys``: compare only these top-level keys, in this order (else all, sorted)."""
    from .io import plain

    a, b = plain(stored), plain(given)
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in keys if keys is not None else sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                out += diff(a.get(k), b.get(k), None, f"{prefix}{k}.")
        return out
    return [] if a == b else [(prefix.rstrip(".") or "value", a, b)]


def describe(diffs: list[tuple[str, Any, Any]], labels: tuple[str, str] = ("stored", "given"), n: int = 4) -> str:
    """'path: stored A, given B; ...' for the first ``n`` differences."""
    parts = [f"{p}: {labels[0]} {a!r}, {labels[1]} {b!r}" for p, a, b in diffs[:n]]
    return "; ".join(parts) + ("; ..." if len(diffs) > n else "")


def check_match(
    where: Any,
    what: str,
    stored: Any,
    given: Any,
    keys: Sequence[str] | None = None,
    labels: tuple[str, str] = ("stored", "given"),
) -> None:
    """Raise ConfigMismatchError ``"<where>: <what> (<differences>)"`` unless ``stored`` and
    ``given`` agree (on ``keys`` when given)."""
    d = diff(stored, given, keys)
    if d:
        raise ConfigMismatchError(f"{where}: {what} ({describe(d, labels)})")


# ---------------------------------------------------------------------------------------------
# The run record: the typed head of every metrics.json


@dataclass
class RunRecord:
    """What a run is, as every trainer writes it into metrics.json (schema 2) and the report
    reads it: typed fields instead of guesses from names (timm's ``PretrainedCfg`` is the
    model). A new kind of run fills these fields and appears in the report unedited.

    kind: "head" | "cnn" | "finetune" | any new trainer. backbone / head: the representation and
        what is trained on it ("logmel" + "cnn" for the scratch CNN).
    pretrained: the model starts from pretrained weights (``BackboneSpec.pretrained``).
    weights: where the representation's weights come from (``BackboneSpec.weights``: "none
        (hand-crafted features)", "random ...", a file or hub id; "trained from scratch").
    trains_backbone: the representation itself is trained (scratch CNN, fine-tuning), rather
        than frozen features with a head on top.
    needs_extraction: inference also pays the backbone's embedding extraction (head runs; their
        ``inference_ms_per_track`` is the head alone).
    protocol / dataset / spec / preprocess / config: as evaluate.py's schema describes.
    """

    run_id: str
    kind: str
    name: str
    backbone: str
    head: str
    pretrained: bool
    weights: str
    trains_backbone: bool
    needs_extraction: bool
    protocol: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    spec: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    train_seconds: float | None = None
    inference_ms_per_track: float | None = None
    n_params: int | None = None
    model_bytes: int | None = None
    weights_id: str | None = None
    #: where the network ran (``embedkit.device.provenance``: device, name, precision): the
    #: training device, or for head runs the extraction device of the store. Not in run ids.
    device: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_metrics(cls, m: dict[str, Any]) -> "RunRecord":
        """The record of a metrics.json dict. Schema-1 files (before the record) lack the
        approach fields; they are derived from the kind and, for ``pretrained``, from the
        registered backbone's spec (unknown backbones count as pretrained)."""
        d = {k: m.get(k) for k in (f.name for f in fields(cls))}
        kind = str(d["kind"] or "run")
        d.update(
            kind=kind,
            run_id=str(d["run_id"] or ""),
            name=str(d["name"] or ""),
            backbone=str(d["backbone"] or ""),
            head=str(d["head"] or ""),
        )
        for k in ("protocol", "dataset", "spec", "preprocess", "config", "device"):
            d[k] = d[k] if isinstance(d[k], dict) else {}
        if not isinstance(d["trains_backbone"], bool):
            d["trains_backbone"] = kind in ("cnn", "finetune")
        if not isinstance(d["needs_extraction"], bool):
            d["needs_extraction"] = kind == "head"
        if not isinstance(d["pretrained"], bool) or not isinstance(d["weights"], str):
            reg = registered_spec(d["backbone"], d["spec"])
            if kind == "cnn":
                d["pretrained"], d["weights"] = False, "trained from scratch"
            else:
                d["pretrained"] = spec_pretrained(d["spec"], d["backbone"])
                d["weights"] = reg.weights if reg is not None else str(d["spec"].get("weights") or "")
        return cls(**d)


def registered_spec(backbone: str, spec: dict[str, Any] | None = None):
    """The registered BackboneSpec of this name (or of ``spec["name"]``), else None."""
    from .backbones import list_backbones

    registered = {s.name: s for s in list_backbones()}
    return registered.get(backbone) or registered.get(str((spec or {}).get("name")))


def spec_pretrained(spec: dict[str, Any], backbone: str = "") -> bool:
    """``pretrained`` of a stored backbone spec; specs written before the field existed take
    it from the registered backbone of that name (an unknown backbone counts as pretrained)."""
    if isinstance(spec.get("pretrained"), bool):
        return spec["pretrained"]
    s = registered_spec(backbone, spec)
    return s.pretrained if s is not None else True
