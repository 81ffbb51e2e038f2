from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Response
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from core.errors import problem_responses
from core.repository import is_owner
from core.tables import Sweep
from service.http.deps import CurrentOwner, CurrentViewer, OutboxDep, SessionDep, SettingsDep
from service.jobs.router import JobRoutes, accepted, add_job_routes
from service.sweeps import page as sweep_page
from service.sweeps import service
from service.sweeps.schemas import SweepIn, SweepOut, SweepPage

router = APIRouter(prefix="/sweeps", tags=["sweeps"])
ERRORS = problem_responses(401, 404, 409, 422)


@router.post("", status_code=202, response_model=SweepOut, responses=ERRORS)
async def create_sweep(
    body: SweepIn, response: Response, session: SessionDep, owner: CurrentOwner,
    outbox: OutboxDep, settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]
    = None,
) -> SweepOut:
    """Queue one training per grid point, each evaluated with the sweep's suite. A repeated
    ``Idempotency-Key`` with the same body answers 200 with the original sweep, with another
    body 409."""
    row, created = await run_in_threadpool(service.submit, session, outbox, owner, body,
                                           idempotency_key, settings)
    accepted(response, "sweeps", row.id, created)
    return await run_in_threadpool(service.to_out, session, row)


add_job_routes(router, JobRoutes(
    path="sweeps", name="sweep", record=SweepOut, page=SweepPage, errors=ERRORS,
    get=service.get, cancel=service.cancel, out=service.to_out, list_page=service.list_page,
    polled=False, events=False, docs={
        "list": "The owner's sweeps, newest first, each with its status and trade-off table.",
        "get": "The sweep's state and its trade-off table, one row per model.",
        "cancel": "Cancel every training and evaluation of the sweep that has not finished."}))


@router.get("/{sweep_id}/report", response_class=HTMLResponse, responses=ERRORS)
def sweep_report(sweep_id: uuid.UUID, session: SessionDep, viewer: CurrentViewer) -> HTMLResponse:
    """The trade-off as a page: robust accuracy against RFS and BG-gap, the per-model table;
    the owner's, or anyone's when the sweep is public."""
    row = session.get(Sweep, sweep_id)
    viewer.may_read(row, bool(row and row.spec.get("public")), f"sweep {sweep_id}")
    assert row is not None
    return HTMLResponse(sweep_page.render(service.to_out(session, row), viewer.owner,
                                          mine=is_owner(row, viewer.owner)))
