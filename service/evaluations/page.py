"""A self-contained HTML report: per benchmark, a chart with labelled axes, one line saying
what the metric means and which direction is better, and the results table; the sanity
checks with what each one guards against; links to the model, its training and its sweep.
While the job runs, the page reloads itself.

No plotting library and no JavaScript (charts are inline SVG from :mod:`service.http.svg`):
the report is a single file a user can attach to a ticket. Robust accuracy is drawn against
eps per norm, with the clean accuracy as its eps = 0 point; noise accuracies against sigma; a
numeric parameter (eps, sigma, severity) becomes a line chart's x axis, anything else bars.
Accuracies are drawn on [0, 1] and RFS on [-1, 1], whatever the values. The attacks' cost
(passes per example, seconds) is a table of its own.
"""

from __future__ import annotations

import html
import re
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from sqlalchemy.orm import Session

from contract.jobs import FINAL_STATES, JobStatus
from core.repository import is_owner
from core.tables import Evaluation, Sweep
from service.evaluations.repository import origin
from service.evaluations.schemas import EvaluationOut, ResultOut
from service.http.chrome import (
    NORM_NAMES,
    dataset_names,
    entry_label,
    nav,
    num,
    scroll,
    share_form,
)
from service.http.svg import COLORS, Axis, Series, bars, chart, page

_X_PARAMS = ("eps", "sigma", "severity")
_X_TITLES = {
    "eps": "eps, perturbation budget (pixel scale [0, 1]; l_inf 8/255 = 0.0314)",
    "sigma": "sigma, std of the Gaussian noise (pixel scale [0, 1])",
    "severity": "corruption severity (1 = mildest, 5 = strongest)",
}

# One line per benchmark: what its metrics mean and which direction is better (METRICS.md).
MEANING = {
    "clean": "Top-1 accuracy on the unperturbed test images. Higher is better.",
    "adversarial": "Robust accuracy: the fraction of examples classified correctly that no "
                   "attack in the run could flip within the eps-ball (worst case over attacks "
                   "and restarts). Higher is better; it can only fall as eps grows. Beside it, "
                   "zero_gradient_fraction: the share of clean-correct examples where the "
                   "model's input gradient is zero or not finite, so a gradient attack could "
                   "not even start; robust accuracy resting on those examples measures "
                   "gradient masking, not robustness.",
    "robustness_curve": "Robust accuracy as a function of eps from one minimal-perturbation "
                        "run. Higher is better.",
    "fg_bg_noise": "Accuracy with noise on the object (fg) or on the background (bg), and "
                   "RFS = (acc_bg - acc_fg) / (2 min(a, 1 - a)) in [-1, 1]: higher means the "
                   "model relies more on the object, the core feature. Higher RFS is better.",
    "backgrounds": "Accuracy on ImageNet-9-style variants (object on black, background "
                   "only, object on a same-class or a random background). BG-gap = "
                   "acc(mixed_same) - acc(mixed_rand): how much the background sways the "
                   "model. Lower BG-gap is better.",
    "groups": "Accuracy per (label, background) group; worst-group accuracy is the lowest. "
              "Higher is better.",
    "corruptions": "Accuracy under common corruptions per type and severity. Higher is better.",
    "spurious_shift": "Accuracy when the background's correlation with the label is kept, "
                      "removed or reversed. Higher is better; a large drop means reliance on "
                      "the background.",
}

# What each sanity check guards against (AutoAttack's pitfalls and ours).
CHECKS = {
    "degenerate_predictions": "Fails when the model predicts one class for (nearly) every "
                              "input: its accuracy is that class's share and its robust "
                              "accuracy equals its clean accuracy, so neither means anything.",
    "monotone_in_eps": "Robust accuracy must not rise with eps; if it does, an attack is weak "
                       "or misconfigured.",
    "blackbox_not_stronger": "A black-box attack (Square) must not break examples the "
                             "white-box attacks missed; if it does, gradients are masked.",
    "nonzero_gradients": "Input gradients must be non-zero; zero gradients make white-box "
                         "attacks fail silently (gradient masking).",
    "deterministic_forward": "Two forward passes on the same input must agree; randomness "
                             "in the model defeats the attacks' bookkeeping.",
    "logits_not_softmax": "The model should output logits, not probabilities; softmax outputs "
                          "flatten the attacks' gradients.",
    "dataset_assets": "What drew a built-in dataset's pictures (installed art or the "
                      "procedural fallback); results compare only within one.",
}

