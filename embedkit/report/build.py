"""Runs (metrics.json) -> one self-contained HTML comparison.

``build_report(paths, out)`` finds every run under ``paths`` (see ``evaluate.load_runs``),
turns each into a view model with every optional field defaulted (missing numbers render as
"—"), derives the written comparison from the numbers, renders ``templates/report.html`` with
Jinja (autoescape on) and writes the file atomically. The page has no scripts, fonts, images
or links outside itself: CSS is inlined and charts are inline SVG (see ``charts.py``).
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ReportError, first_line
from . import charts

DASH = "—"


# ---------------------------------------------------------------------------------------------
# Loading


def discover(paths: list[str | os.PathLike]) -> list[Path]:
    """metrics.json files under ``paths``, with the same rules as ``evaluate.load_runs``."""
    from ..evaluate import find_metrics_files

    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"{p}: no such file or directory")
        if p.is_file() and p.name != "metrics.json":
            raise ReportError(f"{p}: not a run directory or metrics.json")
    found = find_metrics_files(paths)
    seen, out = set(), []
    for f in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def load(paths: list[str | os.PathLike]) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """(usable runs, skipped [{path, reason}]). One bad file never sinks the whole report."""
    from ..evaluate import load_runs

    runs, skipped = [], []
    for f in discover(paths):
        try:
            (m,) = load_runs([f])
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, OSError) as exc:
            skipped.append({"path": str(f), "reason": f"unreadable metrics.json ({first_line(exc, with_type=True)})"})
            continue
        if not isinstance(m, dict):
            skipped.append({"path": str(f), "reason": "metrics.json is not a JSON object"})
        elif _num(m.get("track_accuracy")) is None:
            skipped.append({"path": str(f), "reason": "no numeric track_accuracy"})
        else:
            runs.append(m)
    return runs, skipped


# ---------------------------------------------------------------------------------------------
# Small helpers


def _num(v) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _dict(v) -> dict:
    return v if isinstance(v, dict) else {}


def _list(v) -> list:
    return v if isinstance(v, list) else []


def pct(v, digits: int = 1) -> str:
    v = _num(v)
    return DASH if v is None else f"{100 * v:.{digits}f} %"


def pct_pm(v, std, digits: int = 1) -> str:
    v, std = _num(v), _num(std)
    if v is None:
        return DASH
    return f"{100 * v:.{digits}f} ± {100 * std:.{digits}f} %" if std is not None else f"{100 * v:.{digits}f} %"


def seconds(v) -> str:
    v = _num(v)
    if v is None:
        return DASH
    if v < 1:
        return f"{v * 1000:.0f} ms"
    if v < 120:
        return f"{v:.1f} s"
    if v < 7200:
        return f"{v / 60:.1f} min"
    return f"{v / 3600:.1f} h"


def millis(v) -> str:
    v = _num(v)
    if v is None:
        return DASH
    return f"{v:.3g} ms" if v < 100 else f"{v:,.0f} ms"


def nbytes(v) -> str:
    v = _num(v)
    if v is None:
        return DASH
    for unit in ("B", "KB", "MB", "GB"):
        if v < 1000 or unit == "GB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.3g} {unit}"
        v /= 1000
    return DASH  # pragma: no cover


def count(v) -> str:
    v = _num(v)
    if v is None:
        return DASH
    if v >= 1e6:
        return f"{v / 1e6:.3g} M"
    if v >= 1e4:
        return f"{v / 1e3:.3g} k"
    return f"{v:,.0f}"


def value(v) -> str:
    """Any JSON value as a short string for the spec tables."""
    if v is None or v == "":
        return DASH
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(value(x) for x in v) if len(v) <= 12 else f"[{len(v)} values]"
    return str(v)


def flatten(d: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested dict -> [("a.b", "value")] for key/value tables."""
    out: list[tuple[str, str]] = []
    if not isinstance(d, dict):
        return [(prefix or "value", value(d))] if d not in (None, {}, []) else []
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.extend(flatten(v, key))
        else:
            out.append((key, value(v)))
    return out


def file_name(path: str, track_id: str) -> str:
    return Path(path).name if path else (track_id or DASH)


# ---------------------------------------------------------------------------------------------
# View model


