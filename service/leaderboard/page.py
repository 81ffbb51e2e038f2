"""The leaderboard page (``GET /leaderboard/page``): the ranked rows of one (dataset,
benchmark, metric), each with both axes side by side (clean and robust accuracy, RFS, BG-gap,
worst-group accuracy), a filter form and links to the reports. Public rows for everyone, the
caller's own for them."""

from __future__ import annotations

import html
import uuid
from urllib.parse import urlencode

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from core.tables import Evaluation
from service.http.svg import page
from service.leaderboard.schemas import Leaderboard

SUMMARY = ("clean accuracy", "robust accuracy", "RFS", "BG-gap", "worst group")


def _both_axes(ev: Evaluation, threat: str | None) -> dict[str, tuple[float, str] | None]:
    """The evaluation's headline numbers on both axes; robust accuracy at ``threat`` (NORM or
    NORM:EPS) when given, else its first adversarial row (its threat shown beside it)."""
    out: dict[str, tuple[float, str] | None] = dict.fromkeys(SUMMARY)
    norm, _, eps = (threat or "").partition(":")
    for r in sorted(ev.results, key=lambda r: (r.entry_index, r.id)):
        if (r.benchmark, r.metric) == ("clean", "accuracy"):
            out["clean accuracy"] = (r.value, "")
        elif (r.benchmark, r.metric) == ("adversarial", "robust_accuracy"):
            if norm and r.params.get("norm") != norm:
                continue
            if eps and abs(float(r.params.get("eps", -1)) - float(eps)) > 1e-4 * max(
                    1.0, float(eps)):
                continue
            if out["robust accuracy"] is None:
                out["robust accuracy"] = (r.value, f"{r.params.get('attack')} "
                                          f"{r.params.get('norm')} {r.params.get('eps'):.4g}")
        elif (r.benchmark, r.metric) == ("fg_bg_noise", "rfs") and r.params.get("sigma") == "mean":
            out["RFS"] = (r.value, "")
        elif (r.benchmark, r.metric) == ("backgrounds", "bg_gap"):
            out["BG-gap"] = (r.value, "")
        elif (r.benchmark, r.metric) == ("groups", "worst_group_accuracy"):
            out["worst group"] = (r.value, "")
    return out


def _cell(v: tuple[float, str] | None) -> str:
    if v is None:
        return "<td class='num'>-</td>"
    return f"<td class='num' title='{html.escape(v[1])}'>{v[0]:.3f}</td>"


def render(session: Session, board: Leaderboard, owner: str, datasets: list[str]) -> str:
    """``board`` is what the JSON endpoint returns for the same query."""
    e = html.escape
    rows, threat = board.rows, board.threat
    dataset, benchmark, metric = board.dataset, board.benchmark, board.metric
    ids = [r.evaluation_id for r in rows]
    evals: dict[uuid.UUID, Evaluation] = {ev.id: ev for ev in session.scalars(
        select(Evaluation).where(Evaluation.id.in_(ids))
        .options(selectinload(Evaluation.results)))} if ids else {}
    head = ("<tr><th>rank</th><th>model</th><th>owner</th>"
            f"<th>{e(metric)}</th><th>parameters</th>"
            + "".join(f"<th>{e(s)}</th>" for s in SUMMARY) + "<th>visibility</th><th>report</th>"
            "</tr>")
    body = []
    for r in rows:
        axes = _both_axes(evals[r.evaluation_id], threat) if r.evaluation_id in evals else {}
        cells = "".join(_cell(axes.get(s)) for s in SUMMARY)
        params = ", ".join(f"{k}={v}" for k, v in sorted(r.params.items()))
        mine = " (you)" if r.owner == owner else ""
        body.append(
            f"<tr><td class='num'>{r.rank}</td><td>{e(r.model_name)}</td>"
            f"<td>{e(r.owner)}{mine}</td><td class='num'><b>{r.value:.4f}</b></td>"
            f"<td>{e(params or '-')}</td>{cells}<td>{'public' if r.public else 'private'}</td>"
            f"<td><a class='report' href='/evaluations/{r.evaluation_id}/report'>report</a>"
            "</td></tr>")
    options = "".join(f"<option value='{e(d)}'{' selected' if d == dataset else ''}>{e(d)}"
                      "</option>" for d in datasets)
    json_link = "/leaderboard?" + urlencode({k: v for k, v in (
        ("dataset", dataset), ("benchmark", benchmark), ("metric", metric),
        ("threat", threat)) if v})
    order = board.order
    html_body = f"""
<nav><a href='/docs'>API</a><a href='{e(json_link)}'>this leaderboard as JSON</a></nav>
<h1>Leaderboard: {e(metric)} ({e(benchmark)}) on {e(dataset)}</h1>
<form method='get' action='/leaderboard/page'>
<label>dataset <select name='dataset'>{options}</select></label>
<label>benchmark <input name='benchmark' value='{e(benchmark)}' size='14'></label>
<label>metric <input name='metric' value='{e(metric)}' size='20'></label>
<label>threat <input name='threat' value='{e(threat or '')}' size='12'
 placeholder='linf:0.0314'></label>
<button type='submit'>filter</button></form>
<p class='note'>Ranked by {e(metric)}, {'higher' if order == 'descending' else 'lower'} is
better. Beside it, both axes of each evaluation: clean and robust accuracy (higher is better),
RFS (higher = relies more on the object; better), BG-gap (lower is better) and worst-group
accuracy (higher is better); "-" where the evaluation did not measure it. Public evaluations
of every owner are listed, and your own private ones.</p>
<table>{head}{''.join(body) or "<tr><td colspan='12'>no evaluations match</td></tr>"}</table>
"""
    return page(f"robustscope leaderboard {dataset} {metric}", html_body)
