"""``GET /sweeps/{id}/report``: the trade-off of a sweep as a page.

Per norm of the grid, two scatter plots side by side with one point per model: robust
accuracy at that norm's largest eps against RFS, and against BG-gap, on fixed ranges
(accuracy [0, 1], RFS and BG-gap [-1, 1]). The standard model is a black square crossed by
dashed reference lines; models trained in a norm are coloured by it. Then the per-model table
(its checks beside each model's name), with links to each model's evaluation report, and for
the owner its training and model record.
"""

from __future__ import annotations

import html

from contract.jobs import FINAL_STATES, JobStatus
from service.http.chrome import NORM_NAMES, eps_text, nav, num, scroll, share_form
from service.http.svg import Axis, Reference, Series, chart, page
from service.sweeps.schemas import SweepOut, SweepRow

NORM_COLORS = {"l2": "#1f77b4", "linf": "#d62728", "l1": "#2ca02c"}
FINAL = FINAL_STATES


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
        name = ("standard training (black square)" if group == "standard"
                else f"{members[0].method} trained in {NORM_NAMES.get(group, group)}")
        out.append(Series(name, pts, "#000" if group == "standard" else
                          NORM_COLORS.get(group, "#9467bd"), line=False,
                          marker="square" if group == "standard" else "circle",
                          labels=labels, links=links))
    return out


def _reference(rows: list[SweepRow], key: str, axis: str) -> Reference | None:
    """The standard model's point, marked across the chart."""
    for r in rows:
        xv = r.rfs if axis == "rfs" else r.bg_gap
        yv = r.robust_accuracy.get(key)
        if r.norm is None and xv is not None and yv is not None:
            return Reference("the standard model", xv, yv)
    return None


def _cell(v: float | None, ci: tuple[float, float] | None = None) -> str:
    """A value, and under it its 95% interval when it has one."""
    if v is None:
        return "<td class='num'>-</td>"
    under = f"<div class='ci'>{ci[0]:.2f} to {ci[1]:.2f}</div>" if ci else ""
    return f"<td class='num'>{num(v)}{under}</td>"


def _checks(r: SweepRow) -> str:
    if r.evaluation_status != JobStatus.SUCCEEDED:
        return "<td>-</td>"
    if not r.failed_checks:
        return "<td class='ok'>passed</td>"
    names = ", ".join("degenerate predictions" if c == "degenerate_predictions" else c
                      for c in r.failed_checks)
    return f"<td class='flag'>{html.escape(names)}</td>"


RFS_AXIS = Axis("RFS: relative foreground sensitivity (-1 to 1; higher = relies more on the "
                "object)", -1.0, 1.0)
BG_AXIS = Axis("BG-gap: acc(mixed_same) - acc(mixed_rand) (-1 to 1; higher = relies more on "
               "the background)", -1.0, 1.0)


