"""Inline SVG charts for the server-rendered pages: axes with tick values and titles (with
units), labels wrapped to fit (never cut), no JavaScript and no plotting library, so a page is
one file that renders offline.

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
BOLD = 0.82  # the share of a line's width to wrap bold text at (bold glyphs are wider)


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


def wrap(text: str, width: float) -> list[str]:
    """``text`` in lines of at most ``width`` pixels, broken at spaces (a word longer than a
    line is broken inside): nothing is cut."""
    room = max(4, int(width / CHAR_W))
    lines: list[str] = []
    line = ""
    for word in text.split():
        while len(word) > room:
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:room])
            word = word[room:]
        if not line:
            line = word
        elif len(line) + 1 + len(word) <= room:
            line += " " + word
        else:
            lines.append(line)
            line = word
    if line or not lines:
        lines.append(line)
    return lines


def _text(lines: Sequence[str], x: float, y: float, attrs: str, step: float = 15) -> str:
    """Lines of text from baseline ``y`` down, one ``<text>`` with a ``<tspan>`` per line."""
    e = html.escape
    spans = "".join(f"<tspan x='{x:.1f}' dy='{0 if i == 0 else step}'>{e(t)}</tspan>"
                    for i, t in enumerate(lines))
    return f"<text x='{x:.1f}' y='{y:.1f}' {attrs}>{spans}</text>"


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
    dashed: bool = False  # a dashed line (so a line drawn over another stays visible)


@dataclass(frozen=True)
class Reference:
    """A marked point of reference: dashed lines through it on both axes, and its name."""

    name: str
    x: float
    y: float


def chart(title: str, x: Axis, y: Axis, series: Sequence[Series], width: int = 640,
          height: int = 300, reference: Reference | None = None) -> str:
    """A line chart or scatter plot with ticks on both axes, axis titles and a legend; every
    text wraps to the chart's width (nothing is cut)."""
    e = html.escape
    series = [s for s in series if s.points]
    left, right, plot_h = 70, 16, height - 76
    title_lines = wrap(title, (width - 10) * BOLD)
    y_lines = wrap(y.title, plot_h)
    left += 15 * (len(y_lines) - 1)
    pw = width - left - right
    x_lines = wrap(x.title, pw)
    top = 12 + 16 * len(title_lines)
    ph = plot_h
    xs = [p[0] for s in series for p in s.points] or [0.0, 1.0]
    ys = [p[1] for s in series for p in s.points] or [0.0, 1.0]
    if reference is not None:
        xs, ys = [*xs, reference.x], [*ys, reference.y]
    xt = nice_ticks(x.lo if x.lo is not None else min(xs), x.hi if x.hi is not None else max(xs))
    yt = nice_ticks(y.lo if y.lo is not None else min(ys), y.hi if y.hi is not None else max(ys))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def px(vx: float, vy: float) -> tuple[float, float]:
        return (left + (vx - x0) / (x1 - x0) * pw, top + ph - (vy - y0) / (y1 - y0) * ph)

    legend = [(s, wrap(s.name, pw - 20)) for s in series]
    if reference is not None:
        legend_ref = wrap(f"dashed lines: {reference.name}", pw - 20)
    legend_h = sum(4 + 15 * len(lines) for _, lines in legend) + (
        4 + 15 * len(legend_ref) if reference is not None else 0)
    x_title_y = top + ph + 34
    total_h = x_title_y + 15 * len(x_lines) + 6 + legend_h
    out = [f"<svg class='chart' role='img' aria-label='{e(title)}' width='{width}' "
           f"height='{total_h}' viewBox='0 0 {width} {total_h}' "
           f"xmlns='http://www.w3.org/2000/svg' font-family='system-ui,sans-serif' "
           f"font-size='{FONT}'>",
           _text(title_lines, 4, 16, "class='title' font-weight='bold'", 16)]
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
    out.append(_text(x_lines, left + pw / 2, x_title_y, "class='x-title' text-anchor='middle'"))
    mid = top + ph / 2
    spans = "".join(f"<tspan x='0' dy='{0 if i == 0 else 15}'>{e(t)}</tspan>"
                    for i, t in enumerate(y_lines))
    out.append(f"<text class='y-title' transform='translate(14,{mid:.1f}) rotate(-90)' "
               f"text-anchor='middle' x='0' y='0'>{spans}</text>")
    if reference is not None:
        rx, ry = px(reference.x, reference.y)
        out.append(f"<g class='reference'><title>{e(reference.name)}</title>"
                   f"<line x1='{rx:.1f}' y1='{top}' x2='{rx:.1f}' y2='{top + ph}' "
                   "stroke='#000' stroke-dasharray='5 4'/>"
                   f"<line x1='{left}' y1='{ry:.1f}' x2='{left + pw}' y2='{ry:.1f}' "
                   "stroke='#000' stroke-dasharray='5 4'/></g>")
    for s in series:
        pts = [px(a, b) for a, b in (sorted(s.points) if s.line else s.points)]
        dash = " stroke-dasharray='7 4'" if s.dashed else ""
        if s.line and len(pts) > 1:
            out.append(f"<polyline fill='none' stroke='{s.color}' stroke-width='2'{dash} "
                       "points='" + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + "'/>")
        for i, (a, b) in enumerate(pts):
            tip = e(s.labels[i] if i < len(s.labels) else s.name)
            mark = (f"<rect class='point' x='{a - 5:.1f}' y='{b - 5:.1f}' width='10' "
                    f"height='10' fill='{s.color}' stroke='#000'><title>{tip}</title></rect>"
                    if s.marker == "square" else
                    f"<circle class='point' cx='{a:.1f}' cy='{b:.1f}' r='4' "
                    f"fill='{s.color}'><title>{tip}</title></circle>")
            if i < len(s.links):
                mark = f"<a href='{e(s.links[i])}'>{mark}</a>"
            out.append(mark)
    ly = x_title_y + 15 * len(x_lines) + 6
    for s, lines in legend:
        if s.line:
            dash = " stroke-dasharray='4 2'" if s.dashed else ""
            swatch = (f"<line x1='{left:.1f}' y1='{ly + 5:.1f}' x2='{left + 14:.1f}' "
                      f"y2='{ly + 5:.1f}' stroke='{s.color}' stroke-width='3'{dash}/>")
        else:
            edge = " stroke='#000'" if s.marker == "square" else ""
            swatch = (f"<rect x='{left:.1f}' y='{ly:.1f}' width='10' height='10' "
                      f"fill='{s.color}'{edge}/>")
        out.append(swatch + _text(lines, left + 20, ly + 9, "class='legend'"))
        ly += 4 + 15 * len(lines)
    if reference is not None:
        out.append(f"<line x1='{left:.1f}' y1='{ly + 5:.1f}' x2='{left + 14:.1f}' "
                   f"y2='{ly + 5:.1f}' stroke='#000' stroke-dasharray='4 2'/>"
                   + _text(legend_ref, left + 20, ly + 9, "class='legend'"))
    return "".join(out) + "</svg>"


