"""Leaderboards: evaluations ranked by one metric, the caller's own plus every public one."""

from __future__ import annotations

import math
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse
from sqlalchemy import or_, select

from contract.attacks import Norm
from contract.jobs import JobStatus
from contract.metrics import BENCHMARK_METRICS, LOWER_IS_BETTER
from contract.stats import interval
from core.errors import Invalid, problem_responses
from core.tables import Evaluation, Result
from service.http.deps import CurrentOwner, SessionDep
from service.leaderboard import page as leaderboard_page
from service.leaderboard.schemas import Leaderboard, LeaderboardRow

router = APIRouter(tags=["leaderboard"])

def _parse_threat(threat: str) -> tuple[str, float | None]:
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


def _check_names(benchmark: str, metric: str) -> None:
    """A misspelt benchmark or metric is a 422 naming what exists, not an empty ranking."""
    if benchmark not in BENCHMARK_METRICS:
        raise Invalid(f"unknown benchmark {benchmark!r}; known: "
                      f"{', '.join(sorted(BENCHMARK_METRICS))}", field="benchmark")
    if metric not in BENCHMARK_METRICS[benchmark]:
        raise Invalid(f"benchmark {benchmark!r} reports no metric {metric!r}; it reports "
                      f"{', '.join(sorted(BENCHMARK_METRICS[benchmark]))}", field="metric")


@router.get("/leaderboard", response_model=Leaderboard, responses=problem_responses(401, 422))
def leaderboard(
    session: SessionDep, owner: CurrentOwner,
    dataset: Annotated[str, Query(max_length=200, description="a dataset's name")],
    metric: Annotated[str, Query(max_length=100, description="the metric that ranks")],
    benchmark: Annotated[str, Query(max_length=100)] = "adversarial",
    threat: Annotated[str | None, Query(max_length=100,
                                        description="NORM or NORM:EPS, e.g. linf:0.0314")]
    = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> Leaderboard:
    """The owner's evaluations and every public one, ranked by one metric in the database
    (best first), at most ``limit`` rows."""
    _check_names(benchmark, metric)
    q = (select(Result, Evaluation).join(Evaluation, Result.evaluation_id == Evaluation.id)
         .where(Evaluation.status == JobStatus.SUCCEEDED, Evaluation.dataset == dataset,
                Result.benchmark == benchmark, Result.metric == metric,
                or_(Evaluation.owner == owner, Evaluation.public.is_(True))))
    if threat:
        norm, eps = _parse_threat(threat)
        q = q.where(Result.params["norm"].as_string() == norm)
        if eps is not None:
            tol = 1e-4 * max(1.0, eps)
            q = q.where(Result.params["eps"].as_float().between(eps - tol, eps + tol))
    descending = metric not in LOWER_IS_BETTER
    q = q.order_by(Result.value.desc() if descending else Result.value.asc(),
                   Evaluation.created_at, Result.id).limit(limit)
    return Leaderboard(
        dataset=dataset, benchmark=benchmark, metric=metric, threat=threat,
        order="descending" if descending else "ascending",
        rows=[LeaderboardRow(rank=i + 1, value=r.value, params=r.params, n=r.n,
                             interval=interval(r.value, r.n), evaluation_id=ev.id,
                             model_id=ev.model_id, model_name=ev.model_name, owner=ev.owner,
                             public=ev.public, finished_at=ev.finished_at)
              for i, (r, ev) in enumerate(session.execute(q))],
    )


@router.get("/leaderboard/page", response_class=HTMLResponse,
            responses=problem_responses(401, 422))
def leaderboard_html(
    session: SessionDep, owner: CurrentOwner, dataset: str = "waterbirds-32",
    metric: str = "robust_accuracy", benchmark: str = "adversarial", threat: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> HTMLResponse:
    """The same ranking as a page, with both axes beside each row and a filter form."""
    board = leaderboard(session, owner, dataset, metric, benchmark, threat or None, limit)
    datasets = sorted({dataset, *session.scalars(
        select(Evaluation.dataset).where(or_(Evaluation.owner == owner,
                                             Evaluation.public.is_(True))).distinct())})
    return HTMLResponse(leaderboard_page.render(session, board, owner, datasets))