@dataclass
class RunView:
    m: dict[str, Any]
    rank: int = 0
    color: str = charts.PALETTE[0]
    label: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    # --- identity -------------------------------------------------------------------------
    @functools.cached_property
    def record(self):
        """The typed run record (``runs.RunRecord``; derived for schema-1 files)."""
        from ..runs import RunRecord

        return RunRecord.from_metrics(self.m)

    @property
    def run_id(self) -> str:
        return str(self.m.get("run_id") or Path(self.m.get("run_dir", "run")).name)

    @property
    def kind(self) -> str:
        return str(self.m.get("kind") or "run")

    @property
    def name(self) -> str:
        return str(self.m.get("name") or self.run_id)

    @property
    def backbone(self) -> str:
        return str(self.m.get("backbone") or "")

    @property
    def head(self) -> str:
        return str(self.m.get("head") or "")

    @property
    def pretrained_embedding(self) -> bool:
        """A frozen pretrained network's embeddings + a head."""
        return self.record.pretrained and not self.record.trains_backbone and bool(self.backbone)

    @property
    def from_scratch(self) -> bool:
        """A network trained from random weights on this data (the scratch CNN)."""
        return self.record.trains_backbone and not self.record.pretrained

    @property
    def fine_tuned(self) -> bool:
        return self.record.trains_backbone and self.record.pretrained

    @property
    def hand_crafted(self) -> bool:
        """Features with no weights at all (``BackboneSpec.weights`` "none ...") + a head."""
        r = self.record
        return not r.pretrained and not r.trains_backbone and r.weights.startswith("none")

    @property
    def anchor(self) -> str:
        return f"run-{self.rank}"

    # --- accuracy -------------------------------------------------------------------------
    def get(self, key: str) -> float | None:
        return _num(self.m.get(key))

    @property
    def acc(self) -> float:
        return self.get("track_accuracy") or 0.0

    @property
    def acc_std(self) -> float | None:
        return self.get("track_accuracy_std")

    @property
    def protocol(self) -> dict:
        return _dict(self.m.get("protocol"))

    @property
    def protocol_text(self) -> str:
        return protocol_text(self.protocol)

    @property
    def protocol_short(self) -> str:
        p = self.protocol
        if p.get("type") == "cv":
            return f"{p.get('k', '?')}-fold CV"
        if p.get("type") == "holdout" and _num(p.get("test_size")) is not None:
            return f"holdout {_num(p.get('test_size')):.0%}"
        return {"split": "dataset split"}.get(str(p.get("type")), str(p.get("type") or DASH))

    @property
    def labels(self) -> list[str]:
        return [str(x) for x in _list(self.m.get("labels"))]

    @property
    def per_class(self) -> list[dict]:
        pc = _dict(self.m.get("per_class"))
        order = self.labels or list(pc)
        rows = []
        for lab in order:
            r = _dict(pc.get(lab))
            rows.append(
                {
                    "label": lab,
                    "precision": _num(r.get("precision")),
                    "recall": _num(r.get("recall")),
                    "f1": _num(r.get("f1")),
                    "support": _num(r.get("support")),
                }
            )
        return rows if pc else []

    def f1(self, label: str) -> float | None:
        return _num(_dict(_dict(self.m.get("per_class")).get(label)).get("f1"))

    @property
    def n_test_tracks(self) -> int | None:
        folds = [_num(_dict(f).get("n_test_tracks")) for f in _list(self.m.get("folds"))]
        folds = [f for f in folds if f is not None]
        return int(sum(folds)) if folds else None

    @property
    def misclassified(self) -> list[dict]:
        out = []
        for r in _list(self.m.get("misclassified"))[:10]:
            r = _dict(r)
            out.append(
                {
                    "file": file_name(str(r.get("path") or ""), str(r.get("track_id") or "")),
                    "path": str(r.get("path") or r.get("track_id") or ""),
                    "true": str(r.get("true", DASH)),
                    "pred": str(r.get("pred", DASH)),
                    "confidence": pct(r.get("confidence")),
                    "fold": str(r.get("fold") or DASH),
                }
            )
        return out

    @property
    def has_misclassified_field(self) -> bool:
        return "misclassified" in self.m

    # --- cost -----------------------------------------------------------------------------
    @property
    def extract_ms(self) -> float | None:
        """Embedding extraction per track (head runs only; trainers on audio have none)."""
        ex = _dict(self.m.get("extraction"))
        return _num(self.m.get("extract_ms_per_track")) or _num(ex.get("ms_per_track"))

    @property
    def extract_s(self) -> float | None:
        ex = _dict(self.m.get("extraction"))
        return _num(self.m.get("extract_seconds")) or _num(ex.get("seconds"))

    @property
    def needs_extraction(self) -> bool:
        return self.record.needs_extraction

    def _with_extraction(self, own: float | None, extraction: float | None) -> float | None:
        """A run's own cost plus the extraction cost when the model needs embeddings (None
        when either part is unknown)."""
        if own is None or not self.needs_extraction:
            return own
        return own + extraction if extraction is not None else None

    @property
    def infer_ms_total(self) -> float | None:
        """End-to-end inference per track: extraction (when the model needs it) + model."""
        return self._with_extraction(self.get("inference_ms_per_track"), self.extract_ms)

    @property
    def build_s_total(self) -> float | None:
        return self._with_extraction(self.get("train_seconds"), self.extract_s)


