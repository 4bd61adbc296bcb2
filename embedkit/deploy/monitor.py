"""Are the tags going into a library getting worse? ``embedkit monitor`` and ``/metrics``.

    summary = summarise("library.sqlite", period="week")      # per model, per period
    breaches = check(summary, Limits(max_not_music=0.10))     # one line per breached limit
    build_monitor("library.sqlite", "monitor.html")           # one self-contained page

Read from the results database of ``embedkit tag`` / ``embedkit serve --db`` (never written: a
plain path that does not exist is an error, not a new database), per model and per period (day
or ISO week of ``created_at``, UTC: when the audio was first tagged by that model):

- tracks tagged; the uncertain rate; the not-music rate (``embedkit.calibration.NOT_MUSIC``);
- the genre mix of the tracks given a genre, against the model's training prior (the label mix
  of its held-out tracks, stored in the run's calibration.json; for a model whose run is not at
  hand or predates it, the mix of all its rows in the database), with a drift statistic: the
  population stability index PSI = sum_g (q_g - p_g) ln(q_g / p_g) over genres (shares floored
  at 0.5 / n so an empty genre stays finite). A genre's share doubling from 10 % to 20 % gives
  PSI ~ 0.08; sampling noise alone gives ~ (G - 1) / n (0.02 for 10 genres and 400 tracks), so
  drift is only checked on periods with at least ``Limits.min_tracks`` tracks;
- the confidence distribution (top calibrated probability) and the not-music scores;
- live accuracy: tracks of the period whose audio a person labelled in the review queue's random
  audit (``labels`` rows with source "audit-sample"), the share whose decided genre is that
  label, with a 95 % Wilson interval.

``check`` compares the latest period of each model with ``Limits`` (uncertain rate, not-music
rate, drift) and returns one line per breach; ``embedkit monitor --check`` prints them and exits
1. ``DecisionMetrics`` are the same figures as Prometheus metrics, for ``embedkit serve``'s
``/metrics``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..calibration import NOT_MUSIC, UNCERTAIN
from ..errors import DatabaseError, EmbedkitError, first_line
from .library import wilson

PERIODS = ("day", "week")
#: columns a database must have to be monitored (older embedkits lack some)
REQUIRED = ("fingerprint", "model_id", "decision", "top_p", "probabilities", "created_at")
AUDIT_SOURCE = "audit-sample"


@dataclass
class Limits:
    """What ``check`` flags in a model's latest period: rates above ``max_uncertain`` /
    ``max_not_music``, PSI above ``max_drift`` (only with at least ``min_tracks`` tracks)."""

    max_uncertain: float = 0.35
    max_not_music: float = 0.10
    max_drift: float = 0.05
    min_tracks: int = 100

    def __post_init__(self):
        for name in ("max_uncertain", "max_not_music"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise EmbedkitError(f"--{name.replace('_', '-')} must be between 0 and 1, got {v}")
        if self.max_drift < 0:
            raise EmbedkitError(f"--max-drift must be >= 0, got {self.max_drift}")
        if self.min_tracks < 1:
            raise EmbedkitError(f"--min-tracks must be >= 1, got {self.min_tracks}")


# ---------------------------------------------------------------------------------------------
# Prometheus


class DecisionMetrics:
    """Prometheus figures of the decisions a process made (``embedkit serve``): histograms of
    the confidence and of the not-music score, decisions per genre (and "uncertain",
    "not-music"), and gauges of the uncertain and not-music rates since the start."""

    def __init__(self, registry):
        from prometheus_client import Counter, Gauge, Histogram

        r = registry
        self.confidence = Histogram(
            "embedkit_confidence",
            "Top calibrated probability per tagged track",
            buckets=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
            registry=r,
        )
        self.not_music = Histogram(
            "embedkit_not_music_score",
            "Not-music score per tagged track (models with a detector)",
            buckets=(0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0, 2.0),
            registry=r,
        )
        self.decisions = Counter(
            "embedkit_decisions_total", "Decisions by value (a genre, uncertain, not-music)", ["decision"], registry=r
        )
        self.uncertain_rate = Gauge("embedkit_uncertain_rate", "Share of tracks decided 'uncertain'", registry=r)
        self.not_music_rate = Gauge("embedkit_not_music_rate", "Share of tracks decided 'not-music'", registry=r)
        self._n = {"all": 0, UNCERTAIN: 0, NOT_MUSIC: 0}

    def observe(self, result) -> None:
        """Count one ``TrackResult``."""
        self.confidence.observe(float(result.top_p))
        if result.not_music is not None:
            self.not_music.observe(float(result.not_music))
        self.decisions.labels(decision=result.decision).inc()
        self._n["all"] += 1
        if result.decision in (UNCERTAIN, NOT_MUSIC):
            self._n[result.decision] += 1
        self.uncertain_rate.set(self._n[UNCERTAIN] / self._n["all"])
        self.not_music_rate.set(self._n[NOT_MUSIC] / self._n["all"])


# ---------------------------------------------------------------------------------------------
# Reading the database (read-only)


def _engine(db: str | os.PathLike):
    import sqlalchemy as sa

    from .resultsdb import _safe, database_url

    s = str(db)
    if "://" not in s and not Path(s).expanduser().is_file():
        raise DatabaseError(f"{s}: no such database")
    url = database_url(db)
    try:
        engine = sa.create_engine(url)
        names = set(sa.inspect(engine).get_table_names())
    except Exception as exc:  # noqa: BLE001 - any driver error is one line
        raise DatabaseError(f"{_safe(url)}: cannot open ({first_line(exc)})") from None
    if "tags" not in names:
        raise DatabaseError(f"{s}: not an embedkit results database (no tags table)")
    have = {c["name"] for c in sa.inspect(engine).get_columns("tags")}
    missing = [c for c in REQUIRED if c not in have]
    if missing:
        raise DatabaseError(
            f"{s}: made by another embedkit version (tags has no {', '.join(missing)} column); "
            "run `embedkit tag RUN ... --db` with this version once to upgrade it"
        )
    return engine, names, have


def _to_utc(v) -> _dt.datetime | None:
    if v is None:
        return None
    if isinstance(v, str):
        v = _dt.datetime.fromisoformat(v)
    return v.replace(tzinfo=_dt.timezone.utc) if v.tzinfo is None else v.astimezone(_dt.timezone.utc)


def read_rows(db: str | os.PathLike, model: str | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(tag rows [{model_id, fingerprint, created_at, decision, top_p, not_music, genres,
    probabilities}], {model_id: {labels, artefact, run_id}}) of ``db``; ``model``: one model id
    (a unique prefix is enough). DatabaseError, one line, for an unusable database, one without
    rows, or a model id with none."""
    import sqlalchemy as sa

    engine, names, have = _engine(db)
    cols = ["model_id", "fingerprint", "created_at", "decision", "top_p", "probabilities"]
    cols += [c for c in ("not_music", "genres", "path") if c in have]
    models: dict[str, Any] = {}
    try:
        with engine.connect() as c:
            counts = dict(c.execute(sa.text("SELECT model_id, COUNT(*) FROM tags GROUP BY model_id")).all())
            if not counts:
                raise DatabaseError(f"{db}: no tagged tracks yet (run `embedkit tag RUN ... --db {db}` first)")
            if model is not None:
                match = [m for m in counts if m == model] or [m for m in counts if m.startswith(model)]
                if len(match) != 1:
                    known = ", ".join(f"{m[:12]} ({n} rows)" for m, n in sorted(counts.items()))
                    why = "no rows for" if not match else "several models match"
                    raise DatabaseError(f"{db}: {why} model {model}; models in the database: {known}")
                model = match[0]
            q = f"SELECT {', '.join(cols)} FROM tags" + (" WHERE model_id = :m" if model else "")
            rows = [dict(r._mapping) for r in c.execute(sa.text(q), {"m": model} if model else {})]
            if "tag_models" in names:
                for r in c.execute(sa.text("SELECT * FROM tag_models")):
                    m = dict(r._mapping)
                    models[m["model_id"]] = m
            labels = []
            if "labels" in names:
                labels = [
                    dict(r._mapping)
                    for r in c.execute(
                        sa.text(
                            "SELECT fingerprint, label, updated_at FROM labels WHERE source = :s ORDER BY updated_at"
                        ),
                        {"s": AUDIT_SOURCE},
                    )
                ]
    except DatabaseError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DatabaseError(f"{db}: cannot read ({first_line(exc)})") from None
    finally:
        engine.dispose()
    audit = {r["fingerprint"]: r["label"] for r in labels}  # the latest label of each audio
    for r in rows:
        r["created_at"] = _to_utc(r["created_at"])
        for k in ("probabilities", "genres"):
            if isinstance(r.get(k), str):
                r[k] = json.loads(r[k])
        r["audit_label"] = audit.get(r["fingerprint"])
    return rows, models