FINAL = FINAL_STATES

# What to do about a failed job, per error type (docs/API.md, Errors).
WHAT_TO_DO = {
    "checkpoint-error": "The checkpoint could not be loaded as the declared architecture and "
                        "format. Check the model's metadata (architecture, num_classes, "
                        "input_shape) against the file and upload it again.",
    "model-crashed": "The model raised an error while it ran. Run it locally on one batch of "
                     "the dataset's input shape; a TorchScript or torch.export model must run "
                     "without the training code.",
    "out-of-memory": "The model ran out of memory under the evaluation's cap. Evaluate on "
                     "fewer examples (n_examples) or a smaller model.",
    "time-limit": "The job ran past its time limit. Evaluate on fewer examples (n_examples) "
                  "or with a cheaper attack (`fast` or `efficient` instead of `autoattack`).",
    "benchmark-error": "A benchmark could not run on this dataset and suite. Read the detail, "
                       "fix the suite entry it names and submit again.",
    "sandbox-error": "The service's sandbox failed, not your model. Submit again; if it "
                     "repeats, tell the operator (the detail names what failed).",
    "worker-lost": "The worker running it stopped too many times. Submit again; if it "
                   "repeats, tell the operator.",
    "disk-quota": "The job wrote more files than it may. Evaluate on fewer examples.",
}
DEFAULT_TO_DO = "Read the detail above, fix what it names and submit the evaluation again."

_REPEATED_TYPE = re.compile(r"^(\w+(?:Error|Exception)): (?:\1: )+")


@dataclass(frozen=True)
class Context:
    """Who reads the report and what it links to."""

    viewer: str | None = None  # the logged-in reader (None: anonymous or a share link)
    mine: bool = False  # the reader owns the evaluation: links to its records, share form
    shared: bool = False  # opened through a share link
    dataset_name: str | None = None  # an uploaded dataset's name (the evaluation holds its id)
    training_id: uuid.UUID | None = None
    sweep_id: uuid.UUID | None = None


def render(ev: EvaluationOut, ctx: Context | None = None) -> str:
    ctx = ctx or Context()
    e = html.escape
    by_bench: dict[str, list[ResultOut]] = defaultdict(list)
    for r in ev.results:
        by_bench[r.benchmark].append(r)
    sections = [_section(name, rows) for name, rows in by_bench.items()]
    links: list[tuple[str, str]] = []
    if ctx.mine:
        links.append((f"/evaluations/{ev.id}", "evaluation JSON"))
        if ev.model_id:
            links.append((f"/models/{ev.model_id}", "model"))
        if ctx.training_id:
            links.append((f"/trainings/{ctx.training_id}", "training"))
    if ctx.sweep_id and not ctx.shared:
        links.append((f"/sweeps/{ctx.sweep_id}/report", "sweep report"))
    dataset = ctx.dataset_name or ev.dataset
    if not ctx.shared and ev.status == JobStatus.SUCCEEDED:
        links.append((_compare_link(ev), "compare with another evaluation"))
    scope = (f"a seeded subset of {ev.n_examples} examples of the {e(ev.split)} split"
             if ev.n_examples else f"the whole {e(ev.split)} split")
    cmap = ev.class_map if isinstance(ev.class_map, str) else (
        "a given map" if ev.class_map else None)
    running = ev.status not in FINAL
    progress = (f"<p>Running: {100 * ev.progress.fraction:.0f}% · {e(ev.progress.stage)}: "
                f"{e(ev.progress.message)} (this page reloads every 5 s)</p>" if running else "")
    finished = f"{ev.finished_at:%Y-%m-%d %H:%M} UTC" if ev.finished_at else "-"
    visibility = ("public: anyone can open this report" if ev.public else
                  "shared by link: read-only" if ctx.shared else "private")
    nav_html = nav(ctx.viewer, "" if ctx.shared else f"/evaluations/{ev.id}/report", *links)
    body = f"""
{nav_html}
<h1>Evaluation of {e(ev.model_name)} on {e(dataset)}</h1>
<p>Status <b class='status'>{e(ev.status)}</b> · measured on {scope}
{f'· model classes mapped with {e(cmap)}' if cmap else ''} · seed {ev.seed} ·
device {e(ev.device or '-')} · engine {e(ev.engine_version or '-')} ·
attempts {ev.attempts} · finished {finished} · {visibility}</p>{progress}{_failure(ev)}
<h2>Sanity checks</h2>
<p class='note'>Each check guards against a way an evaluation can look better than it is;
a red one means the numbers below should not be trusted as they stand.</p>
{_checks(ev)}
{''.join(sections)}
{share_form('evaluation', ev.id) if ctx.mine and not ev.public else ''}
"""
    return page(f"robustscope: {ev.model_name} on {dataset}", body,
                refresh=5 if running else None)