def _taxonomy_view(tax) -> dict | None:
    """A dataset labelled by its files' genre tags (``embedkit.taxonomy``): what was merged into
    each class and what was dropped, and why."""
    if not isinstance(tax, dict):
        return None
    merged: dict[str, list[str]] = {}
    for raw, cls in (tax.get("mapping") or {}).items():
        if cls is not None and raw != cls:
            merged.setdefault(str(cls), []).append(str(raw))
    dropped = {**(tax.get("dropped_values") or {}), **(tax.get("dropped_classes") or {})}
    return {
        "genre_map": tax.get("genre_map") or "none",
        "min_tracks": tax.get("min_tracks"),
        "policy": tax.get("multi_value_policy") or DASH,
        "merged": sorted((c, ", ".join(sorted(r))) for c, r in merged.items()),
        "dropped": sorted((str(k), str(v)) for k, v in dropped.items()),
        "not_used": sorted((str(k), int(v)) for k, v in (tax.get("tracks_not_used") or {}).items()),
    }


def protocol_text(p: dict) -> str:
    t = p.get("type")
    by = f"grouped by {p['group_by']}" if p.get("group_by") else "grouped"
    tags = [x for x, on in ((by, p.get("grouped")),) if on]
    seed = f", seed {p['seed']}" if p.get("seed") is not None else ""
    if t == "cv":
        return f"{p.get('k', '?')}-fold stratified CV{seed}" + (" (" + ", ".join(tags) + ")" if tags else "")
    if t == "holdout":
        ts = _num(p.get("test_size"))
        return f"stratified holdout {ts:.0%} test{seed}" if ts is not None else f"holdout{seed}"
    if t == "split":
        return "the dataset's own train/test split"
    return str(t) if t else DASH


# ---------------------------------------------------------------------------------------------
# Learning curves: trainers may store one fold or several, as series or as per-epoch records.


#: per-epoch keys that are bookkeeping or timing, not learning metrics
_NOT_CURVES = {"epoch", "epochs", "fold", "lr", "phase", "step", "best_epoch", "stopped"}


def _is_curve_key(k: str) -> bool:
    return k not in _NOT_CURVES and not k.endswith("_s") and "second" not in k


def normalise_curves(lc: Any) -> list[tuple[str, dict[str, list[float]]]]:
    """Accepts {metric: [..]}, [{metric: [..]} per fold], {fold: {metric: [..]}},
    [{epoch, metric: v} per epoch], {fold: [per-epoch records]} (what embedkit.cnn writes), or
    {"folds": ..., "epochs": ...}; returns [(fold name, {metric: [value per epoch]})] with
    numeric learning metrics only (timings and phase labels are dropped; None -> NaN)."""

    def val(x) -> float:
        v = _num(x)
        return float("nan") if v is None else v

    def series(d: dict) -> dict[str, list[float]]:
        out = {}
        for k, v in d.items():
            if (
                _is_curve_key(str(k))
                and isinstance(v, list)
                and v
                and all(x is None or _num(x) is not None for x in v)
                and any(_num(x) is not None for x in v)
            ):
                out[str(k)] = [val(x) for x in v]
        return out

    def is_records(rs: Any) -> bool:
        return (
            isinstance(rs, list)
            and bool(rs)
            and all(isinstance(r, dict) and not any(isinstance(v, (list, dict)) for v in r.values()) for r in rs)
        )

    def records(rs: list) -> dict[str, list[float]]:
        keys: list[str] = []
        for r in rs:
            for k, v in r.items():
                if _is_curve_key(str(k)) and _num(v) is not None and k not in keys:
                    keys.append(k)
        return {str(k): [val(r.get(k)) for r in rs] for k in keys}

    if is_records(lc):
        s = records(lc)
        return [("", s)] if s else []
    if isinstance(lc, dict):
        if "folds" in lc:
            return normalise_curves(lc["folds"])
        if is_records(lc.get("epochs")):
            return [("", records(lc["epochs"]))]
        direct = series(lc)
        if direct:
            return [("", direct)]
        out = []
        for name, v in lc.items():
            out.extend((str(name) if not n else f"{name} {n}", s) for n, s in normalise_curves(v))
        return out
    if isinstance(lc, list):
        out = []
        for i, x in enumerate(lc):
            if not isinstance(x, dict):
                continue
            name = str(x.get("fold", f"fold{i}"))
            rest = {k: v for k, v in x.items() if k != "fold"}
            sub = normalise_curves(rest.get("history", rest.get("epochs", rest)))
            if len(sub) == 1 and sub[0][1]:
                out.append((name, sub[0][1]))
        return out
    return []


