from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Response
from starlette.concurrency import run_in_threadpool

from contract.jobs import JobStatus
from core.errors import problem_responses
from service.http.deps import CurrentOwner, OutboxDep, SessionDep, SettingsDep
from service.jobs.router import JobRoutes, accepted, add_job_routes
from service.trainings import service
from service.trainings.schemas import TrainingIn, TrainingOut, TrainingPage

router = APIRouter(prefix="/trainings", tags=["trainings"])
ERRORS = problem_responses(401, 404, 409, 422)
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]


@router.post("", status_code=202, response_model=TrainingOut, responses=ERRORS)
async def create_training(
    body: TrainingIn, response: Response, session: SessionDep, owner: CurrentOwner,
    outbox: OutboxDep, settings: SettingsDep, idempotency_key: IdempotencyKey = None,
) -> TrainingOut:
    """Queue a training; ``Location`` names the job. A repeated ``Idempotency-Key`` with the
    same body answers 200 with the original job, with another body 409."""
    row, created = await run_in_threadpool(service.submit, session, outbox, owner, body,
                                           idempotency_key, settings)
    accepted(response, "trainings", row.id, created)
    return service.to_out(row)


def _filters(status: JobStatus | None = None) -> dict[str, Any]:
    return {"status": status}


add_job_routes(router, JobRoutes(
    path="trainings", name="training", record=TrainingOut, page=TrainingPage, errors=ERRORS,
    get=service.get, cancel=service.cancel, out=lambda _session, row: service.to_out(row),
    list_page=service.list_page, filters=_filters, docs={
        "get": "The training's record, with an ``ETag``; pollers send it back in "
               "``If-None-Match``\nand get 304 with no body until the job changes "
               "(``service/http/polling.py``). A browser\nlogged in at ``/login`` (a link on a "
               "page) reads it through its session.",
        "events": "Server-sent events: a ``progress`` event on every change (epochs, the "
                  "held-out\nevaluation), ``end`` with the whole record at a final state."}))
