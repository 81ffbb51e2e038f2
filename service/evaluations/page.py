"""A self-contained HTML report: per benchmark, a chart with labelled axes, one line saying
what the metric means and which direction is better, and the results table; the sanity
checks with what each one guards against; links to the model, its training and its sweep.
While the job runs, the page reloads itself.

No plotting library and no JavaScript (charts are inline SVG from :mod:`service.http.svg`):
the report is a single file a user can attach to a ticket. A numeric parameter (eps, sigma,
severity) becomes a line chart's x axis; anything else becomes bars.
"""

from __future__ import annotations

import html
import uuid
from collections import defaultdict
from typing import Any

from contract.jobs import FINAL_STATES
from service.evaluations.schemas import EvaluationOut, ResultOut
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


def render(ev: EvaluationOut, training_id: uuid.UUID | None = None,
           sweep_id: uuid.UUID | None = None) -> str:
    e = html.escape
    by_bench: dict[str, list[ResultOut]] = defaultdict(list)
    for r in ev.results:
        by_bench[r.benchmark].append(r)
    sections = [_section(name, rows) for name, rows in by_bench.items()]
    checks = "".join(_check(c) for c in ev.checks)
    error = (f"<p class='flag'>Error ({e(ev.error.type)}): {e(ev.error.detail)}</p>"
             if ev.error else "")
    links = [f"<a href='/evaluations/{ev.id}'>evaluation JSON</a>"]
    if ev.model_id:
        links.append(f"<a class='model' href='/models/{ev.model_id}'>model</a>")
    if training_id:
        links.append(f"<a class='training' href='/trainings/{training_id}'>training</a>")
    if sweep_id:
        links.append(f"<a class='sweep' href='/sweeps/{sweep_id}/report'>sweep report</a>")
    scope = (f"a seeded subset of {ev.n_examples} examples of the {e(ev.split)} split"
             if ev.n_examples else f"the whole {e(ev.split)} split")
    cmap = ev.class_map if isinstance(ev.class_map, str) else (
        "a given map" if ev.class_map else None)
    running = ev.status not in FINAL
    progress = (f"<p>Running: {100 * ev.progress.fraction:.0f}% · {e(ev.progress.stage)}: "
                f"{e(ev.progress.message)} (this page reloads every 5 s)</p>" if running else "")
    body = f"""
<nav>{' '.join(links)}</nav>
<h1>Evaluation of {e(ev.model_name)} on {e(ev.dataset)}</h1>
<p>Status <b>{e(ev.status)}</b> · measured on {scope}
{f'· model classes mapped with {e(cmap)}' if cmap else ''} · seed {ev.seed} ·
device {e(ev.device or '-')} · engine {e(ev.engine_version or '-')} ·
attempts {ev.attempts} · finished {ev.finished_at or '-'}</p>{progress}{error}
<h2>Sanity checks</h2>
<p class='note'>Each check guards against a way an evaluation can look better than it is;
a red one means the numbers below should not be trusted as they stand.</p>
<ul>{checks or '<li>none reported yet</li>'}</ul>
{''.join(sections)}
"""
    return page(f"robustscope report {ev.id}", body, refresh=5 if running else None)


def _check(c: dict[str, Any]) -> str:
    e = html.escape
    name = str(c.get("name"))
    ok = bool(c.get("passed"))
    why = CHECKS.get(name, "")
    return (f"<li class='{'ok' if ok else 'flag'}'><b>{e(name)}</b>: "
            f"{'passed' if ok else 'FLAGGED'}. {e(str(c.get('detail', '')))}"
            + (f"<div class='note'>{e(why)}</div>" if why else "") + "</li>")


def _label(params: dict[str, Any], skip: str | None = None) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(params.items()) if k != skip) or "-"


# Cost rows (passes per example, seconds) are listed in the table but kept out of the plot,
# whose scale is the accuracies'.
_COST_METRICS = frozenset({"forward_passes", "backward_passes", "attack_seconds"})


def _section(name: str, rows: list[ResultOut]) -> str:
    e = html.escape
    plotted = [r for r in rows if r.metric not in _COST_METRICS]
    table = "".join(
        f"<tr><td>{e(r.metric)}</td><td>{e(_label(r.params))}</td>"
        f"<td class='num'>{r.value:.4f}</td></tr>" for r in rows
    )
    meaning = MEANING.get(name)
    note = f"<p class='note meaning'>{e(meaning)}</p>" if meaning else ""
    return (f"<h2>{e(name)}</h2>{note}{_plot(name, plotted) if plotted else ''}"
            f"<table><tr><th>metric</th><th>parameters</th><th>value</th></tr>{table}</table>")


def _y_title(rows: list[ResultOut]) -> str:
    metrics = sorted({r.metric for r in rows})
    if all("accuracy" in m for m in metrics):
        return "accuracy (fraction of examples)"
    return ", ".join(metrics)


def _plot(bench: str, rows: list[ResultOut]) -> str:
    x_param = next((p for p in _X_PARAMS
                    if sum(isinstance(r.params.get(p), int | float) for r in rows) >= 2), None)
    if x_param is not None:
        series: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in rows:
            x = r.params.get(x_param)
            if isinstance(x, int | float):
                series[f"{r.metric} ({_label(r.params, x_param)})"].append((float(x), r.value))
        ys = [v for pts in series.values() for _, v in pts]
        y = Axis(_y_title(rows), min(0.0, *ys), max(1.0, *ys))
        return chart(f"{bench}: {_y_title(rows)} against {x_param}",
                     Axis(_X_TITLES[x_param]), y,
                     [Series(n, pts, COLORS[i % len(COLORS)])
                      for i, (n, pts) in enumerate(series.items())])
    values = [r.value for r in rows]
    return bars(f"{bench}: {_y_title(rows)}", [(f"{r.metric} {_label(r.params)}", r.value)
                                                for r in rows],
                Axis(_y_title(rows), min(0.0, *values), max(1.0, *values)))