def _prior(model_row: dict[str, Any] | None) -> dict[str, float] | None:
    """The training label mix stored with the model's run (calibration.json), when at hand."""
    from ..calibration import CALIBRATION_FILE

    art = (model_row or {}).get("artefact")
    if not art:
        return None
    path = Path(art).parent / CALIBRATION_FILE
    try:
        prior = json.loads(path.read_text(encoding="utf-8")).get("fitted_on", {}).get("prior")
    except (OSError, ValueError):
        return None
    return {str(k): float(v) for k, v in prior.items()} if isinstance(prior, dict) else None


# ---------------------------------------------------------------------------------------------
# Figures


def period_of(t: _dt.datetime, period: str) -> str:
    """ "2026-W49" (ISO week) or "2026-12-07" (day) of a UTC time."""
    if period == "day":
        return t.date().isoformat()
    y, w, _ = t.isocalendar()
    return f"{y}-W{w:02d}"


def psi(q: dict[str, float], p: dict[str, float], n: int) -> float:
    """Population stability index of the mix ``q`` (from ``n`` tracks) against ``p``."""
    floor = 0.5 / max(n, 1)
    keys = set(p) | set(q)
    return float(
        sum(
            (max(q.get(g, 0), floor) - max(p.get(g, 0), floor))
            * math.log(max(q.get(g, 0), floor) / max(p.get(g, 0), floor))
            for g in keys
        )
    )


