"""Inline SVG charts for the report: bars, heatmap, line chart, scatter with a log axis.

Hand-written on purpose: the report must be one offline file with no scripts, and a plotting
library (matplotlib → PNG/SVG) would add a heavy dependency for five simple chart types whose
look we want to match the page's CSS. Every piece of text goes through ``markupsafe.escape``;
functions return ``Markup`` so Jinja's autoescape leaves the SVG intact. Coordinates are in SVG
user units (≈ CSS px at 100 % zoom); each chart has a ``viewBox`` and scales with its container.
"""

from __future__ import annotations

import math
from typing import Sequence

from markupsafe import Markup, escape

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")
INK = "#1f2933"
MUTED = "#6b7785"
GRID = "#e4e8ee"
FONT = 'font-family="system-ui, -apple-system, Segoe UI, Roboto, Helvetica, Arial, sans-serif"'


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _f(x: float) -> str:
    """Compact coordinate: SVG does not need more than 0.1 unit precision here."""
    return f"{x:.1f}".rstrip("0").rstrip(".")


def _text(
    x: float,
    y: float,
    s: str,
    size: float = 11,
    anchor: str = "start",
    fill: str = INK,
    weight: str = "normal",
    extra: str = "",
) -> str:
    return (
        f'<text x="{_f(x)}" y="{_f(y)}" font-size="{size:g}" text-anchor="{anchor}" fill="{fill}" '
        f'font-weight="{weight}"{(" " + extra) if extra else ""}>{escape(s)}</text>'
    )


def _svg(width: float, height: float, body: list[str], title: str) -> Markup:
    return Markup(
        f'<svg class="chart" viewBox="0 0 {_f(width)} {_f(height)}" '
        f'width="{_f(width)}" height="{_f(height)}" role="img" {FONT}><title>{escape(title)}</title>'
        + "".join(body)
        + "</svg>"
    )


