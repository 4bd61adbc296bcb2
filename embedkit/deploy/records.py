"""One answer per song, whatever the door: the decision applied and the result record.

Every door of the deployment stage (``embedkit tag`` with torch or onnxruntime, ``--write-tags``,
``embedkit serve``, ``embedkit stream`` and the library API) goes through this module:

- ``model_rule(tagger_or_path)`` is the decision rule a model carries (the run's
  ``calibration.json``, or the exported model's metadata; read without loading the network), and
  ``applied_rule(model, **overrides)`` that rule with a caller's overrides, named alike at every
  door (``threshold``, ``multi``, ``multi_threshold``, ``margin``, ``max_genres``; see
  ``embedkit.calibration.DecisionRule.with_overrides``).
- ``TrackResult`` is the one result record of a track (what was listened to, the calibrated
  probabilities, the top-k, the decision and the genres under the rule applied, the rule itself),
  built by ``track_result`` from window probabilities. Its writers are the only forms a result
  takes: ``db_row`` (results database), ``to_json`` (JSON Lines and HTTP), ``csv_header`` /
  ``csv_row``, and ``decided`` (what a file's tags receive). A row read back from a database
  under another rule is decided again from its stored probabilities (``redecide``), so a re-run
  with a new threshold changes no probability and every decision.

The decision itself is ``embedkit.calibration.decide``; nothing here or in any door decides a
genre any other way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..calibration import CALIBRATION_FILE, NOT_MUSIC, UNCERTAIN, Calibration, Decision, DecisionRule, decide
from ..errors import EmbedkitError

__all__ = ["TrackResult", "track_result", "model_rule", "applied_rule", "decision_json", "UNCERTAIN", "NOT_MUSIC"]


# ---------------------------------------------------------------------------------------------
# The rule applied


def model_calibration(model) -> Calibration | None:
    """The calibration a model carries: a loaded Tagger's, else read from the run's
    ``calibration.json`` or from an exported ``.onnx`` file's metadata (no network is built).
    None: the model has none (a bare model file outside a run; identity, threshold 0)."""
    if hasattr(model, "labels") and hasattr(model, "calibration"):
        return model.calibration
    from .tagger import resolve_artefact

    artefact = resolve_artefact(model)
    if artefact.suffix.lower() == ".onnx":
        from .onnx_runtime import calibration_from_metadata, read_metadata

        return calibration_from_metadata(read_metadata(artefact))
    run_dir = artefact.parent
    if (run_dir / "metrics.json").exists() and (run_dir / CALIBRATION_FILE).exists():
        from ..calibration import load_calibration

        return load_calibration(run_dir)
    return None


def model_rule(model) -> DecisionRule:
    """The default decision rule of ``model`` (a Tagger, a run directory or a model file)."""
    from ..calibration import rule_of

    return rule_of(model_calibration(model))


def applied_rule(
    model,
    threshold: float | None = None,
    multi: bool | None = None,
    multi_threshold: float | None = None,
    margin: float | None = None,
    max_genres: int | None = None,
    not_music: float | None = None,
) -> DecisionRule:
    """``model``'s stored rule with the caller's overrides (None keeps the stored value)."""
    return model_rule(model).with_overrides(threshold, multi, multi_threshold, margin, max_genres, not_music)


def decision_json(d: Decision, rule: DecisionRule) -> dict[str, Any]:
    """The decision fields every JSON form shares (records, HTTP answers, stream windows)."""
    return {
        "decision": d.label,
        "genres": [{"label": g, "p": float(s)} for g, s in zip(d.genres, d.scores)],
        "confidence": float(d.confidence),
        "not_music": None if d.not_music is None else float(d.not_music),
        "rule": rule.to_dict(),
    }


# ---------------------------------------------------------------------------------------------
# The record


@dataclass
class TrackResult:
    """One track's answer. probabilities: calibrated, in the model's label order; decision: the
    top genre, "uncertain" or "not-music" under ``rule``; not_music: the track's not-music score
    (the mean of its windows'; None when the model has no detector); genres / scores: the genres decided (what a file's
    tags receive; empty when uncertain) and their probabilities; topk: the ``top_k`` most
    probable genres whatever the decision; window_share: with ``excerpt`` "full", the share of
    windows whose top genre is each label."""

    path: str
    fingerprint: str | None
    model_id: str
    labels: list[str]
    probabilities: list[float]
    rule: DecisionRule
    decision: str
    genres: list[str]
    scores: list[float]
    top_k: int = 3
    excerpt: str = "first"
    duration_s: float | None = None
    n_windows: int = 0
    window_starts_s: list[float] | None = None
    window_share: dict[str, float] | None = None
    model_kind: str | None = None
    run_id: str | None = None
    size: int | None = None
    mtime_ns: int | None = None
    inode: int | None = None
    embedkit_version: str | None = None
    not_music: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # kept from a database row (timestamps...)
    #: the track vector for similarity (``embedkit.deploy.vectors.TrackVector``), set by tagging
    #: when the model gives embeddings; stored in ``tag_vectors``, never in the record's forms
    vector: Any = field(default=None, repr=False, compare=False)

    # -- derived ----------------------------------------------------------------------------

    @property
    def p(self) -> np.ndarray:
        return np.asarray(self.probabilities, dtype=np.float64)

    @property
    def top_label(self) -> str:
        return self.labels[int(np.argmax(self.p))]

    @property
    def top_p(self) -> float:
        return float(np.max(self.p))

    @property
    def uncertain(self) -> bool:
        return self.decision == UNCERTAIN

    @property
    def is_not_music(self) -> bool:
        return self.decision == NOT_MUSIC

    @property
    def topk(self) -> list[tuple[str, float]]:
        p = self.p
        order = np.argsort(-p, kind="stable")[: self.top_k]
        return [(self.labels[i], float(p[i])) for i in order]

    def as_decision(self) -> Decision:
        return Decision(self.decision, list(self.genres), list(self.scores), self.top_p, self.not_music)

    def redecide(self, rule: DecisionRule) -> "TrackResult":
        """This result under ``rule`` (the same probabilities, the decision taken again)."""
        from dataclasses import replace

        d = decide(self.p, self.labels, rule, self.not_music)
        return replace(self, rule=rule, decision=d.label, genres=d.genres, scores=d.scores)

    def at(self, path: str) -> "TrackResult":
        """The same result for another path of the same audio (a copy)."""
        from dataclasses import replace

        return replace(self, path=str(path))

    # -- writers ----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """JSON Lines records and the HTTP answer (``embedkit serve`` adds its own fields)."""
        p = self.p
        return {
            "path": self.path,
            "fingerprint": self.fingerprint,
            "model_id": self.model_id,
            "model_kind": self.model_kind,
            "excerpt": self.excerpt,
            "duration_s": self.duration_s,
            "n_windows": self.n_windows,
            "window_starts_s": self.window_starts_s,
            "top_label": self.top_label,
            "top_p": self.top_p,
            **decision_json(self.as_decision(), self.rule),
            "topk": [{"label": l, "p": v} for l, v in self.topk],
            "probabilities": {l: float(v) for l, v in zip(self.labels, p)},
            "window_share": self.window_share,
        }

    def db_row(self) -> dict[str, Any]:
        """The ``tags`` row of the results database (``embedkit.deploy.resultsdb``)."""
        return {
            "fingerprint": self.fingerprint,
            "model_id": self.model_id,
            "path": self.path,
            "size": self.size,
            "mtime": None if self.mtime_ns is None else self.mtime_ns / 1e9,
            "mtime_ns": self.mtime_ns,
            "inode": self.inode,
            "duration_s": self.duration_s,
            "excerpt": self.excerpt,
            "n_windows": self.n_windows,
            "top_label": self.top_label,
            "top_p": self.top_p,
            "decision": self.decision,
            "not_music": self.not_music,
            "genres": [[g, float(s)] for g, s in zip(self.genres, self.scores)],
            "rule": self.rule.to_dict(),
            "topk": [[l, v] for l, v in self.topk],
            "probabilities": {l: float(v) for l, v in zip(self.labels, self.p)},
            "window_share": self.window_share,
            "model_kind": self.model_kind,
            "run_id": self.run_id,
            "embedkit_version": self.embedkit_version,
        }

    @classmethod
    def from_db_row(
        cls, row: dict[str, Any], labels: Sequence[str], rule: DecisionRule, top_k: int = 3
    ) -> "tuple[TrackResult, bool]":
        """A stored row as a record decided under ``rule`` (from its stored probabilities: the
        decision is always taken again, never trusted from the row), and whether the row must
        be rewritten to say so: its decision, genres or (normal form of the) rule differ, or it
        has none recorded (a row written before they were, or by an older embedkit).
        labels: the model's label order (the probabilities JSON is keyed by label)."""
        probs = row["probabilities"]
        if isinstance(probs, str):
            probs = json.loads(probs)
        p = [float(probs[l]) for l in labels]
        nm = row.get("not_music")
        nm = None if nm is None or not np.isfinite(float(nm)) else float(nm)
        d = decide(np.asarray(p), labels, rule, nm)
        known = set(cls.__dataclass_fields__)
        r = cls(
            path=str(row["path"]),
            fingerprint=row.get("fingerprint"),
            model_id=row["model_id"],
            labels=list(labels),
            probabilities=p,
            rule=rule,
            decision=d.label,
            genres=d.genres,
            scores=d.scores,
            top_k=top_k,
            excerpt=row.get("excerpt") or "first",
            duration_s=row.get("duration_s"),
            n_windows=int(row.get("n_windows") or 0),
            window_starts_s=None,
            window_share=row.get("window_share"),
            model_kind=row.get("model_kind"),
            run_id=row.get("run_id"),
            size=row.get("size"),
            mtime_ns=row.get("mtime_ns"),
            inode=row.get("inode"),
            embedkit_version=row.get("embedkit_version"),
            not_music=nm,
            extra={k: v for k, v in row.items() if k not in known},
        )
        try:
            stored_rule = DecisionRule.from_dict(row.get("rule")) if row.get("rule") is not None else None
            stored_genres = [str(g) for g, _ in (row.get("genres") or [])] if row.get("genres") is not None else None
        except (EmbedkitError, TypeError, ValueError):  # unreadable: rewritten under this rule
            stored_rule = stored_genres = None
        changed = (
            stored_rule is None
            or stored_genres is None
            or stored_rule.normal() != rule.normal()
            or stored_genres != d.genres
            or row.get("decision") != d.label
        )
        return r, changed

    @staticmethod
    def csv_header(labels: Sequence[str]) -> list[str]:
        return [
            "path",
            "fingerprint",
            "model_id",
            "excerpt",
            "n_windows",
            "top_label",
            "top_p",
            "decision",
            "genres",
            "threshold",
            "not_music",
            "not_music_threshold",
            "topk",
            *[f"p_{l}" for l in labels],
            *[f"share_{l}" for l in labels],
        ]

    def csv_row(self) -> list[Any]:
        share = self.window_share or {}
        return [
            self.path,
            self.fingerprint,
            self.model_id,
            self.excerpt,
            self.n_windows,
            self.top_label,
            f"{self.top_p:.6f}",
            self.decision,
            ";".join(f"{g}:{s:.4f}" for g, s in zip(self.genres, self.scores)),
            f"{self.rule.threshold:g}",
            "" if self.not_music is None else f"{self.not_music:.6f}",
            "" if self.rule.not_music is None else f"{self.rule.not_music:g}",
            ";".join(f"{l}:{v:.4f}" for l, v in self.topk),
            *[f"{v:.6f}" for v in self.probabilities],
            *[f"{share[l]:.6f}" if l in share else "" for l in self.labels],
        ]


