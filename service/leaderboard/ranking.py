"""The ranking rules of a leaderboard.

- **One threat.** A ranking of an adversarial metric compares one threat: one attack, one
  norm, one eps. Whatever the query leaves out is the dataset's standard threat: l_inf at the
  dataset's default eps, attacked with AutoAttack (what the ``standard`` suite runs). A
  robustness curve ranks at one (norm, eps) the same way.
- **One row per evaluation.** An evaluation that measured the metric more than once at the
  ranked threat (two suite entries) counts with its least favourable value; a metric measured
  per noise level or severity ranks by its mean over them (RFS by its mean over sigmas).
- **Flags first.** An evaluation with a failed sanity check (``degenerate_predictions``: one
  class for every input, or any other) ranks below every evaluation without one, whatever its
  value, and its row carries the failed checks.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from contract.attacks import Norm
from contract.jobs import JobStatus
from contract.metrics import LOWER_IS_BETTER
from core.errors import Invalid
from core.repository import visible_to
from core.tables import Evaluation, Result
from service.datasets.builtin import get_builtin
from service.datasets.service import DEFAULT_EPS

STANDARD_ATTACK = "autoattack"
STANDARD_NORM = "linf"
#: Benchmarks whose rows are measured under a threat (norm and eps).
THREATENED = ("adversarial", "robustness_curve")
#: Parameters whose value ``"mean"`` marks an evaluation's summary row of a metric.
SUMMARY_PARAMS = ("sigma", "severity")


@dataclass(frozen=True)
class Threat:
    attack: str | None  # None for a robustness curve (one minimal-perturbation method)
    norm: str
    eps: float

    def matches(self, params: dict[str, Any]) -> bool:
        if params.get("norm") != self.norm:
            return False
        eps = params.get("eps")
        if not isinstance(eps, int | float) or abs(eps - self.eps) > 1e-4 * max(1.0, self.eps):
            return False
        return self.attack is None or params.get("attack") == self.attack


@dataclass(frozen=True)
class Entry:
    """One evaluation's place in a ranking."""

    evaluation: Evaluation
    result: Result
    failed_checks: list[dict[str, Any]]

    @property
    def flagged(self) -> bool:
        return bool(self.failed_checks)


def parse_threat(threat: str) -> tuple[str, float | None]:
    """``linf`` or ``linf:0.0314`` (norm, optionally the eps)."""
    norm, _, eps = threat.partition(":")
    if norm not in {n.value for n in Norm}:
        raise Invalid(f"threat names a norm ({', '.join(n.value for n in Norm)}), optionally "
                      "with an eps: linf or linf:0.0314", field="threat")
    try:
        value = float(eps) if eps else None
    except ValueError as exc:
        raise Invalid("threat is NORM or NORM:EPS, e.g. linf:0.0314", field="threat") from exc
    if value is not None and not (math.isfinite(value) and value > 0):
        raise Invalid("the threat's eps must be a positive number", field="threat")
    return norm, value


def default_eps(dataset: str, norm: str) -> float:
    """The dataset's standard budget for ``norm`` (an uploaded dataset: the service's)."""
    builtin = get_builtin(dataset)
    table = dict(builtin["default_eps"]) if builtin is not None else DEFAULT_EPS
    return float(table[norm])


def resolve_threat(dataset: str, benchmark: str, threat: str | None,
                   attack: str | None) -> Threat | None:
    """The one threat a ranking compares (None for a benchmark without threats); what the
    query leaves out is the dataset's standard threat."""
    if benchmark not in THREATENED:
        if threat or attack:
            raise Invalid(f"benchmark {benchmark!r} is not measured under a threat; leave "
                          "threat and attack out", field="threat" if threat else "attack")
        return None
    norm, eps = parse_threat(threat) if threat else (STANDARD_NORM, None)
    if eps is None:
        eps = default_eps(dataset, norm)
    if benchmark == "robustness_curve":
        return Threat(None, norm, eps)
    return Threat(attack or STANDARD_ATTACK, norm, eps)


def failed_checks(ev: Evaluation) -> list[dict[str, Any]]:
    """The evaluation's failed checks, each once."""
    out: list[dict[str, Any]] = []
    for c in ev.checks or []:
        if c.get("passed"):
            continue
        item = {"name": str(c.get("name")), "detail": str(c.get("detail", "")),
                "entry": c.get("entry")}
        if item not in out:
            out.append(item)
    return out


def _summary(rows: Sequence[Result]) -> list[Result]:
    """The rows an evaluation ranks by: its mean over noise levels or severities, where the
    metric has one."""
    means = [r for r in rows if any(r.params.get(p) == "mean" for p in SUMMARY_PARAMS)]
    return means or [r for r in rows if not any(p in r.params for p in SUMMARY_PARAMS)] \
        or list(rows)


def rank(session: Session, viewer: str | None, dataset: str, benchmark: str, metric: str,
         threat: Threat | None) -> list[Entry]:
    """Every evaluation the viewer may see (public ones, and the viewer's own) that measured
    ``metric`` at ``threat`` on ``dataset``, one entry each, in rank order."""
    q = (select(Result, Evaluation).join(Evaluation, Result.evaluation_id == Evaluation.id)
         .where(Evaluation.status == JobStatus.SUCCEEDED, Evaluation.dataset == dataset,
                Result.benchmark == benchmark, Result.metric == metric,
                visible_to(Evaluation, viewer)))
    if threat is not None:  # narrowed in the database; matched exactly below
        q = q.where(Result.params["norm"].as_string() == threat.norm)
    lower = metric in LOWER_IS_BETTER
    by_eval: dict[uuid.UUID, tuple[Evaluation, list[Result]]] = {}
    for result, ev in session.execute(q):
        if threat is None or threat.matches(result.params):
            by_eval.setdefault(ev.id, (ev, []))[1].append(result)
    entries = []
    for ev, rows in by_eval.values():
        worst = (max if lower else min)(_summary(rows), key=lambda r: (r.value, r.id))
        entries.append(Entry(ev, worst, failed_checks(ev)))
    entries.sort(key=lambda x: (x.flagged, x.result.value if lower else -x.result.value,
                                x.evaluation.created_at, str(x.evaluation.id)))
    return entries


def threats_measured(session: Session, viewer: str | None, dataset: str,
                     benchmark: str) -> list[tuple[Threat, int]]:
    """The threats the visible evaluations of ``dataset`` measured ``benchmark`` at, with how
    many evaluations each: the rankings there are to choose from."""
    if benchmark not in THREATENED:
        return []
    metric = "robust_accuracy"
    q = (select(Result.params, Result.evaluation_id)
         .join(Evaluation, Result.evaluation_id == Evaluation.id)
         .where(Evaluation.status == JobStatus.SUCCEEDED, Evaluation.dataset == dataset,
                Result.benchmark == benchmark, Result.metric == metric,
                visible_to(Evaluation, viewer)))
    seen: dict[tuple[str | None, str, str], tuple[Threat, set[uuid.UUID]]] = {}
    for params, eid in session.execute(q):
        eps = params.get("eps")
        if not isinstance(eps, int | float):
            continue
        attack = None if benchmark == "robustness_curve" else str(params.get("attack"))
        norm = str(params.get("norm"))
        key = (attack, norm, f"{eps:.4g}")  # the same budget, however it was written
        seen.setdefault(key, (Threat(attack, norm, float(eps)), set()))[1].add(eid)
    return sorted(((t, len(ids)) for t, ids in seen.values()),
                  key=lambda x: (x[0].norm, x[0].eps, x[0].attack or ""))
