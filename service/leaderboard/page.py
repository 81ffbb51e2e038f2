"""The leaderboard page (``GET /leaderboard/page``): the ranked rows of one (dataset,
benchmark, metric), each with both axes side by side (clean and robust accuracy, RFS, BG-gap,
worst-group accuracy), a filter form and links to the reports. Public rows for everyone, the
caller's own for them."""

from __future__ import annotations

import html
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from core.repository import is_owner
from core.tables import Evaluation
from service.http.chrome import (
    NORM_NAMES,
    dataset_names,
    entry_label,
    eps_text,
    nav,
    num,
    scroll,
)
from service.http.svg import page
from service.leaderboard.ranking import Threat

if TYPE_CHECKING:
    from service.leaderboard.schemas import Leaderboard, LeaderboardRow, ThreatOption

SUMMARY = ("clean accuracy", "robust accuracy", "RFS", "BG-gap", "worst group")


def _both_axes(ev: Evaluation, side: Threat) -> dict[str, tuple[float, str] | None]:
    """The evaluation's headline numbers on both axes; robust accuracy at ``side``: the
    ranked threat, or for a ranking without one the threat the page names."""
    out: dict[str, tuple[float, str] | None] = dict.fromkeys(SUMMARY)
    for r in sorted(ev.results, key=lambda r: (r.entry_index, r.id)):
        key = (r.benchmark, r.metric)
        if key == ("clean", "accuracy"):
            out["clean accuracy"] = (r.value, "")
        elif key == ("adversarial", "robust_accuracy") and side.matches(r.params):
            prior = out["robust accuracy"]
            if prior is None or r.value < prior[0]:
                out["robust accuracy"] = (r.value, threat_text(side.attack, side.norm, side.eps))
        elif key == ("fg_bg_noise", "rfs") and r.params.get("sigma") == "mean":
            out["RFS"] = (r.value, "mean over sigmas")
        elif key == ("backgrounds", "bg_gap"):
            out["BG-gap"] = (r.value, "")
        elif key == ("groups", "worst_group_accuracy"):
            out["worst group"] = (r.value, str(r.params.get("group", "")))
    return out


def _cell(v: tuple[float, str] | None) -> str:
    if v is None:
        return "<td class='num'>-</td>"
    return f"<td class='num' title='{html.escape(v[1])}'>{num(v[0])}</td>"


def threat_text(attack: str | None, norm: str, eps: float) -> str:
    """``autoattack, l_inf eps 8/255``."""
    return (f"{attack}, " if attack else "") + f"{NORM_NAMES.get(norm, norm)} eps " \
        + eps_text(norm, eps)


def _checks(r: LeaderboardRow, suite: list[dict[str, Any]]) -> str:
    if not r.failed_checks:
        return "<td class='ok'>passed</td>"
    items = "".join(f"<li><b>{html.escape(c.name)}</b> ({html.escape(entry_label(suite, c.entry))})"
                    f": {html.escape(c.detail)}</li>" for c in r.failed_checks)
    return f"<td class='flag checks'><ul>{items}</ul></td>"


def _value(r: LeaderboardRow) -> str:
    ci = (f"<div class='ci'>95%: {r.interval[0]:.3f} to {r.interval[1]:.3f}</div>"
          if r.interval else "")
    return f"<td class='num value'><b>{num(r.value, 4)}</b>{ci}</td>"