CONF_BINS = [0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0001]


def summarise(db: str | os.PathLike, period: str = "week", model: str | None = None) -> dict[str, Any]:
    """{db, period, models: [{model_id, kind, run_id, labels, prior, prior_source, periods:
    [{period, n, uncertain_rate, not_music_rate, mix, drift, confidence_hist, not_music_median,
    audit_n, accuracy, accuracy_ci}]}]} (periods oldest first)."""
    if period not in PERIODS:
        raise EmbedkitError(f"--period must be one of {', '.join(PERIODS)}, got {period!r}")
    rows, models = read_rows(db, model)
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["created_at"] is not None:
            by_model.setdefault(r["model_id"], []).append(r)
    out = []
    for mid, rs in sorted(by_model.items()):
        info = models.get(mid) or {}
        labels = info.get("labels")
        labels = json.loads(labels) if isinstance(labels, str) else labels
        labels = list(labels or next(iter(rs))["probabilities"])
        given = [r["decision"] for r in rs if r["decision"] not in (UNCERTAIN, NOT_MUSIC)]
        prior, source = _prior(info), "the training tracks' label mix (calibration.json)"
        if prior is None:
            n_all = max(len(given), 1)
            prior = {g: given.count(g) / n_all for g in labels}
            source = "the mix of all this model's rows (its run's training prior was not at hand)"
        periods: dict[str, list[dict[str, Any]]] = {}
        for r in sorted(rs, key=lambda r: r["created_at"]):
            periods.setdefault(period_of(r["created_at"], period), []).append(r)
        pl = []
        for name, prs in periods.items():
            n = len(prs)
            dec = [r["decision"] for r in prs]
            g = [d for d in dec if d not in (UNCERTAIN, NOT_MUSIC)]
            mix = {lab: (g.count(lab) / len(g) if g else 0.0) for lab in labels}
            conf = np.array([float(r["top_p"]) for r in prs])
            nm = np.array([float(r["not_music"]) for r in prs if r.get("not_music") is not None])
            audited = [r for r in prs if r["audit_label"] is not None]
            right = sum(r["decision"] == r["audit_label"] for r in audited)
            pl.append(
                {
                    "period": name,
                    "n": n,
                    "n_genre": len(g),
                    "uncertain_rate": dec.count(UNCERTAIN) / n,
                    "not_music_rate": dec.count(NOT_MUSIC) / n,
                    "mix": mix,
                    "drift": psi(mix, prior, len(g)) if g else None,
                    "confidence_hist": np.histogram(conf, bins=CONF_BINS)[0].tolist(),
                    "confidence_median": float(np.median(conf)),
                    "not_music_median": float(np.median(nm)) if len(nm) else None,
                    "audit_n": len(audited),
                    "accuracy": right / len(audited) if audited else None,
                    "accuracy_ci": list(wilson(right, len(audited))) if audited else None,
                }
            )
        out.append(
            {
                "model_id": mid,
                "kind": info.get("kind"),
                "run_id": info.get("run_id"),
                "labels": labels,
                "prior": prior,
                "prior_source": source,
                "periods": pl,
            }
        )
    return {"db": str(db), "period": period, "models": out}