def track_result(
    tagger,
    p_windows: np.ndarray,
    rule: DecisionRule,
    *,
    path: str,
    fingerprint: str | None = None,
    excerpt: str = "first",
    top_k: int = 3,
    duration_s: float | None = None,
    window_starts_s: Sequence[float] | None = None,
    stat=None,
    not_music: np.ndarray | None = None,
) -> TrackResult:
    """Window probabilities [K, C] (uncalibrated, from ``tagger.predict_segments``) -> the
    track's record: mean over windows, calibration (``Tagger.track_probabilities``), then the
    one decision (``embedkit.calibration.decide``) under ``rule``. stat: the file's
    ``identity.FileStat`` (size, mtime_ns, inode), when there is a file. not_music: the
    windows' not-music scores [K] (``Tagger.score_segments``); the track's is their mean."""
    from .. import __version__

    p_windows = np.asarray(p_windows, dtype=np.float64)
    p = tagger.track_probabilities(p_windows)
    labels = list(tagger.labels)
    nm = None if not_music is None or len(not_music) == 0 else float(np.mean(not_music))
    d = decide(p, labels, rule, nm)
    share = None
    if excerpt == "full":
        counts = np.bincount(p_windows.argmax(axis=1), minlength=len(labels))
        share = {l: float(counts[i] / len(p_windows)) for i, l in enumerate(labels)}
    return TrackResult(
        path=str(path),
        fingerprint=fingerprint,
        model_id=tagger.model_id,
        labels=labels,
        probabilities=[float(v) for v in p],
        rule=rule,
        decision=d.label,
        genres=d.genres,
        scores=d.scores,
        top_k=top_k,
        excerpt=str(excerpt),
        duration_s=None if duration_s is None else float(duration_s),
        n_windows=int(len(p_windows)),
        window_starts_s=None if window_starts_s is None else [float(s) for s in window_starts_s],
        window_share=share,
        model_kind=tagger.kind,
        run_id=(tagger.meta or {}).get("run_id"),
        size=None if stat is None else int(stat.size),
        mtime_ns=None if stat is None else int(stat.mtime_ns),
        inode=None if stat is None else int(stat.inode),
        embedkit_version=__version__,
        not_music=nm,
    )