def curve_charts(lc: Any, run_name: str) -> list:
    """One SVG per panel (losses, accuracies, other), each fold a thin line and the fold mean
    bold, so early-stopped folds of different lengths still read."""
    folds = [(n, s) for n, s in normalise_curves(lc) if s]
    if not folds:
        return []
    metrics = []
    for _, s in folds:
        for k in s:
            if k not in metrics:
                metrics.append(k)
    panels = {
        "loss": [m for m in metrics if "loss" in m.lower()],
        "accuracy": [m for m in metrics if "acc" in m.lower()],
    }
    panels["other"] = [m for m in metrics if m not in panels["loss"] and m not in panels["accuracy"]]
    out = []
    for panel, ms in panels.items():
        if not ms:
            continue
        series = []
        for ci, m in enumerate(ms):
            col = charts.color(ci)
            dash = "5 3" if m.lower().startswith(("train", "tr_")) else None
            per_fold = [s[m] for _, s in folds if m in s]
            if len(per_fold) > 1:
                for ys in per_fold:
                    series.append(
                        {"name": m, "ys": ys, "color": col, "width": 1, "opacity": 0.3, "legend": False, "dash": dash}
                    )
            n = max(len(ys) for ys in per_fold)
            mean = []
            for e in range(n):
                vals = [ys[e] for ys in per_fold if e < len(ys) and math.isfinite(ys[e])]
                mean.append(sum(vals) / len(vals) if vals else float("nan"))
            series.append(
                {
                    "name": m + (" (fold mean)" if len(per_fold) > 1 else ""),
                    "ys": mean,
                    "color": col,
                    "width": 2.2,
                    "dash": dash,
                }
            )
        y_range = None
        if panel == "accuracy":
            vals = [v for s in series for v in s["ys"] if math.isfinite(v)]
            if vals and min(vals) >= 0 and max(vals) <= 1:
                y_range = (min(vals), max(vals))
        svg = charts.line_chart(series, f"{run_name}: {panel} per epoch", "epoch", panel, y_range=y_range)
        if svg:
            out.append(svg)
    return out


# ---------------------------------------------------------------------------------------------
# Deployment: calibration and the default threshold (metrics.json "calibration", see
# embedkit.calibration)


def deployment_view(v: RunView) -> dict[str, Any] | None:
    """Numbers, sentence and the two charts of a run's calibration block; None without one."""
    c = _dict(v.m.get("calibration"))
    before, after, th = _dict(c.get("before")), _dict(c.get("after")), _dict(c.get("threshold"))
    if not before or not after:
        return None
    cf = _dict(th.get("cross_fitted"))
    t = _num(th.get("threshold"))
    sentence = DASH
    if t is not None and _num(th.get("coverage")) is not None:
        sentence = f"At {t:.2f}: {pct(th.get('coverage'), 0)} of tracks tagged, {pct(th.get('accuracy'))} of them right"
        if _num(cf.get("coverage")) is not None:
            sentence += f" (threshold chosen without each fold's tracks: {pct(cf.get('coverage'), 0)} tagged, {pct(cf.get('accuracy'))} right)"
        sentence += "."
    floor = _dict(c.get("ece_if_calibrated"))
    return {
        "method": str(c.get("method") or DASH),
        "why_not": str(c.get("why_not_temperature") or ""),
        "temperature": _num(c.get("temperature")),
        "bins": _num(c.get("ece_bins")),
        "measured_on": str(c.get("measured_on") or DASH),
        "before": {k: _num(before.get(k)) for k in ("ece", "nll", "brier", "accuracy")},
        "after": {k: _num(after.get(k)) for k in ("ece", "nll", "brier", "accuracy")},
        "floor_mean": _num(floor.get("mean")),
        "floor_p90": _num(floor.get("p90")),
        "threshold": t,
        "target": _num(th.get("target")),
        "target_reached": th.get("target_reached"),
        "coverage": _num(th.get("coverage")),
        "accuracy": _num(th.get("accuracy")),
        "cv_coverage": _num(cf.get("coverage")),
        "cv_accuracy": _num(cf.get("accuracy")),
        "rule": str(th.get("note") or th.get("rule") or DASH),
        "sentence": sentence,
        "reliability": charts.reliability_chart(
            _list(c.get("reliability_before")),
            _list(c.get("reliability_after")),
            f"{v.label}: reliability before and after calibration",
        ),
        "coverage_chart": charts.coverage_chart(
            _list(c.get("coverage_curve")), t, f"{v.label}: coverage and accuracy per threshold"
        ),
    }


# ---------------------------------------------------------------------------------------------
# Dataset section


def dataset_views(views: list[RunView]) -> list[dict]:
    """Distinct datasets (by source and size) with the runs that used each."""
    groups: dict[tuple, list[RunView]] = {}
    for v in views:
        d = _dict(v.m.get("dataset"))
        if not d:
            continue
        key = (
            str(d.get("source") or ""),
            _num(d.get("n_tracks")),
            json.dumps(_dict(d.get("class_counts")), sort_keys=True),
        )
        groups.setdefault(key, []).append(v)
    out = []
    for (source, n_tracks, cc_json), vs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        cc = json.loads(cc_json)
        d = _dict(vs[0].m.get("dataset"))
        segs: dict[str, set] = {}
        for v in vs:
            n = _num(_dict(v.m.get("dataset")).get("n_segments"))
            if n is not None:
                segs.setdefault(f"{n:,.0f}", set()).add(v.kind)
        protocols = Counter(v.protocol_text for v in vs)
        items = [(k, _num(c) or 0) for k, c in cc.items()]
        out.append(
            {
                "source": source or DASH,
                "name": Path(source).name if source else DASH,
                "n_tracks": count(n_tracks),
                "n_classes": len(cc) or len(vs[0].labels) or DASH,
                "segments": "; ".join(f"{n} ({', '.join(sorted(k))})" for n, k in segs.items()) or DASH,
                "class_counts": [(k, f"{c:,.0f}") for k, c in items],
                "class_chart": charts.hbar_chart(items, "tracks per class") if items else "",
                "protocols": [(p, c) for p, c in protocols.most_common()],
                "synthetic": any(bool(_dict(v.m.get("dataset")).get("synthetic")) for v in vs),
                "runs": [v.label for v in vs],
                "grouped": any(bool(v.protocol.get("grouped")) for v in vs),
                "group_by": next((v.protocol.get("group_by") for v in vs if v.protocol.get("group_by")), None),
                "taxonomy": _taxonomy_view(d.get("taxonomy")),
                "raw": d,
            }
        )
    return out