def check(summary: dict[str, Any], limits: Limits | None = None) -> list[str]:
    """One line per limit breached by a model's latest period (empty: all within limits)."""
    lim = limits or Limits()
    lines = []
    for m in summary["models"]:
        if not m["periods"]:
            continue
        p = m["periods"][-1]
        who = f"model {m['model_id'][:12]}{' (' + m['run_id'] + ')' if m.get('run_id') else ''} {p['period']}"
        if p["uncertain_rate"] > lim.max_uncertain:
            lines.append(f"{who}: uncertain rate {p['uncertain_rate']:.1%} > {lim.max_uncertain:.1%} ({p['n']} tracks)")
        if p["not_music_rate"] > lim.max_not_music:
            lines.append(f"{who}: not-music rate {p['not_music_rate']:.1%} > {lim.max_not_music:.1%} ({p['n']} tracks)")
        if p["drift"] is not None and p["n_genre"] >= lim.min_tracks and p["drift"] > lim.max_drift:
            top = max(m["labels"], key=lambda g: p["mix"].get(g, 0) - m["prior"].get(g, 0))
            lines.append(
                f"{who}: genre drift PSI {p['drift']:.3f} > {lim.max_drift:g} "
                f"(largest rise: {top} {m['prior'].get(top, 0):.1%} -> {p['mix'].get(top, 0):.1%})"
            )
    return lines


# ---------------------------------------------------------------------------------------------
# The page


def _charts(m: dict[str, Any]) -> dict[str, Any]:
    from ..report import charts

    ps = m["periods"]
    xs = list(range(1, len(ps) + 1))
    rates = charts.line_chart(
        [
            {"name": "uncertain", "xs": xs, "ys": [p["uncertain_rate"] for p in ps], "color": charts.color(0)},
            {"name": "not-music", "xs": xs, "ys": [p["not_music_rate"] for p in ps], "color": charts.color(1)},
        ],
        "Uncertain and not-music rates per period",
        "period (1 = oldest)",
        "share of tracks",
        y_range=(0.0, 1.0),
    )
    drift = charts.line_chart(
        [
            {
                "name": "PSI vs prior",
                "xs": xs,
                "ys": [p["drift"] if p["drift"] is not None else float("nan") for p in ps],
                "color": charts.color(2),
            }
        ],
        "Genre drift (PSI against the training prior)",
        "period (1 = oldest)",
        "PSI",
    )
    last = ps[-1] if ps else None
    mix = charts.hbar_chart(
        [(g, 100 * last["mix"].get(g, 0)) for g in m["labels"]] if last else [],
        f"Genre mix, {last['period'] if last else ''} (%)",
        value_fmt=lambda v: f"{v:.1f}",
    )
    return {"rates": rates, "drift": drift, "mix": mix}


def render(summary: dict[str, Any], limits: Limits, breaches: list[str]) -> str:
    from .. import __version__
    from ..report.build import template_environment

    env = template_environment()  # the report's: the same filters (pct, f3) on both pages
    models = [{**m, "charts": _charts(m)} for m in summary["models"]]
    return env.get_template("monitor.html").render(
        title="embedkit monitor",
        summary=summary,
        models=models,
        limits=limits,
        breaches=breaches,
        conf_bins=CONF_BINS,
        version=__version__,
        generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )


def build_monitor(
    db: str | os.PathLike,
    out: str | os.PathLike = "monitor.html",
    period: str = "week",
    model: str | None = None,
    limits: Limits | None = None,
) -> tuple[Path, dict[str, Any], list[str]]:
    """Write the monitoring page of ``db`` to ``out`` (atomically); returns (path, summary,
    breaches)."""
    from ..io import atomic_write_bytes

    limits = limits or Limits()
    summary = summarise(db, period, model)
    breaches = check(summary, limits)
    out = Path(out)
    try:
        atomic_write_bytes(out, render(summary, limits, breaches).encode("utf-8"))
    except OSError as exc:
        raise EmbedkitError(f"{out}: cannot write the page ({exc.strerror or exc})") from None
    return out, summary, breaches
