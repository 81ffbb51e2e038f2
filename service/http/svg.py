"""Inline SVG charts for the server-rendered pages: axes with tick values and titles (with
units), labels sized to fit, no JavaScript and no plotting library, so a page is one file
that renders offline.

Every chart is an ``<svg>`` with ``role="img"`` and an ``aria-label``; the axis titles carry
``class="x-title"`` / ``class="y-title"`` and the ticks ``class="tick"``, which the browser
tests look for.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")
FONT = 12
CHAR_W = 6.6  # average glyph width at 12 px in the system sans-serif, for fitting labels


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2, 2.5 or 5 times a power of ten apart)."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step + 1e-9) * step
    ticks = []
    v = start
    while v <= hi + step * 1e-6:
        ticks.append(round(v, 12))
        v += step
    if ticks[-1] < hi:
        ticks.append(round(v, 12))
    return ticks


def fmt(v: float) -> str:
    """A tick label: as few digits as the value needs."""
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.001:
        return f"{v:.2g}"
    return f"{v:.4g}"


def fit(text: str, width: float) -> str:
    """``text`` cut with an ellipsis to fit ``width`` pixels."""
    room = max(3, int(width / CHAR_W))
    return text if len(text) <= room else text[:room - 1] + "…"


@dataclass(frozen=True)
class Axis:
    title: str  # with its unit, e.g. "eps (l_inf, [0,1] pixel scale)"
    lo: float | None = None  # fixed bounds; None = from the data
    hi: float | None = None


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[tuple[float, float]]
    color: str = COLORS[0]
    line: bool = True
    marker: str = "circle"  # circle or square
    labels: Sequence[str] = ()  # per point, shown beside it (scatter)
    links: Sequence[str] = ()  # per point, an href


def chart(title: str, x: Axis, y: Axis, series: Sequence[Series], width: int = 640,
          height: int = 300) -> str:
    """A line chart or scatter plot with ticks on both axes, axis titles and a legend."""
    e = html.escape
    left, right, top, bottom = 62, 16, 28, 48
    pw, ph = width - left - right, height - top - bottom
    xs = [p[0] for s in series for p in s.points] or [0.0, 1.0]
    ys = [p[1] for s in series for p in s.points] or [0.0, 1.0]
    xt = nice_ticks(x.lo if x.lo is not None else min(xs), x.hi if x.hi is not None else max(xs))
    yt = nice_ticks(y.lo if y.lo is not None else min(ys), y.hi if y.hi is not None else max(ys))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def px(vx: float, vy: float) -> tuple[float, float]:
        return (left + (vx - x0) / (x1 - x0) * pw, top + ph - (vy - y0) / (y1 - y0) * ph)

    legend_rows = math.ceil(len(series) / 2)
    total_h = height + 18 * legend_rows
    out = [f"<svg class='chart' role='img' aria-label='{e(title)}' width='{width}' "
           f"height='{total_h}' viewBox='0 0 {width} {total_h}' "
           f"xmlns='http://www.w3.org/2000/svg' font-family='system-ui,sans-serif' "
           f"font-size='{FONT}'>",
           f"<text x='{left}' y='16' font-weight='bold'>{e(fit(title, pw))}</text>"]
    for t in xt:
        cx, _ = px(t, y0)
        out.append(f"<line x1='{cx:.1f}' y1='{top}' x2='{cx:.1f}' y2='{top + ph}' "
                   "stroke='#eee'/>")
        out.append(f"<text class='tick x-tick' x='{cx:.1f}' y='{top + ph + 15}' "
                   f"text-anchor='middle'>{fmt(t)}</text>")
    for t in yt:
        _, cy = px(x0, t)
        out.append(f"<line x1='{left}' y1='{cy:.1f}' x2='{left + pw}' y2='{cy:.1f}' "
                   "stroke='#eee'/>")
        out.append(f"<text class='tick y-tick' x='{left - 6}' y='{cy + 4:.1f}' "
                   f"text-anchor='end'>{fmt(t)}</text>")
    out.append(f"<rect x='{left}' y='{top}' width='{pw}' height='{ph}' fill='none' "
               "stroke='#888'/>")
    out.append(f"<text class='x-title' x='{left + pw / 2:.1f}' y='{top + ph + 36}' "
               f"text-anchor='middle'>{e(fit(x.title, pw))}</text>")
    out.append(f"<text class='y-title' transform='translate(14,{top + ph / 2:.1f}) "
               f"rotate(-90)' text-anchor='middle'>{e(fit(y.title, ph))}</text>")
    for s in series:
        pts = [px(a, b) for a, b in (sorted(s.points) if s.line else s.points)]
        if s.line and len(pts) > 1:
            out.append(f"<polyline fill='none' stroke='{s.color}' stroke-width='2' points='"
                       + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + "'/>")
        for i, (a, b) in enumerate(pts):
            mark = (f"<rect class='point' x='{a - 5:.1f}' y='{b - 5:.1f}' width='10' "
                    f"height='10' fill='{s.color}' stroke='#000'/>" if s.marker == "square"
                    else f"<circle class='point' cx='{a:.1f}' cy='{b:.1f}' r='4' "
                    f"fill='{s.color}'/>")
            tip = s.labels[i] if i < len(s.labels) else s.name
            mark = mark.replace("/>", f"><title>{e(tip)}</title></" +
                                ("rect>" if s.marker == "square" else "circle>"))
            if i < len(s.links):
                mark = f"<a href='{e(s.links[i])}'>{mark}</a>"
            out.append(mark)
    col_w = (width - left) / 2
    for i, s in enumerate(series):
        lx = left + (i % 2) * col_w
        ly = height + 4 + 18 * (i // 2)
        out.append(f"<rect x='{lx:.1f}' y='{ly:.1f}' width='10' height='10' fill='{s.color}'/>"
                   f"<text class='legend' x='{lx + 14:.1f}' y='{ly + 9:.1f}'>"
                   f"{e(fit(s.name, col_w - 20))}</text>")
    return "".join(out) + "</svg>"


def bars(title: str, items: Sequence[tuple[str, float]], x: Axis, width: int = 640) -> str:
    """Horizontal bars with a value axis (ticks and title) under them; labels fit their column."""
    e = html.escape
    label_w, right, bar = 250, 50, 20
    pw = width - label_w - right
    hi = max([x.hi if x.hi is not None else 0.0, *[v for _, v in items], 1e-9])
    lo = min([x.lo if x.lo is not None else 0.0, *[v for _, v in items]])
    ticks = nice_ticks(lo, hi)
    t0, t1 = ticks[0], ticks[-1]
    top = 24
    height = top + bar * len(items) + 44

    def px(v: float) -> float:
        return label_w + (v - t0) / (t1 - t0) * pw

    out = [f"<svg class='chart' role='img' aria-label='{e(title)}' width='{width}' "
           f"height='{height}' viewBox='0 0 {width} {height}' "
           "xmlns='http://www.w3.org/2000/svg' font-family='system-ui,sans-serif' "
           f"font-size='{FONT}'>",
           f"<text x='0' y='15' font-weight='bold'>{e(fit(title, width))}</text>"]
    base = top + bar * len(items)
    for t in ticks:
        out.append(f"<line x1='{px(t):.1f}' y1='{top}' x2='{px(t):.1f}' y2='{base}' "
                   "stroke='#eee'/>")
        out.append(f"<text class='tick x-tick' x='{px(t):.1f}' y='{base + 14}' "
                   f"text-anchor='middle'>{fmt(t)}</text>")
    for i, (label, value) in enumerate(items):
        y = top + i * bar
        x_start, x_end = sorted((px(max(t0, 0.0)), px(value)))
        out.append(f"<text class='bar-label' x='{label_w - 6}' y='{y + 14}' text-anchor='end'>"
                   f"<title>{e(label)}</title>{e(fit(label, label_w - 10))}</text>"
                   f"<rect class='point' x='{x_start:.1f}' y='{y + 3}' "
                   f"width='{max(x_end - x_start, 1):.1f}' height='{bar - 6}' fill='{COLORS[0]}'/>"
                   f"<text x='{x_end + 4:.1f}' y='{y + 14}'>{value:.3f}</text>")
    out.append(f"<line x1='{label_w}' y1='{base}' x2='{label_w + pw}' y2='{base}' "
               "stroke='#888'/>")
    out.append(f"<text class='x-title' x='{label_w + pw / 2:.1f}' y='{base + 32}' "
               f"text-anchor='middle'>{e(fit(x.title, pw))}</text>")
    return "".join(out) + "</svg>"


PAGE_CSS = """
body{font-family:system-ui,sans-serif;max-width:1060px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left;font-size:14px}th{background:#f4f4f4}.flag{color:#b00;font-weight:bold}
.ok{color:#070}.note{color:#555;font-size:14px;margin:.2em 0 .8em}svg.chart{background:#fff;
display:block;margin:.5em 0}nav a{margin-right:1em}form label{margin-right:1em}
td.num{text-align:right;font-variant-numeric:tabular-nums}
"""


def page(title: str, body: str, refresh: int | None = None) -> str:
    """A complete HTML document; ``refresh`` reloads it every that many seconds (a running job)."""
    meta = f"<meta http-equiv='refresh' content='{refresh}'>" if refresh else ""
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>{meta}"
            f"<title>{html.escape(title)}</title><style>{PAGE_CSS}</style></head><body>"
            f"{body}</body></html>")