def bars(title: str, items: Sequence[tuple[str, float]], x: Axis, width: int = 640) -> str:
    """Horizontal bars with a value axis (ticks and title) under them; each label wraps in
    its column (nothing is cut)."""
    e = html.escape
    label_w, right = 250, 50
    pw = width - label_w - right
    hi = max([x.hi if x.hi is not None else 0.0, *[v for _, v in items], 1e-9])
    lo = min([x.lo if x.lo is not None else 0.0, *[v for _, v in items]])
    ticks = nice_ticks(lo, hi)
    t0, t1 = ticks[0], ticks[-1]
    title_lines = wrap(title, (width - 10) * BOLD)
    top = 10 + 16 * len(title_lines)
    labels = [wrap(label, label_w - 10) for label, _ in items]
    heights = [max(20, 6 + 15 * len(lines)) for lines in labels]
    base = top + sum(heights)
    x_lines = wrap(x.title, pw)
    height = base + 34 + 15 * len(x_lines)

    def px(v: float) -> float:
        return label_w + (v - t0) / (t1 - t0) * pw

    out = [f"<svg class='chart' role='img' aria-label='{e(title)}' width='{width}' "
           f"height='{height}' viewBox='0 0 {width} {height}' "
           "xmlns='http://www.w3.org/2000/svg' font-family='system-ui,sans-serif' "
           f"font-size='{FONT}'>",
           _text(title_lines, 0, 15, "class='title' font-weight='bold'", 16)]
    for t in ticks:
        out.append(f"<line x1='{px(t):.1f}' y1='{top}' x2='{px(t):.1f}' y2='{base}' "
                   "stroke='#eee'/>")
        out.append(f"<text class='tick x-tick' x='{px(t):.1f}' y='{base + 14}' "
                   f"text-anchor='middle'>{fmt(t)}</text>")
    y = top
    for (label, value), lines, h in zip(items, labels, heights, strict=True):
        x_start, x_end = sorted((px(max(t0, 0.0)), px(value)))
        out.append(_text(lines, label_w - 6, y + 14, "class='bar-label' text-anchor='end'")
                   + f"<rect class='point' x='{x_start:.1f}' y='{y + 3}' "
                   f"width='{max(x_end - x_start, 1):.1f}' height='{h - 6}' fill='{COLORS[0]}'>"
                   f"<title>{e(label)}: {value:.4f}</title></rect>"
                   f"<text x='{x_end + 4:.1f}' y='{y + 14}'>{value:.3f}</text>")
        y += h
    out.append(f"<line x1='{label_w}' y1='{base}' x2='{label_w + pw}' y2='{base}' "
               "stroke='#888'/>")
    out.append(_text(x_lines, label_w + pw / 2, base + 32, "class='x-title' text-anchor='middle'"))
    return "".join(out) + "</svg>"