def _compare_link(ev: EvaluationOut) -> str:
    """The leaderboard of the evaluation's dataset at the first threat it was attacked at (or
    the dataset's standard one), each row linked to compare with it."""
    query = {"dataset": ev.dataset, "compare": str(ev.id)}
    attacked = next((r for r in ev.results if (r.benchmark, r.metric) == (
        "adversarial", "robust_accuracy") and isinstance(r.params.get("eps"), int | float)), None)
    if attacked is not None:
        query.update(threat=f"{attacked.params['norm']}:{attacked.params['eps']}",
                     attack=str(attacked.params.get("attack")))
    return "/leaderboard/page?" + urlencode(query)


def error_detail(detail: str) -> str:
    """An error's detail with an exception's type named once (``RuntimeError: RuntimeError:
    x`` reads ``RuntimeError: x``)."""
    return _REPEATED_TYPE.sub(r"\1: ", detail)


def _failure(ev: EvaluationOut) -> str:
    if ev.status == JobStatus.CANCELLED:
        return ("<div class='box failure'><h2>Cancelled</h2><p>The evaluation was cancelled "
                "before it finished; the results below are the entries it completed.</p></div>")
    if ev.status != JobStatus.FAILED:
        return ""
    e = html.escape
    kind = ev.error.type if ev.error else "unknown"
    detail = error_detail(ev.error.detail) if ev.error else "no detail was recorded"
    finished = ("The results of the suite entries that finished before it are below."
                if ev.results else "No suite entry had finished; no result was recorded.")
    return (f"<div class='box failure'><h2>What failed</h2><p class='flag'>{e(kind)}: "
            f"{e(detail)}</p><p>{finished}</p><h3>What to do</h3>"
            f"<p class='todo'>{e(WHAT_TO_DO.get(kind, DEFAULT_TO_DO))}</p></div>")


def _checks(ev: EvaluationOut) -> str:
    e = html.escape
    seen: set[tuple[str, str, bool, str]] = set()
    items = []
    for c in ev.checks:
        name, ok = str(c.get("name")), bool(c.get("passed"))
        where = entry_label(ev.suite, c.get("entry"))
        detail = str(c.get("detail", ""))
        if (name, where, ok, detail) in seen:
            continue
        seen.add((name, where, ok, detail))
        why = CHECKS.get(name, "")
        items.append(
            f"<li class='check {'ok' if ok else 'flag'}'><b>{e(name)}</b> "
            f"<span class='entry'>({e(where)})</span>: {'passed' if ok else 'FLAGGED'}. "
            f"{e(detail)}" + (f"<div class='note'>{e(why)}</div>" if why else "") + "</li>")
    if items:
        return f"<ul class='checks'>{''.join(items)}</ul>"
    if ev.status in (JobStatus.FAILED, JobStatus.CANCELLED):
        return ("<p class='note'>No check ran: the evaluation stopped before its first suite "
                "entry finished.</p>")
    if ev.status != JobStatus.SUCCEEDED:
        return "<p class='note'>The checks appear here as the suite's entries finish.</p>"
    return "<p class='note'>This suite's benchmarks run no sanity check.</p>"



