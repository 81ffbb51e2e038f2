"""The routes every kind of job has, written once: read (``GET /{kind}/{id}``), list, cancel and
the progress stream. A kind's router adds them with :func:`add_job_routes` and writes only its
create and what is its own (an evaluation's report, a sweep's page)."""


import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel
from sqlalchemy.orm import Session

from service.http import polling
from service.http.deps import CurrentOwner, SessionDep
from service.http.events import progress_events


def no_filters() -> dict[str, Any]:
    """A list with no filter of its own."""
    return {}


@dataclass(frozen=True)
class JobRoutes:
    """One kind of job as its routes see it."""

    path: str  #: the router's prefix without its slash, e.g. ``evaluations``
    name: str  #: the kind in names and messages, e.g. ``evaluation``
    record: type[BaseModel]  #: the record's schema
    page: type[BaseModel]  #: a page of records
    errors: dict[int | str, dict[str, Any]]
    get: Callable[[Session, str, uuid.UUID], Any]  #: the owner's row, else 404
    cancel: Callable[[Session, str, uuid.UUID], Any]
    out: Callable[[Session, Any], BaseModel]  #: the record of a row
    list_page: Callable[..., tuple[list[Any], str | None]]
    #: the list's query parameters besides ``cursor`` and ``limit`` (a dependency)
    filters: Callable[..., dict[str, Any]] = no_filters
    polled: bool = True  #: ``GET`` served by the polling path (else read here)
    events: bool = True  #: has a progress stream
    docs: dict[str, str] = field(default_factory=dict)  #: route name -> its description


def accepted(response: Response, path: str, row_id: uuid.UUID, created: bool) -> None:
    """A create's answer: 202 with the new job's ``Location``, or 200 for a replay."""
    response.headers["Location"] = f"/{path}/{row_id}"
    response.status_code = 202 if created else 200


def page_args(cursor: str | None = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict[str, Any]:
    """A list's paging parameters (after its filters)."""
    return {"cursor": cursor, "limit": limit}


def add_job_routes(router: APIRouter, kind: JobRoutes) -> None:
    """Add the kind's list, read, cancel and (if it has one) progress stream to ``router``."""
    JobId = Annotated[uuid.UUID, Path(alias=f"{kind.name}_id")]
    Filters = Annotated[dict[str, Any], Depends(kind.filters)]

    def list_jobs(session: SessionDep, owner: CurrentOwner, filters: Filters,
                  paging: Annotated[dict[str, Any], Depends(page_args)]) -> Any:
        rows, next_cursor = kind.list_page(session, owner, **filters, **paging)
        return kind.page(items=[kind.out(session, r) for r in rows], next_cursor=next_cursor)

    async def get_polled(job_id: JobId, request: Request) -> Response:
        if polling.from_browser(request.headers):  # a page's link, read through its session
            return await polling.browser_record(
                request, lambda s, owner: kind.out(s, kind.get(s, owner, job_id)))
        return await polling.response(kind.path, request, job_id)

    def get_read(job_id: JobId, session: SessionDep, owner: CurrentOwner) -> Any:
        return kind.out(session, kind.get(session, owner, job_id))

    def cancel_job(job_id: JobId, session: SessionDep, owner: CurrentOwner) -> Any:
        return kind.out(session, kind.cancel(session, owner, job_id))

    def visible(job_id: JobId, session: SessionDep, owner: CurrentOwner) -> str:
        """404 before a stream starts; the owner for the stream's own reads."""
        kind.get(session, owner, job_id)
        return owner

    async def job_events(job_id: JobId, request: Request,
                         owner: Annotated[str, Depends(visible)]
                         ) -> AsyncIterator[ServerSentEvent]:
        async for event in progress_events(
                request, lambda s: kind.out(s, kind.get(s, owner, job_id))):  # type: ignore[arg-type, return-value]
            yield event

    one = f"/{{{kind.name}_id}}"
    docs = kind.docs
    router.add_api_route("", list_jobs, methods=["GET"], response_model=kind.page,
                         responses=kind.errors, name=f"list_{kind.path}",
                         description=docs.get("list"))
    if kind.polled:
        router.add_api_route(one, get_polled, methods=["GET"], response_model=kind.record,
                             name=f"get_{kind.name}", description=docs.get("get"),
                             **polling.documented(kind.errors))
    else:
        router.add_api_route(one, get_read, methods=["GET"], response_model=kind.record,
                             responses=kind.errors, name=f"get_{kind.name}",
                             description=docs.get("get"))
    router.add_api_route(one + "/cancel", cancel_job, methods=["POST"], status_code=202,
                         response_model=kind.record, responses=kind.errors,
                         name=f"cancel_{kind.name}", description=docs.get("cancel"))
    if kind.events:
        router.add_api_route(one + "/events", job_events, methods=["GET"],
                             response_class=EventSourceResponse, responses=kind.errors,
                             name=f"{kind.name}_events", description=docs.get("events"))