# ---------------------------------------------------------------------------------------------
# Written comparison: every sentence is computed from the runs; nothing is said about a
# comparison the runs cannot support.


def pts(a: float, b: float) -> str:
    d = round(100 * (a - b), 1)
    return f"{d + 0.0:+.1f} points"  # + 0.0 turns -0.0 into 0.0


def comparison(views: list[RunView]) -> list[str]:
    best = views[0]
    out = []
    s = f"{best.label} ranks first with {pct_pm(best.acc, best.acc_std)} track accuracy ({best.protocol_text}"
    n_test = best.n_test_tracks
    s += f", {n_test} test predictions)." if n_test else ")."
    if len(views) > 1:
        second = views[1]
        gap = best.acc - second.acc
        stds = [x for x in (best.acc_std, second.acc_std) if x is not None]
        if gap < 5e-4:
            s += f" {second.label} ties with it ({pct(second.acc)})."
        else:
            s += f" The runner-up, {second.label}, reaches {pct(second.acc)}, {100 * gap:.1f} points lower"
            if stds and gap <= max(stds):
                s += f", which is within one fold standard deviation ({100 * max(stds):.1f} points): this data does not separate the two"
            s += "."
    else:
        s += " It is the only run in this report, so there is nothing to compare it with yet."
    out.append(s)

    pre = [v for v in views if v.pretrained_embedding]
    cnn = [v for v in views if v.from_scratch]
    if pre and cnn:
        p, c = pre[0], cnn[0]
        gap = abs(100 * (p.acc - c.acc))
        verdict = (
            f"a gap of {gap:.1f} points in favour of "
            + ("the pretrained embeddings" if p.acc > c.acc else "the scratch CNN")
            if gap >= 0.05
            else "no difference"
        )
        out.append(
            f"Pretrained versus scratch: frozen {p.backbone} embeddings with the {p.head or 'best'} head ({p.label}) reach {pct(p.acc)}; "
            f"the best CNN trained from scratch ({c.label}) reaches {pct(c.acc)}: {verdict}."
        )
    else:
        missing = (
            "scratch CNN run"
            if pre
            else (
                "pretrained-embedding (frozen backbone + head) run"
                if cnn
                else "pretrained-embedding run and no scratch CNN run"
            )
        )
        out.append(
            f"No {missing} is in this report, so the gap between pretrained embeddings and a CNN trained from scratch is not measured here."
        )

    for ft in [v for v in views if v.fine_tuned][:1]:
        frozen = [v for v in pre if v.backbone == ft.backbone]
        if frozen:
            out.append(
                f"Fine-tuning {ft.backbone} end to end ({ft.label}) reaches {pct(ft.acc)}, {pts(ft.acc, frozen[0].acc)} against its frozen embeddings with the best head ({frozen[0].label}, {pct(frozen[0].acc)})."
            )
        else:
            out.append(
                f"Fine-tuning {ft.backbone or 'a backbone'} ({ft.label}) reaches {pct(ft.acc)}; no frozen-embedding run of the same backbone is here to compare with."
            )

    base = [v for v in views if v.hand_crafted]
    if base and pre:
        what = _dict(base[0].m.get("spec")).get("description")
        out.append(
            f"The hand-crafted baseline ({base[0].label}{': ' + str(what) if what else ''}) reaches {pct(base[0].acc)}; the best pretrained embedding adds {pts(pre[0].acc, base[0].acc)}."
        )

    near = [v for v in views if v.acc >= best.acc - 0.02 - 1e-12]
    costed = [v for v in near if v.infer_ms_total is not None]
    if costed:
        cheap = min(costed, key=lambda v: (v.infer_ms_total, _num(v.m.get("train_seconds")) or 0))
        if cheap is best:
            others = [v for v in costed if v is not best]
            if others:
                out.append(
                    f"No run within 2 points of the best is cheaper at inference: {best.label} is also the cheapest of the {len(costed)} runs in that band ({millis(best.infer_ms_total)} per track end to end)."
                )
            else:
                out.append(
                    f"No other run is within 2 points of the best; {best.label} costs {millis(best.infer_ms_total)} per track end to end."
                )
        else:
            ratio = (
                (best.infer_ms_total / cheap.infer_ms_total) if best.infer_ms_total and cheap.infer_ms_total else None
            )
            s = f"The cheapest run within 2 points of the best is {cheap.label}: {pct(cheap.acc)} ({pts(cheap.acc, best.acc)}) at {millis(cheap.infer_ms_total)} per track end to end"
            s += f", {ratio:.1f}× cheaper than {best.label} ({millis(best.infer_ms_total)})." if ratio else "."
            out.append(s)
    if len(costed) < len(near):
        miss = [v.label for v in near if v.infer_ms_total is None]
        out.append(
            f"Inference cost (including embedding extraction for head runs) is not recorded for {', '.join(miss)}, so {'it is' if len(miss) == 1 else 'they are'} left out of the cost comparison."
        )

    pcs = [r for r in best.per_class if r["f1"] is not None]
    if len(pcs) > 1:
        hard = min(pcs, key=lambda r: r["f1"])
        s = f"For {best.label}, the hardest class is {hard['label']} (F1 {hard['f1']:.2f})"
        conf = _list(best.m.get("confusion"))
        labs = best.labels
        if conf and len(conf) == len(labs):
            cells = [
                (conf[i][j], i, j) for i in range(len(labs)) for j in range(len(labs)) if i != j and _num(conf[i][j])
            ]
            if cells:
                c, i, j = max(cells)
                s += f"; its most frequent confusion is {labs[i]} predicted as {labs[j]} ({c:g} track{'s' if c != 1 else ''})"
        out.append(s + ".")
    if n_test:
        out.append(
            f"Precision of these numbers: one track is {100 / n_test:.1f} points of {best.label}'s accuracy ({n_test} test predictions in total); differences of a point or two between runs are within noise."
        )
    return out