def _axis_labels(xlabel: str, ylabel: str, x_mid: float, x_base: float, y_mid: float) -> list[str]:
    """The x label centred under the plot (baseline ``x_base``) and the y label rotated along its
    left edge, centred at ``y_mid``: the same on every chart with axes."""
    return [
        _text(x_mid, x_base, xlabel, anchor="middle", size=11, fill=MUTED),
        _text(12, y_mid, ylabel, anchor="middle", size=11, fill=MUTED, extra=f'transform="rotate(-90 12 {_f(y_mid)})"'),
    ]


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (1/2/5 × 10^k steps)."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    v = start
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 10))
        v += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """Decade ticks (and 2×, 5× when the range is short) covering [lo, hi], lo > 0."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if b == a:
        b = a + 1
    mults = (1, 2, 5) if b - a <= 2 else (1,)
    ticks = [m * 10**e for e in range(a, b + 1) for m in mults]
    inside = [t for t in ticks if lo <= t <= hi]
    # Keep one tick either side so the axis frames every point.
    below = [t for t in ticks if t < lo]
    above = [t for t in ticks if t > hi]
    return ([below[-1]] if below else []) + inside + ([above[0]] if above else [])


def fmt_tick(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e6 or a < 1e-2:
        return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-")
    if a >= 100 or float(v).is_integer():
        return f"{v:,.0f}"
    return f"{v:.3g}"


# ---------------------------------------------------------------------------------------------


def hbar_chart(
    items: Sequence[tuple[str, float]],
    title: str,
    value_fmt=lambda v: f"{v:,.0f}",
    bar_color: str = PALETTE[0],
    width: int = 520,
) -> Markup:
    """Horizontal bars, one per (label, value); e.g. tracks per class."""
    if not items:
        return Markup("")
    label_w = min(200, 16 + 7 * max(len(str(k)) for k, _ in items))
    row_h, top = 22, 8
    height = top * 2 + row_h * len(items)
    vmax = max((v for _, v in items), default=0) or 1
    bar_w = width - label_w - 60
    body = []
    for i, (label, v) in enumerate(items):
        y = top + i * row_h
        w = max(0.0, bar_w * v / vmax)
        body.append(_text(label_w - 8, y + 15, str(label), anchor="end"))
        body.append(
            f'<rect x="{_f(label_w)}" y="{_f(y + 3)}" width="{_f(w)}" height="{row_h - 6}" rx="2" fill="{bar_color}"/>'
        )
        body.append(_text(label_w + w + 6, y + 15, value_fmt(v), fill=MUTED))
    return _svg(width, height, body, title)


def _heat(v: float) -> str:
    """White → deep blue for v in [0, 1] (perceptually even enough for a confusion matrix)."""
    v = min(max(v, 0.0), 1.0)
    lo, hi = (247, 251, 255), (8, 48, 107)
    r, g, b = (round(lo[k] + (hi[k] - lo[k]) * v**0.8) for k in range(3))
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap(matrix: Sequence[Sequence[float]], labels: Sequence[str], title: str) -> Markup:
    """Confusion matrix [true x pred] of counts. Colour = share of the true class (row-
    normalised, i.e. recall per cell) so classes of different sizes read alike; the cell text
    is the raw count."""
    n = len(labels)
    if n == 0 or len(matrix) != n or any(len(r) != n for r in matrix):
        return Markup("")
    cell = 34 if n <= 12 else max(14, 420 // n)
    lab_w = min(150, 14 + 6.6 * max(len(str(l)) for l in labels))
    top = lab_w + 22  # predicted labels are written vertically above the grid, under the title
    left = lab_w + 22
    size = n * cell
    width, height = left + size + 10, top + size + 12
    body = [
        _text(left + size / 2, 12, "predicted", anchor="middle", fill=MUTED, size=11),
        _text(
            10,
            top + size / 2,
            "true",
            anchor="middle",
            fill=MUTED,
            size=11,
            extra=f'transform="rotate(-90 10 {_f(top + size / 2)})"',
        ),
    ]
    fs = 11 if cell >= 30 else max(7, cell * 0.4)
    for j, lab in enumerate(labels):
        x = left + j * cell + cell / 2 + 4
        body.append(
            _text(x, top - 6, str(lab), anchor="start", size=fs, extra=f'transform="rotate(-90 {_f(x)} {_f(top - 6)})"')
        )
    for i, lab in enumerate(labels):
        row = [float(v) for v in matrix[i]]
        total = sum(row) or 1.0
        body.append(_text(left - 6, top + i * cell + cell / 2 + 4, str(lab), anchor="end", size=fs))
        for j, v in enumerate(row):
            share = v / total
            x, y = left + j * cell, top + i * cell
            body.append(
                f'<rect x="{_f(x)}" y="{_f(y)}" width="{cell}" height="{cell}" fill="{_heat(share)}" stroke="#ffffff" stroke-width="1"><title>{escape(f"true {lab}, predicted {labels[j]}: {v:g} ({share:.0%})")}</title></rect>'
            )
            if v and cell >= 18:
                body.append(
                    _text(
                        x + cell / 2,
                        y + cell / 2 + 4,
                        f"{v:g}",
                        anchor="middle",
                        size=fs,
                        fill="#ffffff" if share > 0.55 else INK,
                        weight="bold" if i == j else "normal",
                    )
                )
    body.append(
        f'<rect x="{_f(left)}" y="{_f(top)}" width="{size}" height="{size}" fill="none" stroke="{MUTED}" stroke-width="1"/>'
    )
    return _svg(width, height, body, title)


def line_chart(
    series: Sequence[dict],
    title: str,
    xlabel: str,
    ylabel: str,
    width: int = 460,
    height: int = 250,
    y_range: tuple[float, float] | None = None,
) -> Markup:
    """series: [{name, ys, color, [xs], [dash], [width], [opacity], [legend]}]; xs default 1..N."""
    pts = [
        (s, list(s.get("xs") or range(1, len(s["ys"]) + 1)), [float(v) for v in s["ys"]]) for s in series if s.get("ys")
    ]
    pts = [(s, xs, ys) for s, xs, ys in pts if any(math.isfinite(v) for v in ys)]
    if not pts:
        return Markup("")
    all_x = [x for _, xs, _ in pts for x in xs]
    all_y = [y for _, _, ys in pts for y in ys if math.isfinite(y)]
    ml, mr, mt, mb = 52, 14, 14, 40
    legend = [s for s, _, _ in pts if s.get("legend", True)]
    # Legend items flow left to right and wrap; width estimated from the text (no font metrics
    # without a browser, 6.2 units per character at 10.5 px is a safe upper bound).
    places, lx, ly = [], ml, 12
    for s in legend:
        w = 30 + 6.2 * len(s["name"])
        if lx + w > width - mr and lx > ml:
            lx, ly = ml, ly + 16
        places.append((lx, ly))
        lx += w + 10
    mt += (ly + 4) if legend else 0
    pw, ph = width - ml - mr, height - mt - mb
    xt = nice_ticks(min(all_x), max(all_x), 6)
    xt = [t for t in xt if float(t).is_integer()] or xt
    x0, x1 = min(xt[0], min(all_x)), max(xt[-1], max(all_x))
    yt = nice_ticks(*(y_range or (min(all_y), max(all_y))), 5)
    y0, y1 = yt[0], yt[-1]
    sx = lambda x: ml + (x - x0) / ((x1 - x0) or 1) * pw  # noqa: E731
    sy = lambda y: mt + ph - (y - y0) / ((y1 - y0) or 1) * ph  # noqa: E731
    body = []
    for t in yt:
        body.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{_f(sy(t))}" y2="{_f(sy(t))}" stroke="{GRID}"/>')
        body.append(_text(ml - 6, sy(t) + 4, fmt_tick(t), anchor="end", size=10, fill=MUTED))
    for t in xt:
        if x0 <= t <= x1:
            body.append(_text(sx(t), mt + ph + 15, fmt_tick(t), anchor="middle", size=10, fill=MUTED))
    body.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{mt + ph}" y2="{mt + ph}" stroke="{MUTED}"/>')
    body.extend(_axis_labels(xlabel, ylabel, ml + pw / 2, height - 6, mt + ph / 2))
    for s, xs, ys in pts:
        segs, cur = [], []
        for x, y in zip(xs, ys):
            if math.isfinite(y):
                cur.append(f"{_f(sx(x))},{_f(sy(y))}")
            elif cur:
                segs.append(cur)
                cur = []
        if cur:
            segs.append(cur)
        dash = f' stroke-dasharray="{s["dash"]}"' if s.get("dash") else ""
        for seg in segs:
            if len(seg) == 1:
                cx, cy = seg[0].split(",")
                body.append(
                    f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{s["color"]}" opacity="{s.get("opacity", 1)}"/>'
                )
            else:
                body.append(
                    f'<polyline points="{" ".join(seg)}" fill="none" stroke="{s["color"]}" stroke-width="{s.get("width", 2)}" '
                    f'stroke-opacity="{s.get("opacity", 1)}" stroke-linejoin="round"{dash}/>'
                )
    for s, (lx, ly) in zip(legend, places):
        dash = f' stroke-dasharray="{s["dash"]}"' if s.get("dash") else ""
        body.append(
            f'<line x1="{_f(lx)}" x2="{_f(lx + 18)}" y1="{ly - 4}" y2="{ly - 4}" stroke="{s["color"]}" stroke-width="2.5"{dash}/>'
        )
        body.append(_text(lx + 23, ly, s["name"], size=10.5))
    return _svg(width, height, body, title)


def scatter(
    points: Sequence[dict],
    title: str,
    xlabel: str,
    ylabel: str,
    log_x: bool = True,
    width: int = 520,
    height: int = 320,
) -> Markup:
    """points: [{x, y, [yerr], color, tag, name, [hollow]}]; points with x <= 0 (log) or
    missing coordinates are left out (the caller says so in the text)."""
    pts = [
        p
        for p in points
        if p.get("x") is not None
        and p.get("y") is not None
        and math.isfinite(p["x"])
        and math.isfinite(p["y"])
        and (p["x"] > 0 or not log_x)
    ]
    if not pts:
        return Markup("")
    ml, mr, mt, mb = 56, 18, 16, 42
    pw, ph = width - ml - mr, height - mt - mb
    xs = [p["x"] for p in pts]
    lo_y = min(p["y"] - (p.get("yerr") or 0) for p in pts)
    hi_y = max(p["y"] + (p.get("yerr") or 0) for p in pts)
    pad = max(4.0, (hi_y - lo_y) * 0.1)
    yt = nice_ticks(max(0.0, lo_y - pad), min(100.0, hi_y + pad), 5)
    y0, y1 = yt[0], yt[-1]
    inset = 12  # markers at the ends of the range (e.g. 100 %) stay inside the frame
    if log_x:
        # Pad by a factor so points never sit on the frame (and one point gets a real axis).
        xt = log_ticks(min(xs) / 1.4, max(xs) * 1.4)
        lx0, lx1 = math.log10(xt[0]), math.log10(xt[-1])
        sx = lambda x: ml + inset + (math.log10(x) - lx0) / ((lx1 - lx0) or 1) * (pw - 2 * inset)  # noqa: E731
    else:
        xt = nice_ticks(0.0, max(xs), 5)
        sx = lambda x: ml + inset + (x - xt[0]) / ((xt[-1] - xt[0]) or 1) * (pw - 2 * inset)  # noqa: E731
    sy = lambda y: mt + ph - inset - (y - y0) / ((y1 - y0) or 1) * (ph - 2 * inset)  # noqa: E731
    body = []
    for t in yt:
        body.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{_f(sy(t))}" y2="{_f(sy(t))}" stroke="{GRID}"/>')
        body.append(_text(ml - 6, sy(t) + 4, fmt_tick(t), anchor="end", size=10, fill=MUTED))
    for t in xt:
        body.append(f'<line x1="{_f(sx(t))}" x2="{_f(sx(t))}" y1="{mt}" y2="{mt + ph}" stroke="{GRID}"/>')
        body.append(_text(sx(t), mt + ph + 15, fmt_tick(t), anchor="middle", size=10, fill=MUTED))
    body.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="{MUTED}" stroke-width="0.8"/>')
    body.extend(_axis_labels(xlabel, ylabel, ml + pw / 2, height - 6, mt + ph / 2))
    for p in sorted(pts, key=lambda p: -p["y"]):
        cx, cy = sx(p["x"]), sy(p["y"])
        if p.get("yerr"):  # clipped to the axis: accuracy cannot leave [0, 100] %
            e0, e1 = max(y0, p["y"] - p["yerr"]), min(y1, p["y"] + p["yerr"])
            body.append(
                f'<line x1="{_f(cx)}" x2="{_f(cx)}" y1="{_f(sy(e0))}" y2="{_f(sy(e1))}" stroke="{p["color"]}" stroke-width="1.5"/>'
            )
        fill = "#ffffff" if p.get("hollow") else p["color"]
        tip = escape(f"{p['name']}: {p['y']:.1f} % at {fmt_tick(p['x'])}")
        body.append(
            f'<circle cx="{_f(cx)}" cy="{_f(cy)}" r="9" fill="{fill}" stroke="{p["color"]}" stroke-width="2"><title>{tip}</title></circle>'
        )
        body.append(
            _text(
                cx,
                cy + 3.5,
                str(p["tag"]),
                anchor="middle",
                size=9.5,
                weight="bold",
                fill=p["color"] if p.get("hollow") else "#ffffff",
            )
        )
    return _svg(width, height, body, title)


def _unit_frame(width: float, height: float, xlabel: str, ylabel: str, ml=48, mr=14, mt=30, mb=40):
    """Axes for values in [0, 1] x [0, 1]: (body with grid and labels, sx, sy, plot box)."""
    pw, ph = width - ml - mr, height - mt - mb
    sx = lambda x: ml + min(max(x, 0.0), 1.0) * pw  # noqa: E731
    sy = lambda y: mt + ph - min(max(y, 0.0), 1.0) * ph  # noqa: E731
    body = []
    for t in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        body.append(f'<line x1="{ml}" x2="{_f(ml + pw)}" y1="{_f(sy(t))}" y2="{_f(sy(t))}" stroke="{GRID}"/>')
        body.append(_text(ml - 6, sy(t) + 4, fmt_tick(t), anchor="end", size=10, fill=MUTED))
        body.append(_text(sx(t), mt + ph + 15, fmt_tick(t), anchor="middle", size=10, fill=MUTED))
    body.append(
        f'<rect x="{ml}" y="{mt}" width="{_f(pw)}" height="{_f(ph)}" fill="none" stroke="{MUTED}" stroke-width="0.8"/>'
    )
    body.extend(_axis_labels(xlabel, ylabel, ml + pw / 2, height - 6, mt + ph / 2))
    return body, sx, sy, (ml, mt, pw, ph)


def _legend(body: list[str], items: Sequence[tuple[str, str, str | None]], x: float, y: float) -> None:
    for name, col, dash in items:
        d = f' stroke-dasharray="{dash}"' if dash else ""
        body.append(
            f'<line x1="{_f(x)}" x2="{_f(x + 18)}" y1="{_f(y - 4)}" y2="{_f(y - 4)}" stroke="{col}" stroke-width="2.5"{d}/>'
        )
        body.append(_text(x + 23, y, name, size=10.5))
        x += 34 + 6.2 * len(name)


def reliability_chart(
    before: Sequence[dict], after: Sequence[dict], title: str, width: int = 380, height: int = 330
) -> Markup:
    """Reliability diagram: per confidence bin ({n, confidence, accuracy}), the accuracy of its
    tracks against their mean confidence, before (grey) and after calibration (blue); marker
    area proportional to the tracks in the bin; the diagonal is perfect calibration."""
    series = [(before, "before", "#9aa5b1", "4 3"), (after, "after", PALETTE[0], None)]
    if not any(x.get("n") for bins, *_ in series for x in bins):
        return Markup("")
    body, sx, sy, _ = _unit_frame(width, height, "confidence (top-class probability)", "accuracy")
    body.append(
        f'<line x1="{_f(sx(0))}" y1="{_f(sy(0))}" x2="{_f(sx(1))}" y2="{_f(sy(1))}" stroke="{MUTED}" stroke-dasharray="2 3"/>'
    )
    total = max(sum(int(x.get("n") or 0) for x in after), 1)
    for bins, name, col, dash in series:
        pts = [
            (float(x["confidence"]), float(x["accuracy"]), int(x["n"]))
            for x in bins
            if x.get("n") and x.get("confidence") is not None and x.get("accuracy") is not None
        ]
        if len(pts) > 1:
            d = f' stroke-dasharray="{dash}"' if dash else ""
            body.append(
                f'<polyline points="{" ".join(f"{_f(sx(c))},{_f(sy(a))}" for c, a, _ in pts)}" fill="none" stroke="{col}" stroke-width="1.8"{d}/>'
            )
        for c, a, n in pts:
            r = 2.5 + 9 * math.sqrt(n / total)
            tip = escape(f"{name}: {n} tracks at confidence {c:.2f}, {a:.0%} right")
            body.append(
                f'<circle class="rel-{name}" cx="{_f(sx(c))}" cy="{_f(sy(a))}" r="{_f(r)}" fill="{col}" fill-opacity="0.55" stroke="{col}"><title>{tip}</title></circle>'
            )
    _legend(
        body, [("before calibration", "#9aa5b1", "4 3"), ("after", PALETTE[0], None), ("perfect", MUTED, "2 3")], 48, 14
    )
    return _svg(width, height, body, title)


def coverage_chart(
    curve: Sequence[dict], threshold: float | None, title: str, width: int = 380, height: int = 330
) -> Markup:
    """Coverage (share of tracks whose top probability >= t) and the accuracy of those tracks
    against the threshold t ({threshold, coverage, accuracy}); the default threshold marked."""
    pts = [
        (float(r["threshold"]), r.get("coverage"), r.get("accuracy")) for r in curve if r.get("threshold") is not None
    ]
    if not pts:
        return Markup("")
    body, sx, sy, (ml, mt, pw, ph) = _unit_frame(
        width, height, "threshold on the calibrated top probability", "share of tracks"
    )
    for idx, col in ((1, PALETTE[1]), (2, PALETTE[4])):
        line = [f"{_f(sx(p[0]))},{_f(sy(float(p[idx])))}" for p in pts if p[idx] is not None]
        if len(line) > 1:
            body.append(f'<polyline points="{" ".join(line)}" fill="none" stroke="{col}" stroke-width="2"/>')
    if threshold is not None and math.isfinite(threshold):
        x = sx(threshold)
        body.append(
            f'<line class="default-threshold" x1="{_f(x)}" x2="{_f(x)}" y1="{mt}" y2="{_f(mt + ph)}" stroke="{INK}" stroke-dasharray="5 3"/>'
        )
        anchor = "end" if threshold > 0.6 else "start"
        body.append(
            _text(
                x + (-5 if anchor == "end" else 5),
                mt + ph - 8,
                f"default {threshold:.2f}",
                anchor=anchor,
                size=10.5,
                weight="bold",
            )
        )
    _legend(body, [("coverage (tagged)", PALETTE[1], None), ("accuracy of tagged", PALETTE[4], None)], 48, 14)
    return _svg(width, height, body, title)