def _label(params: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    shown = {k: v for k, v in params.items() if k not in skip and k not in _HIDDEN}
    return ", ".join(f"{k}={_value(v)}" for k, v in sorted(shown.items())) or "-"


# Parameters that repeat what a row's other parameters say (the grid of a mean row).
_HIDDEN = frozenset({"sigmas", "types", "severities"})


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# Cost rows (passes per example, seconds) are a table of their own, kept out of the plot,
# whose scale is the accuracies'.
COST_METRICS = frozenset({"forward_passes", "backward_passes", "attack_seconds"})


def _result_cells(r: ResultOut) -> str:
    ci = f"{r.interval[0]:.3f} to {r.interval[1]:.3f}" if r.interval else "-"
    return (f"<td class='num'>{num(r.value, 4)}</td><td class='num'>{ci}</td>"
            f"<td class='num'>{r.n if r.n is not None else '-'}</td>")


def _section(name: str, rows: list[ResultOut]) -> str:
    e = html.escape
    costs = [r for r in rows if r.metric in COST_METRICS]
    measured = [r for r in rows if r.metric not in COST_METRICS]
    table = "".join(
        f"<tr><td>{e(r.metric)}</td><td>{e(_label(r.params))}</td>{_result_cells(r)}</tr>"
        for r in measured)
    meaning = MEANING.get(name)
    note = f"<p class='note meaning'>{e(meaning)}</p>" if meaning else ""
    cost = ""
    if costs:
        cost_rows = "".join(
            f"<tr><td>{e(r.metric.replace('_', ' '))}</td><td>{e(_label(r.params))}</td>"
            f"<td class='num'>{r.value:.4g}</td></tr>" for r in costs)
        cost = (f"<h3>Cost of the attacks</h3><table class='cost'><tr><th>measure</th>"
                f"<th>parameters</th><th>value</th></tr>{cost_rows}</table>")
    charts = _charts(name, measured)
    return (f"<h2>{e(name)}</h2>{note}"
            + (f"<div class='charts'>{charts}</div>" if charts else "")
            + scroll("<table class='results'><tr><th>metric</th><th>parameters</th>"
                     f"<th>value</th><th>95% interval</th><th>n</th></tr>{table}</table>")
            + cost)


ACCURACY = Axis("accuracy (fraction of examples)", 0.0, 1.0)


def _charts(bench: str, rows: list[ResultOut]) -> str:
    if bench == "adversarial":
        return _adversarial(rows)
    if bench == "fg_bg_noise":
        return _noise(rows)
    if bench == "clean":
        return ""  # one number: the table says it
    return _plot(bench, rows)


def _adversarial(rows: list[ResultOut]) -> str:
    """Per norm, robust accuracy against eps, one line per attack, starting at eps = 0 from
    the clean accuracy the attack measured."""
    by_norm: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(
        lambda: defaultdict(list))
    for r in rows:
        norm, attack = str(r.params.get("norm")), str(r.params.get("attack"))
        if r.metric == "robust_accuracy" and isinstance(r.params.get("eps"), int | float):
            by_norm[norm][attack].append((float(r.params["eps"]), r.value))
    for r in rows:
        norm, attack = str(r.params.get("norm")), str(r.params.get("attack"))
        if r.metric == "clean_accuracy" and attack in by_norm.get(norm, {}):
            by_norm[norm][attack].append((0.0, r.value))
    out = []
    for norm, attacks in sorted(by_norm.items()):
        name = NORM_NAMES.get(norm, norm)
        anchored = all(any(x == 0.0 for x, _ in pts) for pts in attacks.values())
        series = [Series(f"{attack}: robust accuracy"
                         + (" (eps = 0: clean accuracy)" if anchored else ""), pts,
                         COLORS[i % len(COLORS)]) for i, (attack, pts) in
                  enumerate(sorted(attacks.items()))]
        out.append(chart(
            f"Robust accuracy against eps ({name}; {', '.join(sorted(attacks))})"
            + (", clean accuracy at eps = 0" if anchored else ""),
            Axis(f"eps, {name} perturbation budget (pixel scale [0, 1])", 0.0), ACCURACY,
            series, width=600))
    return "".join(out)


def _noise(rows: list[ResultOut]) -> str:
    """Accuracy with noise on the object and on the background against sigma (the two lines
    drawn so that equal ones stay visible), and RFS against sigma on [-1, 1]."""
    def points(metric: str) -> list[tuple[float, float]]:
        return [(float(r.params["sigma"]), r.value) for r in rows if r.metric == metric
                and isinstance(r.params.get("sigma"), int | float)]

    sigma = Axis(_X_TITLES["sigma"], 0.0)
    out = []
    fg, bg = points("fg_noise_accuracy"), points("bg_noise_accuracy")
    if fg or bg:
        out.append(chart("Accuracy with Gaussian noise on the object (fg) and on the "
                         "background (bg) against sigma", sigma, ACCURACY, [
                             Series("noise on the object (fg)", fg, COLORS[0]),
                             Series("noise on the background (bg), dashed", bg, COLORS[1],
                                    marker="square", dashed=True)], width=600))
    rfs = points("rfs")
    if len(rfs) > 1:
        out.append(chart("RFS (relative foreground sensitivity) against sigma", sigma,
                         Axis("RFS (-1 to 1; higher = relies more on the object)", -1.0, 1.0),
                         [Series("RFS", rfs, COLORS[2])], width=600))
    return "".join(out)


def _y_axis(rows: list[ResultOut]) -> Axis:
    metrics = sorted({r.metric for r in rows})
    if all("accuracy" in m for m in metrics):
        return ACCURACY
    if metrics == ["rfs"]:
        return Axis("RFS (-1 to 1)", -1.0, 1.0)
    values = [r.value for r in rows]
    return Axis(", ".join(metrics), min(0.0, *values), max(1.0, *values))


def _plot(bench: str, rows: list[ResultOut]) -> str:
    """The accuracies of a benchmark: against a numeric parameter when one varies, else as
    bars (one per row, labelled in full)."""
    plotted = [r for r in rows if "accuracy" in r.metric or r.metric == "rfs"] or rows
    if len(plotted) < 2:
        return ""  # one number: the table says it
    x_param = next((p for p in _X_PARAMS
                    if sum(isinstance(r.params.get(p), int | float) for r in plotted) >= 2),
                   None)
    y = _y_axis(plotted)
    if x_param is not None:
        series: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in plotted:
            x = r.params.get(x_param)
            if isinstance(x, int | float):
                series[f"{r.metric} ({_label(r.params, (x_param,))})"].append((float(x),
                                                                               r.value))
        return chart(f"{bench}: {y.title} against {x_param}", Axis(_X_TITLES[x_param]), y,
                     [Series(n, pts, COLORS[i % len(COLORS)])
                      for i, (n, pts) in enumerate(series.items())], width=600)
    bars_of = [r for r in plotted if "accuracy" in r.metric] or plotted
    return bars(f"{bench}: {', '.join(sorted({r.metric for r in bars_of}))} per "
                f"{', '.join(sorted({k for r in bars_of for k in r.params} - _HIDDEN)) or 'row'}",
                [(f"{r.metric} {_label(r.params)}", r.value) for r in bars_of],
                _y_axis(bars_of), width=600)


def context(session: Session, row: Evaluation, viewer: str | None,
            shared: bool = False) -> Context:
    """What the report of ``row`` links to, for ``viewer``: an owner's evaluation links to
    its records; the sweep it came from when the viewer may open that sweep."""
    mine = is_owner(row, viewer) and not shared
    training_id, sweep_id = origin(session, row.owner, row.id)
    sweep = session.get(Sweep, sweep_id) if sweep_id else None
    if sweep is not None and not (mine or sweep.spec.get("public")):
        sweep_id = None
    name = dataset_names(session, [row.dataset])[row.dataset]
    return Context(viewer=None if shared else viewer, mine=mine, shared=shared,
                   dataset_name=name, training_id=training_id if mine else None,
                   sweep_id=sweep_id)