# ---------------------------------------------------------------------------------------------
# Assembly


def _versions_table(views: list[RunView]) -> dict:
    libs: list[str] = []
    for v in views:
        for k in _dict(v.m.get("versions")):
            if k not in libs:
                libs.append(k)
    recorded = [v for v in views if _dict(v.m.get("versions"))]
    rows = []
    for lib in libs:
        vals = [str(_dict(v.m.get("versions")).get(lib, DASH)) for v in views]
        rec = {str(_dict(v.m.get("versions")).get(lib, DASH)) for v in recorded}
        rows.append({"lib": lib, "values": vals, "same": len(rec) == 1})
    return {
        "libs": rows,
        "all_same": all(r["same"] for r in rows),
        "n_recorded": len(recorded),
        "missing": [v.label for v in views if not _dict(v.m.get("versions"))],
    }


def _spec_row(v: RunView) -> dict:
    spec, prep = _dict(v.m.get("spec")), _dict(v.m.get("preprocess"))
    audio, seg = _dict(prep.get("audio")), _dict(prep.get("segments"))
    feats = _dict(spec.get("features"))  # the scratch CNN records its log-mel front end here
    sha = spec.get("weights_sha256") or spec.get("weights_id") or v.m.get("weights_id")
    sr = _num(spec.get("sample_rate")) or _num(feats.get("sample_rate"))
    dim = spec.get("embedding_dim")
    if dim is None and _num(feats.get("n_mels")):
        dim = f"{feats['n_mels']} mels"
    return {
        "backbone": v.backbone or spec.get("name") or DASH,
        "family": spec.get("family") or ("log-mel CNN" if feats else DASH),
        "sr": f"{sr:,.0f} Hz" if sr else DASH,
        "dim": value(dim),
        "weights": value(spec.get("weights")) + (f" ({str(sha)[:12]})" if sha and str(sha) != "none" else ""),
        "clip": f"{audio['clip_s']:g} s" if _num(audio.get("clip_s")) is not None else DASH,
        "segment": (f"{seg['segment_s']:g} s" if _num(seg.get("segment_s")) is not None else DASH)
        + (f" / hop {seg['hop_s']:g} s" if _num(seg.get("hop_s")) is not None else ""),
        "device": _device_text(_dict(v.m.get("device"))),
    }


def _device_text(d: dict) -> str:
    """'cuda:0 (NVIDIA H200), bf16' from a run record's device (``embedkit.device.provenance``);
    the dash for runs that record none (made before devices were recorded)."""
    if not d.get("device"):
        return DASH
    out = str(d["device"]) + (f" ({d['name']})" if d.get("name") else "")
    if d.get("precision") not in (None, "fp32"):
        out += f", {d['precision']}"
    if d.get("allow_tf32"):
        out += ", TF32"
    return out


def _sources_text(sources: list[str]) -> str:
    """Where the runs came from, short: many run directories of one folder are summarised."""
    if len(sources) <= 2:
        return ", ".join(sources)
    parents = {str(Path(s).parent) for s in sources}
    if len(parents) == 1:
        return f"{len(sources)} run directories in {parents.pop()}"
    return f"{len(sources)} locations"