PAGE_CSS = """
body{font-family:system-ui,sans-serif;max-width:1240px;margin:1.5em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left;font-size:14px;vertical-align:top}th{background:#f4f4f4}
.flag{color:#b00;font-weight:bold}.ok{color:#070}.note{color:#555;font-size:14px;
margin:.2em 0 .8em}svg.chart{background:#fff;display:block;margin:.5em 0;max-width:100%;
height:auto}nav{display:flex;flex-wrap:wrap;gap:1em;align-items:center;margin-bottom:.5em}
nav .who{margin-left:auto;color:#555}nav form{display:inline;margin:0}
form label{margin-right:1em}td.num{text-align:right;font-variant-numeric:tabular-nums;
white-space:nowrap}.scroll{overflow-x:auto;max-width:100%}
.scroll table{margin:0}.scroll th:first-child,.scroll td:first-child{position:sticky;left:0;
background:#fff;z-index:1;box-shadow:1px 0 0 #ccc}.scroll th:first-child{background:#f4f4f4}
.charts{display:flex;flex-wrap:wrap;gap:1em}.charts svg.chart{flex:0 0 auto}
tr.flagged td{background:#fff4f4}.scroll tr.flagged td:first-child{background:#fff4f4}
.ci{color:#555;font-size:12px}.box{border:1px solid #e0b0b0;background:#fff8f8;padding:.5em 1em}
"""


def page(title: str, body: str, refresh: int | None = None) -> str:
    """A complete HTML document; ``refresh`` reloads it every that many seconds (a running job)."""
    meta = f"<meta http-equiv='refresh' content='{refresh}'>" if refresh else ""
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>{meta}"
            f"<title>{html.escape(title)}</title><style>{PAGE_CSS}</style></head><body>"
            f"{body}</body></html>")
