"""``GET /sweeps/{id}/report``: the trade-off of a sweep as a page.

Per norm of the grid, two scatter plots with one point per model: robust accuracy at that
norm's largest eps against RFS, and against BG-gap. The standard model is a black square,
models trained in a norm are coloured by it. Then the per-model table, with links to each
model's evaluation report, its training and its model record.
"""

from __future__ import annotations

import html

from contract.jobs import FINAL_STATES
from service.http.svg import Axis, Series, chart, page
from service.sweeps.schemas import SweepOut, SweepRow

NORM_COLORS = {"l2": "#1f77b4", "linf": "#d62728", "l1": "#2ca02c"}
NORM_NAMES = {"l2": "l_2", "linf": "l_inf", "l1": "l_1"}
FINAL = FINAL_STATES


def _eps_text(norm: str, eps: float) -> str:
    return f"{eps * 255:.3g}/255" if norm == "linf" else f"{eps:.4g}"


def _threat_keys(sweep: SweepOut) -> dict[str, tuple[str, float]]:
    """Per norm, the key ("norm:eps") and eps of its largest eps in the table."""
    best: dict[str, tuple[str, float]] = {}
    for row in sweep.table:
        for key in row.robust_accuracy:
            norm, _, eps_s = key.partition(":")
            eps = float(eps_s)
            if norm not in best or eps > best[norm][1]:
                best[norm] = (key, eps)
    return dict(sorted(best.items()))


def _series(rows: list[SweepRow], key: str, axis: str) -> list[Series]:
    groups: dict[str, list[SweepRow]] = {}
    for r in rows:
        groups.setdefault("standard" if r.norm is None else r.norm, []).append(r)
    out = []
    for group, members in groups.items():
        pts, labels, links = [], [], []
        for r in members:
            xv = r.rfs if axis == "rfs" else r.bg_gap
            yv = r.robust_accuracy.get(key)
            if xv is None or yv is None:
                continue
            pts.append((xv, yv))
            labels.append(f"{r.name or r.method}: robust {yv:.3f}, "
                          f"{'RFS' if axis == 'rfs' else 'BG-gap'} {xv:.3f}")
            links.append(f"/evaluations/{r.evaluation_id}/report")
        if not pts:
            continue
        name = ("standard training" if group == "standard"
                else f"{members[0].method} in {NORM_NAMES.get(group, group)}")
        out.append(Series(name, pts, "#000" if group == "standard" else
                          NORM_COLORS.get(group, "#9467bd"), line=False,
                          marker="square" if group == "standard" else "circle",
                          labels=labels, links=links))
    return out


def _cell(v: float | None) -> str:
    return "<td class='num'>-</td>" if v is None else f"<td class='num'>{v:.3f}</td>"


def render(sweep: SweepOut) -> str:
    e = html.escape
    spec = sweep.spec
    keys = _threat_keys(sweep)
    charts = []
    for norm, (key, eps) in keys.items():
        threat = f"{NORM_NAMES.get(norm, norm)} eps {_eps_text(norm, eps)}"
        y = Axis(f"robust accuracy, APGD {threat} (fraction)", 0.0, 1.0)
        charts.append(f"<h3>{e(threat)}</h3>")
        charts.append(chart(f"Robust accuracy ({threat}) against RFS",
                            Axis("RFS: relative foreground sensitivity (-1 to 1; higher = "
                                 "relies more on the object)"),
                            y, _series(sweep.table, key, "rfs")))
        charts.append(chart(f"Robust accuracy ({threat}) against BG-gap",
                            Axis("BG-gap: acc(mixed_same) - acc(mixed_rand) (fraction; "
                                 "higher = relies more on the background)"),
                            y, _series(sweep.table, key, "bg_gap")))
    all_keys = sorted({k for r in sweep.table for k in r.robust_accuracy})
    zg_norms = sorted({n for r in sweep.table for n in r.zero_gradient_fraction})
    head = ("<tr><th>model</th><th>method</th><th>norm</th><th>eps</th><th>training</th>"
            "<th>evaluation</th><th>clean</th>"
            + "".join(f"<th>robust {e(k.split(':')[0])} "
                      f"{e(_eps_text(k.split(':')[0], float(k.split(':')[1])))}</th>"
                      for k in all_keys)
            + "".join(f"<th>no gradient {e(NORM_NAMES.get(n, n))}</th>" for n in zg_norms)
            + "<th>RFS</th><th>BG-gap</th><th>mixed_rand</th><th>worst group</th>"
              "<th>checks</th><th>links</th></tr>")
    body = []
    for r in sweep.table:
        flag = ("<td>-</td>" if r.degenerate is None else
                "<td class='flag'>degenerate predictions</td>" if r.degenerate
                else "<td class='ok'>ok</td>")
        links = [f"<a href='/trainings/{r.training_id}'>training</a>"]
        if r.model_id:
            links.append(f"<a href='/models/{r.model_id}'>model</a>")
        if r.evaluation_id:
            links.append(f"<a class='report' href='/evaluations/{r.evaluation_id}/report'>"
                         "report</a>")
        body.append(
            f"<tr><td>{e(r.name or r.method)}</td><td>{e(r.method)}</td>"
            f"<td>{e(NORM_NAMES.get(r.norm, r.norm) if r.norm else '-')}</td>"
            f"<td>{e(_eps_text(r.norm, r.eps)) if r.norm and r.eps is not None else '-'}</td>"
            f"<td>{e(r.training_status)}</td><td>{e(r.evaluation_status or '-')}</td>"
            + _cell(r.clean_accuracy) + "".join(_cell(r.robust_accuracy.get(k))
                                                for k in all_keys)
            + "".join(_cell(r.zero_gradient_fraction.get(n)) for n in zg_norms)
            + _cell(r.rfs) + _cell(r.bg_gap) + _cell(r.mixed_rand_accuracy)
            + _cell(r.worst_group_accuracy) + flag + f"<td>{' · '.join(links)}</td></tr>")
    params = ", ".join(f"{k}={v}" for k, v in sorted((spec.get("dataset_params") or {}).items()))
    subset = spec.get("n_examples")
    html_body = f"""
<nav><a href='/docs'>API</a><a href='/sweeps/{sweep.id}'>sweep JSON</a></nav>
<h1>Sweep on {e(str(spec.get('dataset')))} ({e(str(spec.get('architecture')))})</h1>
<p>Status <b>{e(sweep.status)}</b>: {e(sweep.progress.message)}
({100 * sweep.progress.fraction:.0f}%) · dataset parameters: {e(params or 'defaults')} ·
evaluated on {e(f'a seeded subset of {subset} test examples' if subset else 'the whole test split')}
· created {sweep.created_at:%Y-%m-%d %H:%M} UTC</p>
<h2>The trade-off</h2>
<p class='note'>One point per model. Up is more adversarially robust; in the RFS plots right is
more reliance on the object (better), in the BG-gap plots right is more reliance on the
background (worse). Moayeri et al. (2022) find l_1 and l_2 adversarial training moves models
left of the standard model in RFS, and l_inf only when the background's scale exceeds the
object's. Click a point for its evaluation report.</p>
{''.join(charts) or "<p>No results yet.</p>"}
<h2>Models</h2>
<p class='note'>Accuracies are fractions of the test examples; robust accuracy is APGD-CE's at
the given threat (higher is better); RFS higher is better; BG-gap lower is better;
worst group is the lowest accuracy over (label, background) groups (higher is better).</p>
<table>{head}{''.join(body)}</table>
"""
    return page(f"robustscope sweep {sweep.id}", html_body,
                refresh=None if sweep.status in FINAL else 15)