def context(
    runs: list[dict[str, Any]],
    skipped: list[dict[str, str]] | None = None,
    sources: list[str] | None = None,
    title: str | None = None,
    pending: list[str] | None = None,
    similarity: dict[str, Any] | None = None,
    active_learning: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything the template needs, computed once (the template only lays it out).

    similarity: the similarity figures found beside the runs (``similarity_view``), if any;
    active_learning: the review queue's simulated curves (``active_learning_view``), if any.

    pending: names of runs still in progress (``embedkit run`` rewrites the report after each
    run); the page says so and reloads itself until none is left."""
    from .. import __version__

    if not runs:
        raise ReportError("no runs to report")
    views = sorted((RunView(m) for m in runs), key=lambda v: (-v.acc, v.name, v.run_id))
    names = Counter(v.name for v in views)
    for i, v in enumerate(views):
        v.rank = i + 1
        v.color = charts.color(i)
        v.label = v.name if names[v.name] == 1 else f"{v.name} [{v.run_id}]"

    for v in views:
        v.extra["curves"] = curve_charts(v.m.get("learning_curves"), v.label) if v.m.get("learning_curves") else []
        labs = v.labels
        conf = _list(v.m.get("confusion"))
        v.extra["confusion"] = charts.heatmap(conf, labs, f"{v.label}: confusion matrix") if conf and labs else ""
        v.extra["spec_row"] = _spec_row(v)
        v.extra["deployment"] = deployment_view(v)
        v.extra["spec_tables"] = [
            (title, flatten(_dict(v.m.get(key))))
            for title, key in (
                ("Backbone spec", "spec"),
                ("Preprocessing", "preprocess"),
                ("Training config", "config"),
                ("Protocol", "protocol"),
            )
        ]
        v.extra["spec_tables"] = [(t, rows) for t, rows in v.extra["spec_tables"] if rows]

    genres: list[str] = []
    for v in views:
        for lab in v.labels or [r["label"] for r in v.per_class]:
            if lab not in genres:
                genres.append(lab)
    f1_rows = [{"label": g, "cells": [v.f1(g) for v in views]} for g in genres]

    inf_points = [
        {
            "x": v.infer_ms_total,
            "y": 100 * v.acc,
            "yerr": 100 * v.acc_std if v.acc_std else None,
            "color": v.color,
            "tag": v.rank,
            "name": v.label,
        }
        for v in views
    ]
    build_points = [
        {
            "x": v.build_s_total,
            "y": 100 * v.acc,
            "yerr": 100 * v.acc_std if v.acc_std else None,
            "color": v.color,
            "tag": v.rank,
            "name": v.label,
        }
        for v in views
    ]
    scatter_inf = charts.scatter(
        inf_points, "accuracy versus inference cost", "inference per track, ms (log scale)", "track accuracy, %"
    )
    scatter_build = charts.scatter(
        build_points, "accuracy versus build cost", "extraction + training, s (log scale)", "track accuracy, %"
    )
    datasets = dataset_views(views)
    no_dataset = [v.label for v in views if not _dict(v.m.get("dataset"))]
    return {
        "title": title or "embedkit comparison report",
        "pending": list(pending or []),
        "generated": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "version": __version__,
        "sources": _sources_text(sources or []),
        "runs": views,
        "skipped": skipped or [],
        "datasets": datasets,
        "synthetic": any(d["synthetic"] for d in datasets),
        "no_dataset": no_dataset,
        "comparison": comparison(views),
        "f1_rows": f1_rows,
        "scatter_inf": scatter_inf,
        "scatter_build": scatter_build,
        "no_inf_cost": [v.label for v in views if v.infer_ms_total is None],
        "no_build_cost": [v.label for v in views if v.build_s_total is None],
        "versions": _versions_table(views),
        "any_curves": any(v.extra["curves"] for v in views),
        "any_deployment": any(v.extra["deployment"] for v in views),
        "no_deployment": [v.label for v in views if not v.extra["deployment"]],
        "kinds": Counter(v.kind for v in views),
        "similarity": similarity,
        "active_learning": active_learning,
    }


#: written by ``bench/bench_similar.py quality --into RUNS_DIR`` beside the runs it reports on
SIMILARITY_FILE = "similarity.json"


def _side_file(paths: list[str | os.PathLike], name: str) -> Any:
    """A benchmark's JSON file ``name`` beside the report's runs, from the first run folder that
    holds one: its content, or None when there is none or it cannot be read."""
    for p in map(Path, paths):
        f = p / name
        if p.is_dir() and f.is_file():
            try:
                return json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
    return None


def similarity_view(paths: list[str | os.PathLike]) -> dict[str, Any] | None:
    """The same-genre precision figures of ``embedkit similar`` from a ``similarity.json`` in
    one of the report's run folders (the first found), or None."""
    q = _side_file(paths, SIMILARITY_FILE)
    if q is None:
        return None
    names = (
        ("embedding cosine (baseline)", "p10_baseline_cosine"),
        ("embedkit's space", "p10_space"),
        ("genre probabilities only", "p10_space_probabilities_only"),
        ("LDA on the training folds", "p10_lda"),
    )
    return {
        "dataset": q.get("dataset", "gtzan_mini"),
        "tracks": q.get("tracks"),
        "ceiling": q.get("ceiling", 0.9),
        "protocol": q.get("protocol", ""),
        "when": q.get("when", ""),
        "artist_filtered": q.get("artist_filtered"),
        "rows": [(n, q[k]) for n, k in names if _num(q.get(k)) is not None],
    }


#: written by ``bench/bench_library.py --into RUNS_DIR`` beside the runs it reports on
ACTIVE_LEARNING_FILE = "active_learning.json"


def active_learning_view(paths: list[str | os.PathLike]) -> dict[str, Any] | None:
    """The review queue's simulated active-learning curves (mean test accuracy against the
    number of labels, queue versus random choice) from an ``active_learning.json`` in one of the
    report's run folders (the first found): the chart, and per target the labels each policy
    needs and the saving with its bootstrap interval (the goal counts as met where the
    interval's lower end reaches it); None when there is none (or it is unreadable)."""
    q = _side_file(paths, ACTIVE_LEARNING_FILE)
    if q is None:
        return None
    try:
        budgets = [float(b) for b in q["budgets"]]
        curves = {k: [100 * float(v) for v in q[k]] for k in ("queue", "random")}
    except (ValueError, KeyError, TypeError):
        return None
    full = _num(q.get("full_pool_accuracy"))
    series = [
        {"name": "review queue", "xs": budgets, "ys": curves["queue"], "color": charts.color(0)},
        {"name": "random choice", "xs": budgets, "ys": curves["random"], "color": charts.color(1), "dash": "5 3"},
    ]
    if full is not None:
        line = {"xs": [budgets[0], budgets[-1]], "ys": [100 * full] * 2, "dash": "2 3", "width": 1}
        series.append({"name": "all pool labelled", "color": charts.MUTED, **line})
    chart = charts.line_chart(series, "active learning: queue versus random", "labels reviewed", "test accuracy, %")
    targets = [
        {
            "name": name,
            "accuracy": _num(t.get("accuracy")),
            "queue": _num(t.get("queue")),
            "random": _num(t.get("random")),
            "saving": _num(t.get("saving")),
            "ci": [_num(v) for v in _list(t.get("saving_ci90"))][:2] or None,
            "saving_held": _num(t.get("saving_held")),
        }
        for name, t in _dict(q.get("targets")).items()
        if isinstance(t, dict)
    ]
    return {
        "dataset": q.get("dataset", "gtzan_mini"),
        "backbone": q.get("backbone", ""),
        "protocol": q.get("protocol", ""),
        "when": q.get("when", ""),
        "goal": _num(q.get("goal")) or 0.3,
        "chart": chart,
        "targets": targets,
    }


def template_environment():
    """The Jinja environment of embedkit's self-contained pages (the report, ``embedkit monitor``):
    the templates folder, autoescaping, the number filters (pct, f3, seconds...) and the inlined
    stylesheet ``css`` (``_head.html``)."""
    from importlib.resources import files

    from jinja2 import Environment, PackageLoader, StrictUndefined
    from markupsafe import Markup

    env = Environment(
        loader=PackageLoader("embedkit.report", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["css"] = Markup((files("embedkit.report") / "templates" / "report.css").read_text(encoding="utf-8"))
    env.filters.update(pct=pct, pct_pm=pct_pm, seconds=seconds, millis=millis, nbytes=nbytes, count=count, value=value)
    env.filters["f1cell"] = lambda v: DASH if v is None else f"{v:.2f}"
    env.filters["f3"] = lambda v: DASH if _num(v) is None else f"{_num(v):.3f}"
    # Cell shade for scores in [0, 1]: light tint so dark text stays readable.
    env.filters["shade"] = lambda v: (
        "" if v is None else f"background-color: rgba(78, 121, 167, {0.08 + 0.5 * max(0.0, min(1.0, v)) ** 2:.2f})"
    )
    return env


def render(ctx: dict[str, Any]) -> str:
    return template_environment().get_template("report.html").render(**ctx)


def build_report(
    paths: list[str | os.PathLike] | None = None,
    out: str | os.PathLike = "reports/report.html",
    title: str | None = None,
    pending: list[str] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Render every run under ``paths`` (default ``runs/``) into ``out``, atomically; returns
    (path, context). pending: runs still in progress, listed on the page (see ``context``).

    Raises ReportError when no usable run is found."""
    from ..io import atomic_write_bytes

    paths = list(paths or ["runs"])
    runs, skipped = load(paths)
    if not runs:
        why = f"; skipped {len(skipped)}: {skipped[0]['path']}: {skipped[0]['reason']}" if skipped else ""
        raise ReportError(
            f"no runs found in {', '.join(map(str, paths))} (no */metrics.json){why}: run `embedkit fit`, `embedkit train-cnn` or `embedkit run DATA` first"
        )
    ctx = context(
        runs, skipped, [str(p) for p in paths], title, pending, similarity_view(paths), active_learning_view(paths)
    )
    html = render(ctx)
    out = Path(out)
    try:
        atomic_write_bytes(out, html.encode("utf-8"))  # UTF-8 whatever the locale
    except OSError as exc:
        raise ReportError(f"{out}: cannot write report ({exc.strerror or exc})") from None
    return out, ctx