def render(sweep: SweepOut, viewer: str | None = None, mine: bool = False,
           shared: bool = False) -> str:
    e = html.escape
    spec = sweep.spec
    keys = _threat_keys(sweep)
    charts = []
    for norm, (key, eps) in keys.items():
        threat = f"{NORM_NAMES.get(norm, norm)} eps {eps_text(norm, eps)}"
        y = Axis(f"robust accuracy, APGD-CE {threat} (fraction)", 0.0, 1.0)
        pair = [chart(f"Robust accuracy ({threat}) against {label}", x_axis, y,
                      _series(sweep.table, key, axis), width=600,
                      reference=_reference(sweep.table, key, axis))
                for axis, label, x_axis in (("rfs", "RFS", RFS_AXIS),
                                            ("bg_gap", "BG-gap", BG_AXIS))]
        charts.append(f"<h3>{e(threat)}</h3><div class='charts'>{''.join(pair)}</div>")
    all_keys = sorted({k for r in sweep.table for k in r.robust_accuracy},
                      key=lambda k: (k.split(":")[0], float(k.split(":")[1])))
    zg_norms = sorted({n for r in sweep.table for n in r.zero_gradient_fraction})
    head = ("<tr><th>model</th><th>checks</th><th>trained</th><th>status</th><th>clean</th>"
            + "".join(f"<th>robust {e(NORM_NAMES.get(k.split(':')[0], k.split(':')[0]))} "
                      f"{e(eps_text(k.split(':')[0], float(k.split(':')[1])))}</th>"
                      for k in all_keys)
            + "".join(f"<th>no gradient {e(NORM_NAMES.get(n, n))}</th>" for n in zg_norms)
            + "<th>RFS</th><th>BG-gap</th><th>mixed_rand</th><th>worst group</th>"
              "<th>links</th></tr>")
    body = []
    for r in sweep.table:
        links = []
        if mine:
            links.append(f"<a href='/trainings/{r.training_id}'>training</a>")
            if r.model_id:
                links.append(f"<a href='/models/{r.model_id}'>model</a>")
        if r.evaluation_id and not shared:
            links.append(f"<a class='report' href='/evaluations/{r.evaluation_id}/report'>"
                         "report</a>")
        trained = (f"{r.method}, {NORM_NAMES.get(r.norm, r.norm)} eps {eps_text(r.norm, r.eps)}"
                   if r.norm and r.eps is not None else r.method)
        status = r.training_status if r.evaluation_status is None else (
            r.evaluation_status if r.training_status == JobStatus.SUCCEEDED else r.training_status)
        flagged = " class='flagged'" if r.failed_checks else ""
        body.append(
            f"<tr{flagged}><td>{e(r.name or r.method)}</td>{_checks(r)}<td>{e(trained)}</td>"
            f"<td>{e(status)}</td>"
            + _cell(r.clean_accuracy, r.intervals.get("clean_accuracy"))
            + "".join(_cell(r.robust_accuracy.get(k), r.intervals.get(f"robust_accuracy:{k}"))
                      for k in all_keys)
            + "".join(_cell(r.zero_gradient_fraction.get(n)) for n in zg_norms)
            + _cell(r.rfs) + _cell(r.bg_gap)
            + _cell(r.mixed_rand_accuracy, r.intervals.get("mixed_rand_accuracy"))
            + _cell(r.worst_group_accuracy, r.intervals.get("worst_group_accuracy"))
            + f"<td>{' · '.join(links) or '-'}</td></tr>")
    params = ", ".join(f"{k}={v}" for k, v in sorted((spec.get("dataset_params") or {}).items()))
    subset = spec.get("n_examples")
    counted = f" ({subset} of them)" if subset else ""
    nav_links = [(f"/sweeps/{sweep.id}", "sweep JSON")] if mine else []
    visibility = ("public: anyone can open this page" if spec.get("public") else
                  "shared by link: read-only" if shared else "private")
    html_body = f"""
{nav(None if shared else viewer, "" if shared else f"/sweeps/{sweep.id}/report", *nav_links)}
<h1>Sweep on {e(str(spec.get('dataset')))} ({e(str(spec.get('architecture')))})</h1>
<p>Status <b>{e(sweep.status)}</b>: {e(sweep.progress.message)}
({100 * sweep.progress.fraction:.0f}%) · dataset parameters: {e(params or 'defaults')} ·
evaluated on {e(f'a seeded subset of {subset} test examples' if subset else 'the whole test split')}
· created {sweep.created_at:%Y-%m-%d %H:%M} UTC · {visibility}</p>
<h2>The trade-off</h2>
<p class='note'>One point per model; the dashed lines cross at the standard model. Up is more
adversarially robust; in the RFS plots right is more reliance on the object (better), in the
BG-gap plots right is more reliance on the background (worse). Moayeri et al. (2022) find l_1
and l_2 adversarial training moves models left of the standard model in RFS, and l_inf only
when the background's scale exceeds the object's. Click a point for its evaluation report.</p>
{''.join(charts) or "<p>No results yet.</p>"}
<h2>Models</h2>
<p class='note'>Accuracies are fractions of the test examples{counted}, each with its 95%
interval under it; robust accuracy is APGD-CE's at
the given threat (higher is better); RFS higher is better; BG-gap lower is better;
worst group is the lowest accuracy over (label, background) groups (higher is better). A model
whose checks failed (red) is not to be trusted as its numbers stand: its report says why.</p>
{scroll(f"<table class='models'>{head}{''.join(body)}</table>")}
{share_form('sweep', sweep.id) if mine and not spec.get('public') else ''}
"""
    return page(f"robustscope sweep on {spec.get('dataset')}", html_body,
                refresh=None if sweep.status in FINAL else 15)

