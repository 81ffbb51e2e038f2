"""A self-contained HTML report: a results table and an inline SVG plot per benchmark.

No plotting library and no JavaScript: the report is a single file a user can attach to a
ticket. A numeric parameter (eps, sigma, severity) becomes a line plot's x axis; anything
else becomes bars.
"""

from __future__ import annotations

import html
from collections import defaultdict
from typing import Any

from service.evaluations.schemas import EvaluationOut, ResultOut

_X_PARAMS = ("eps", "sigma", "severity")
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")


def render(ev: EvaluationOut) -> str:
    e = html.escape
    by_bench: dict[str, list[ResultOut]] = defaultdict(list)
    for r in ev.results:
        by_bench[r.benchmark].append(r)
    sections = [_section(name, rows) for name, rows in by_bench.items()]
    checks = "".join(
        f"<li class='{'ok' if c.get('passed') else 'flag'}'>{e(str(c.get('name')))}: "
        f"{'passed' if c.get('passed') else 'FLAGGED'} {e(str(c.get('detail', '')))}</li>"
        for c in ev.checks
    )
    error = (f"<p class='flag'>Error ({e(ev.error.type)}): {e(ev.error.detail)}</p>"
             if ev.error else "")
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>robustscope report {ev.id}</title><style>
body{{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;
text-align:left;font-size:14px}}.flag{{color:#b00}}.ok{{color:#070}}svg{{background:#fafafa}}
</style></head><body>
<h1>Evaluation of {e(ev.model_name)} on {e(ev.dataset)}</h1>
<p>Status <b>{e(ev.status)}</b> · seed {ev.seed} · device {e(ev.device or '-')} ·
engine {e(ev.engine_version or '-')} · attempts {ev.attempts} · finished {ev.finished_at or '-'}
</p>{error}
<h2>Sanity checks</h2><ul>{checks or '<li>none reported</li>'}</ul>
{''.join(sections)}
</body></html>"""


def _label(params: dict[str, Any], skip: str | None = None) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(params.items()) if k != skip) or "-"


# Cost rows (passes per example, seconds) are listed in the table but kept out of the plot,
# whose scale is the accuracies'.
_COST_METRICS = frozenset({"forward_passes", "backward_passes", "attack_seconds"})


def _section(name: str, rows: list[ResultOut]) -> str:
    e = html.escape
    plotted = [r for r in rows if r.metric not in _COST_METRICS]
    table = "".join(
        f"<tr><td>{e(r.metric)}</td><td>{e(_label(r.params))}</td><td>{r.value:.4f}</td></tr>"
        for r in rows
    )
    return (f"<h2>{e(name)}</h2>{_plot(plotted) if plotted else ''}"
            f"<table><tr><th>metric</th><th>parameters</th>"
            f"<th>value</th></tr>{table}</table>")


def _plot(rows: list[ResultOut]) -> str:
    x_param = next((p for p in _X_PARAMS
                    if sum(isinstance(r.params.get(p), int | float) for r in rows) >= 2), None)
    if x_param is not None:
        series: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in rows:
            x = r.params.get(x_param)
            if isinstance(x, int | float):
                series[f"{r.metric} ({_label(r.params, x_param)})"].append((float(x), r.value))
        return _lines(series, x_param)
    return _bars([(f"{r.metric} {_label(r.params)}", r.value) for r in rows])


def _lines(series: dict[str, list[tuple[float, float]]], x_name: str) -> str:
    w, h, pad = 640, 260, 40
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(0.0, min(ys)), max(1.0, max(ys))

    def px(x: float, y: float) -> tuple[float, float]:
        return (pad + (x - x0) / (x1 - x0) * (w - 2 * pad),
                h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad))

    parts = [f"<svg width='{w}' height='{h + 20 * len(series)}' xmlns='http://www.w3.org/2000/svg'>",
             f"<line x1='{pad}' y1='{h - pad}' x2='{w - pad}' y2='{h - pad}' stroke='#888'/>",
             f"<line x1='{pad}' y1='{pad}' x2='{pad}' y2='{h - pad}' stroke='#888'/>",
             f"<text x='{w / 2}' y='{h - 8}' font-size='12'>{html.escape(x_name)}</text>",
             f"<text x='4' y='{pad}' font-size='11'>{y1:.2f}</text>",
             f"<text x='4' y='{h - pad}' font-size='11'>{y0:.2f}</text>"]
    for i, (name, pts) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        xy = [px(x, y) for x, y in sorted(pts)]
        parts.append(f"<polyline fill='none' stroke='{color}' stroke-width='2' "
                     f"points='{' '.join(f'{a:.1f},{b:.1f}' for a, b in xy)}'/>")
        parts += [f"<circle cx='{a:.1f}' cy='{b:.1f}' r='3' fill='{color}'/>" for a, b in xy]
        parts.append(f"<text x='{pad}' y='{h + 14 + 20 * i}' font-size='12' fill='{color}'>"
                     f"{html.escape(name)}</text>")
    return "".join(parts) + "</svg>"


def _bars(items: list[tuple[str, float]]) -> str:
    w, bar = 640, 18
    top = max([1.0, *[v for _, v in items]])
    parts = [f"<svg width='{w}' height='{bar * len(items) + 10}' "
             "xmlns='http://www.w3.org/2000/svg'>"]
    for i, (label, value) in enumerate(items):
        length = max(0.0, value) / top * (w - 330)
        parts.append(f"<text x='0' y='{i * bar + 13}' font-size='11'>"
                     f"{html.escape(label[:48])}</text><rect x='300' y='{i * bar + 3}' "
                     f"width='{length:.1f}' height='{bar - 5}' fill='#1f77b4'/><text "
                     f"x='{305 + length:.1f}' y='{i * bar + 13}' font-size='11'>{value:.3f}</text>")
    return "".join(parts) + "</svg>"
