"""``GET /evaluations/{id}/compare/page?baseline=…``: two evaluations of the same examples side
by side, built on the paired comparison (``service.evaluations.compare``): every metric both
measured, each value with its 95% interval, the difference with its paired interval and
McNemar's p-value, and which of the two is better. Two evaluations that did not measure the
same examples are not compared: the page says what differs."""

from __future__ import annotations

import html
from typing import Any

from core.tables import Evaluation
from service.evaluations.compare import Comparison, MetricComparison
from service.evaluations.page import COST_METRICS, error_detail
from service.http.chrome import nav, num, scroll
from service.http.svg import page


def _params(params: dict[str, Any]) -> str:
    hidden = {"sigmas", "types", "severities"}
    return ", ".join(f"{k}={f'{v:.4g}' if isinstance(v, float) else v}"
                     for k, v in sorted(params.items()) if k not in hidden) or "-"


def _ci(interval: tuple[float, float] | None) -> str:
    return f"<div class='ci'>{interval[0]:.3f} to {interval[1]:.3f}</div>" if interval else ""


def verdict(m: MetricComparison, name: str, baseline: str) -> tuple[str, str]:
    """(which is better, its CSS class). A paired accuracy is better only when the interval
    of the difference excludes 0; any other metric by its value, said to be unpaired."""
    sign = m.difference if m.better == "higher" else -m.difference
    if m.difference == 0:
        return "equal", "same"
    winner = name if sign > 0 else baseline
    if m.interval is not None:
        if m.interval[0] <= 0 <= m.interval[1]:
            return "no clear difference (the interval holds 0)", "same"
        return winner, "better" if sign > 0 else "worse"
    return f"{winner} (no interval for this metric)", "better" if sign > 0 else "worse"


def render(viewer: str | None, ev: Evaluation, base: Evaluation,
           comparison: Comparison | None, problem: str | None,
           differences: list[dict[str, Any]] | None = None) -> str:
    e = html.escape
    here = f"/evaluations/{ev.id}/compare/page?baseline={base.id}"
    top = nav(viewer, here, (f"/evaluations/{ev.id}/report", f"report of {ev.model_name}"),
              (f"/evaluations/{base.id}/report", f"report of {base.model_name}"),
              (f"/evaluations/{base.id}/compare/page?baseline={ev.id}", "swap the two"))
    title = f"{ev.model_name} against {base.model_name}"
    if comparison is None:
        rows = "".join(f"<tr><td>{e(str(d['field']))}</td><td>{e(str(d['evaluation']))}</td>"
                       f"<td>{e(str(d['baseline']))}</td></tr>" for d in differences or [])
        table = (f"<table><tr><th>setting</th><th>{e(ev.model_name)}</th>"
                 f"<th>{e(base.model_name)}</th></tr>{rows}</table>" if rows else "")
        body = (f"{top}<h1>{e(title)}</h1><div class='box'><p class='flag'>These two are not "
                f"compared: {e(error_detail(problem or ''))}</p>{table}<p>Compare evaluations "
                "that measured the same examples: the same dataset and parameters, split, seed "
                "and number of examples. Evaluate one model again with the other's settings, "
                "or open the two reports side by side.</p></div>")
        return page(f"robustscope: {title}", body)
    c = comparison
    a, b = e(c.model_name), e(c.baseline_model_name)
    measured = [m for m in c.metrics if m.metric not in COST_METRICS]
    costs = [m for m in c.metrics if m.metric in COST_METRICS]
    body_rows = []
    for m in measured:
        said, cls = verdict(m, c.model_name, c.baseline_model_name)
        p = f"{m.p_value:.3g}" if m.p_value is not None else "-"
        diff_ci = _ci(m.interval) if m.interval else ""
        body_rows.append(
            f"<tr><td>{e(m.benchmark)} · {e(m.metric)}<div class='ci'>{e(_params(m.params))}"
            f"</div></td><td class='num'>{num(m.value, 4)}{_ci(m.value_interval)}</td>"
            f"<td class='num'>{num(m.baseline_value, 4)}{_ci(m.baseline_interval)}</td>"
            f"<td class='num'>{m.difference:+.4f}{diff_ci}</td><td class='num'>{p}</td>"
            f"<td class='{cls}'>{e(said)} <span class='ci'>({m.better} is better)</span></td>"
            "</tr>")
    cost_rows = "".join(
        f"<tr><td>{e(m.metric.replace('_', ' '))}</td><td>{e(_params(m.params))}</td>"
        f"<td class='num'>{m.value:.4g}</td><td class='num'>{m.baseline_value:.4g}</td></tr>"
        for m in costs)
    only = "".join(
        f"<li>only {who}: {e(r['benchmark'])} · {e(r['metric'])} ({e(_params(r['params']))})"
        "</li>" for who, rows in ((a, c.only_in_evaluation), (b, c.only_in_baseline))
        for r in rows)
    n = f"a seeded subset of {c.n_examples}" if c.n_examples else "the whole split"
    cost = (f"<h2>Cost of the attacks</h2><table class='cost'><tr><th>measure</th>"
            f"<th>parameters</th><th>{a}</th><th>{b}</th></tr>{cost_rows}</table>"
            if cost_rows else "")
    body = f"""{top}
<h1>{e(title)}</h1>
<p>Both measured on {e(c.dataset)} ({e(c.split)} split, {n} examples, seed {c.seed}): the same
examples, so each accuracy is compared example by example. Under each value its 95% Wilson
interval; under each difference of accuracies the 95% paired interval (Newcombe), and McNemar's
exact p-value. A difference counts only when its interval excludes 0.</p>
{scroll(f'''<table class='compare'><tr><th>metric</th><th>{a}</th><th>{b}</th>
<th>difference ({a} - {b})</th><th>p-value</th><th>better</th></tr>{''.join(body_rows)}</table>''')}
{cost}
{f"<h2>Measured by one of them only</h2><ul>{only}</ul>" if only else ""}
"""
    return page(f"robustscope: {title}", body)