def render(session: Session, board: Leaderboard, viewer: str | None, datasets: list[str],
           side: Threat, compare: uuid.UUID | None = None) -> str:
    """``board`` is what the JSON endpoint returns for the same query."""
    e = html.escape
    rows = board.rows
    dataset, benchmark, metric = board.dataset, board.benchmark, board.metric
    ids = [r.evaluation_id for r in rows]
    evals: dict[uuid.UUID, Evaluation] = {ev.id: ev for ev in session.scalars(
        select(Evaluation).where(Evaluation.id.in_(ids))
        .options(selectinload(Evaluation.results)))} if ids else {}
    threat = board.threat
    head = ("<tr><th>rank · model</th><th>failed checks</th>"
            f"<th>{e(metric)}</th><th>n</th>"
            + "".join(f"<th>{e(s)}</th>" if s != "robust accuracy" else
                      f"<th>robust accuracy ({e(threat_text(side.attack, side.norm, side.eps))})"
                      "</th>" for s in SUMMARY)
            + "<th>owner</th><th>links</th></tr>")
    baseline = compare or (rows[0].evaluation_id if rows else None)
    body = []
    for r in rows:
        ev = evals.get(r.evaluation_id)
        axes = _both_axes(ev, side) if ev is not None else {}
        cells = "".join(_cell(axes.get(s)) for s in SUMMARY)
        mine = " (you)" if is_owner(r, viewer) else ""
        links = [f"<a class='report' href='/evaluations/{r.evaluation_id}/report'>report</a>"]
        if baseline is not None and r.evaluation_id != baseline:
            links.append(f"<a class='compare' href='/evaluations/{r.evaluation_id}/compare/page"
                         f"?baseline={baseline}'>compare</a>")
        body.append(
            f"<tr{' class=flagged' if r.flagged else ''}><td><b>{r.rank}</b> "
            f"{e(r.model_name)}</td>{_checks(r, ev.suite if ev else [])}{_value(r)}"
            f"<td class='num'>{r.n if r.n is not None else '-'}</td>{cells}"
            f"<td>{e(r.owner)}{mine}, {'public' if r.public else 'private'}</td>"
            f"<td>{' · '.join(links)}</td></tr>")
    names = dataset_names(session, datasets)
    shown = names.get(dataset, dataset)
    options = "".join(f"<option value='{e(d)}'{' selected' if d == dataset else ''}>"
                      f"{e(names[d])}</option>" for d in datasets)
    query = {k: v for k, v in (("dataset", dataset), ("benchmark", benchmark),
                               ("metric", metric), ("threat", threat),
                               ("attack", board.attack)) if v}
    json_link = "/leaderboard?" + urlencode(query)
    ranked = (f" at {threat_text(board.attack, *_split(threat))}" if threat else "")
    choices = "".join(
        f"<li><a href='/leaderboard/page?{e(urlencode(_with_threat(query, t)))}'>"
        f"{e(threat_text(t.attack, t.norm, t.eps))}</a> ({t.evaluations} evaluation"
        f"{'s' if t.evaluations != 1 else ''})</li>" for t in board.threats)
    top = nav(viewer, "/leaderboard/page?" + urlencode(query), ("/docs", "API"),
              (json_link, "this leaderboard as JSON"))
    empty = (f"<tr><td colspan='{5 + len(SUMMARY)}'>No evaluation you can see measured "
             f"{e(metric)}{e(ranked)} on {e(shown)}."
             + (" Pick a threat below." if board.threats else "") + "</td></tr>")
    compare_note = (f"<p class='note'>The compare links set each evaluation beside "
                    f"{'the one you chose' if compare else 'the first'}.</p>" if rows else "")
    html_body = f"""
{top}
<h1>Leaderboard: {e(metric)} ({e(benchmark)}){e(ranked)} on {e(shown)}</h1>
<form method='get' action='/leaderboard/page'>
<label>dataset <select name='dataset'>{options}</select></label>
<label>benchmark <input name='benchmark' value='{e(benchmark)}' size='14'></label>
<label>metric <input name='metric' value='{e(metric)}' size='20'></label>
<label>threat <input name='threat' value='{e(threat or '')}' size='12'
 placeholder='linf:0.0314'></label>
<label>attack <input name='attack' value='{e(board.attack or '')}' size='10'
 placeholder='autoattack'></label>
<button type='submit'>rank</button></form>
<p class='note'>One ranking compares one threat (one attack, norm and eps; without one asked,
the dataset's standard threat: AutoAttack, l_inf at its eps), one row per evaluation, ranked
by {e(metric)}, {'higher' if board.order == 'descending' else 'lower'} is better. An
evaluation whose sanity checks failed (red: e.g. a model that predicts one class for every
input) ranks below every evaluation without a failed check, whatever its value. n is the
number of examples a value counts; the 95% interval is under each value. Beside it, both axes
of each evaluation: clean and robust accuracy (higher is better), RFS (higher = relies more on
the object; better), BG-gap (lower is better) and worst-group accuracy (higher is better);
"-" where the evaluation did not measure it. {'Public evaluations of every owner are listed, '
'and your own private ones.' if viewer else 'Public evaluations are listed; log in to see '
'your private ones beside them.'}</p>
{scroll(f"<table class='board'>{head}{''.join(body) or empty}</table>")}
{compare_note}
{f"<h2>Threats measured on {e(shown)}</h2><ul class='threats'>{choices}</ul>" if choices else ""}
"""
    return page(f"robustscope leaderboard {shown} {metric}", html_body)


def _split(threat: str) -> tuple[str, float]:
    norm, _, eps = threat.partition(":")
    return norm, float(eps)


def _with_threat(query: dict[str, str], t: ThreatOption) -> dict[str, str]:
    out = {**query, "threat": f"{t.norm}:{t.eps}"}
    out.pop("attack", None)
    if t.attack:
        out["attack"] = t.attack
    return out
