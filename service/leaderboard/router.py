"""Leaderboards: evaluations ranked by one metric, the caller's own plus every public one."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse
from pydantic import BaseModel
from sqlalchemy import or_, select

from service.deps import CurrentOwner, SessionDep
from service.errors import Invalid, problem_responses
from service.pages import leaderboard as leaderboard_page
from service.tables import Evaluation, Result

router = APIRouter(tags=["leaderboard"])

# Metrics where smaller is better; everything else (accuracies, rfs, min norms) ranks descending.
LOWER_IS_BETTER = frozenset({"bg_gap", "mean_corruption_error"})


class LeaderboardRow(BaseModel):
    rank: int
    value: float
    params: dict[str, Any]
    evaluation_id: uuid.UUID
    model_id: uuid.UUID | None
    model_name: str
    owner: str
    public: bool
    finished_at: datetime | None


class Leaderboard(BaseModel):
    dataset: str
    benchmark: str
    metric: str
    threat: str | None
    order: str
    rows: list[LeaderboardRow]


def _parse_threat(threat: str) -> tuple[str, float | None]:
    """``linf`` or ``linf:0.0314`` (norm, optionally the eps)."""
    norm, _, eps = threat.partition(":")
    try:
        return norm, float(eps) if eps else None
    except ValueError as exc:
        raise Invalid("threat is NORM or NORM:EPS, e.g. linf:0.0314", field="threat") from exc


@router.get("/leaderboard", response_model=Leaderboard, responses=problem_responses(401, 422))
def leaderboard(
    session: SessionDep, owner: CurrentOwner, dataset: str, metric: str,
    benchmark: str = "adversarial", threat: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> Leaderboard:
    q = (select(Result, Evaluation).join(Evaluation, Result.evaluation_id == Evaluation.id)
         .where(Evaluation.status == "succeeded", Evaluation.dataset == dataset,
                Result.benchmark == benchmark, Result.metric == metric,
                or_(Evaluation.owner == owner, Evaluation.public.is_(True))))
    norm, eps = _parse_threat(threat) if threat else (None, None)
    rows = []
    for result, ev in session.execute(q):
        if norm is not None and result.params.get("norm") != norm:
            continue
        if eps is not None and not _close(result.params.get("eps"), eps):
            continue
        rows.append((result, ev))
    descending = metric not in LOWER_IS_BETTER
    rows.sort(key=lambda re: (-re[0].value if descending else re[0].value, re[1].created_at))
    return Leaderboard(
        dataset=dataset, benchmark=benchmark, metric=metric, threat=threat,
        order="descending" if descending else "ascending",
        rows=[LeaderboardRow(rank=i + 1, value=r.value, params=r.params, evaluation_id=ev.id,
                             model_id=ev.model_id, model_name=ev.model_name, owner=ev.owner,
                             public=ev.public, finished_at=ev.finished_at)
              for i, (r, ev) in enumerate(rows[:limit])],
    )


def _close(value: Any, target: float) -> bool:
    return isinstance(value, int | float) and abs(value - target) <= 1e-4 * max(1.0, abs(target))


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
