from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from core.errors import problem_responses
from core.quotas import check_active_jobs
from service.http import polling
from service.http.deps import CurrentOwner, OutboxDep, SessionDep, SettingsDep
from service.http.events import progress_events
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
    row, created = await run_in_threadpool(service.create, session, outbox, owner, body,
                                           idempotency_key)
    if created:
        await run_in_threadpool(check_active_jobs, session, owner, settings, 0)
    response.headers["Location"] = f"/trainings/{row.id}"
    response.status_code = 202 if created else 200
    return service.to_out(row)


@router.get("", response_model=TrainingPage, responses=ERRORS)
def list_trainings(
    session: SessionDep, owner: CurrentOwner,
    status: Annotated[str | None, Query(pattern="^(queued|running|succeeded|failed|cancelled)$")]
    = None,
    cursor: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> TrainingPage:
    rows, next_cursor = service.list_page(session, owner, status=status, cursor=cursor,
                                          limit=limit)
    return TrainingPage(items=[service.to_out(r) for r in rows], next_cursor=next_cursor)


@router.get("/{training_id}", response_model=TrainingOut, **polling.documented(ERRORS))
async def get_training(training_id: uuid.UUID, request: Request) -> Response:
    """The training's record, with an ``ETag``; pollers send it back in ``If-None-Match``
    and get 304 with no body until the job changes (``service/http/polling.py``). A browser
    logged in at ``/login`` (a link on a page) reads it through its session."""
    if polling.from_browser(request.headers):
        return await polling.browser_record(
            request, lambda s, owner: service.to_out(service.get(s, owner, training_id)))
    return await polling.response("trainings", request, training_id)


@router.post("/{training_id}/cancel", status_code=202, response_model=TrainingOut,
             responses=ERRORS)
def cancel_training(training_id: uuid.UUID, session: SessionDep,
                    owner: CurrentOwner) -> TrainingOut:
    return service.to_out(service.cancel(session, owner, training_id))


def _training_visible(training_id: uuid.UUID, session: SessionDep, owner: CurrentOwner) -> str:
    """404 before a stream starts; the owner for the stream's own reads."""
    service.get(session, owner, training_id)
    return owner


@router.get("/{training_id}/events", response_class=EventSourceResponse, responses=ERRORS)
async def training_events(training_id: uuid.UUID, request: Request,
                          owner: Annotated[str, Depends(_training_visible)]
                          ) -> AsyncIterator[ServerSentEvent]:
    """Server-sent events: a ``progress`` event on every change (epochs, the held-out
    evaluation), ``end`` with the whole record at a final state."""
    async for event in progress_events(
            request, lambda s: service.to_out(service.get(s, owner, training_id))):
        yield event
