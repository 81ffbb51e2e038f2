"""Leaderboards: evaluations ranked by one metric at one threat, the caller's own plus every
public one (anyone may read the public ones); the rules are in ``ranking``."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse
from sqlalchemy import select

from contract.metrics import BENCHMARK_METRICS, LOWER_IS_BETTER
from contract.stats import interval
from core.errors import Invalid, problem_responses
from core.repository import visible_to
from core.tables import Evaluation
from service.http.deps import CurrentViewer, SessionDep
from service.leaderboard import page as leaderboard_page
from service.leaderboard import ranking
from service.leaderboard.ranking import Entry
from service.leaderboard.schemas import FailedCheck, Leaderboard, LeaderboardRow, ThreatOption

router = APIRouter(tags=["leaderboard"])


def _check_names(benchmark: str, metric: str) -> None:
    """A misspelt benchmark or metric is a 422 naming what exists, not an empty ranking."""
    if benchmark not in BENCHMARK_METRICS:
        raise Invalid(f"unknown benchmark {benchmark!r}; known: "
                      f"{', '.join(sorted(BENCHMARK_METRICS))}", field="benchmark")
    if metric not in BENCHMARK_METRICS[benchmark]:
        raise Invalid(f"benchmark {benchmark!r} reports no metric {metric!r}; it reports "
                      f"{', '.join(sorted(BENCHMARK_METRICS[benchmark]))}", field="metric")


def _row(i: int, x: Entry) -> LeaderboardRow:
    ev, r = x.evaluation, x.result
    return LeaderboardRow(
        rank=i + 1, value=r.value, params=r.params, n=r.n, interval=interval(r.value, r.n),
        flagged=x.flagged, failed_checks=[FailedCheck(**c) for c in x.failed_checks],
        evaluation_id=ev.id, model_id=ev.model_id, model_name=ev.model_name, owner=ev.owner,
        public=ev.public, finished_at=ev.finished_at)


def board(session: SessionDep, viewer: str | None, dataset: str, metric: str,
          benchmark: str = "adversarial", threat: str | None = None, attack: str | None = None,
          limit: int = 100) -> Leaderboard:
    _check_names(benchmark, metric)
    resolved = ranking.resolve_threat(dataset, benchmark, threat, attack)
    entries = ranking.rank(session, viewer, dataset, benchmark, metric, resolved)[:limit]
    return Leaderboard(
        dataset=dataset, benchmark=benchmark, metric=metric,
        threat=f"{resolved.norm}:{resolved.eps:.6g}" if resolved else None,
        attack=resolved.attack if resolved else None,
        order="ascending" if metric in LOWER_IS_BETTER else "descending",
        rows=[_row(i, x) for i, x in enumerate(entries)],
        threats=[ThreatOption(attack=t.attack, norm=t.norm, eps=t.eps, evaluations=count)
                 for t, count in ranking.threats_measured(session, viewer, dataset, benchmark)])


_DATASET = Query(max_length=200, description="a dataset's name")
_THREAT = Query(max_length=100, description="NORM or NORM:EPS, e.g. linf:0.0314 (default: the "
                                            "dataset's standard threat, l_inf at its eps)")
_ATTACK = Query(max_length=100, description="the attack, e.g. apgd-ce (default: autoattack)")


@router.get("/leaderboard", response_model=Leaderboard, responses=problem_responses(401, 422))
def leaderboard(
    session: SessionDep, viewer: CurrentViewer,
    dataset: Annotated[str, _DATASET],
    metric: Annotated[str, Query(max_length=100, description="the metric that ranks")],
    benchmark: Annotated[str, Query(max_length=100)] = "adversarial",
    threat: Annotated[str | None, _THREAT] = None,
    attack: Annotated[str | None, _ATTACK] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> Leaderboard:
    """Public evaluations for anyone, and the caller's own private ones, ranked by one metric
    at one threat, one row per evaluation, flagged evaluations last (at most ``limit``)."""
    return board(session, viewer.owner, dataset, metric, benchmark, threat or None,
                 attack or None, limit)


@router.get("/leaderboard/page", response_class=HTMLResponse,
            responses=problem_responses(401, 422))
def leaderboard_html(
    session: SessionDep, viewer: CurrentViewer,
    dataset: Annotated[str, _DATASET] = "waterbirds-32",
    metric: Annotated[str, Query(max_length=100)] = "robust_accuracy",
    benchmark: Annotated[str, Query(max_length=100)] = "adversarial",
    threat: Annotated[str | None, _THREAT] = None,
    attack: Annotated[str | None, _ATTACK] = None,
    compare: uuid.UUID | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> HTMLResponse:
    """The same ranking as a page, with both axes beside each row, a filter form, and links
    to compare two evaluations (``compare``: the one to compare the others with)."""
    result = board(session, viewer.owner, dataset, metric, benchmark, threat or None,
                   attack or None, limit)
    datasets = sorted({dataset, *session.scalars(
        select(Evaluation.dataset).where(visible_to(Evaluation, viewer.owner)).distinct())})
    side = ranking.resolve_threat(dataset, "adversarial", threat or None, attack or None) \
        if result.threat else None
    side = side or _side_threat(session, viewer.owner, dataset)
    return HTMLResponse(leaderboard_page.render(session, result, viewer.owner, datasets,
                                                side, compare))


def _side_threat(session: SessionDep, viewer: str | None, dataset: str) -> ranking.Threat:
    """Beside a ranking without a threat, robust accuracy at the dataset's standard threat if
    anyone measured it, else at the threat most evaluations measured."""
    standard = ranking.resolve_threat(dataset, "adversarial", None, None)
    assert standard is not None
    measured = ranking.threats_measured(session, viewer, dataset, "adversarial")
    if not measured or any(t == standard for t, _ in measured):
        return standard
    return max(measured, key=lambda x: x[1])[0]
