"""Domain errors as RFC 9457 problem+json responses.

Services raise :mod:`core.errors`; the handlers installed here and the request guard turn them
into responses with a stable ``type``. Nothing else in the API returns an error body, and an
unexpected exception becomes a problem+json 500 that names the request, never a bare traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import (
    PROBLEM,
    RETRY_AFTER,
    DomainError,
    Invalid,
    field_errors,
    normalised,
    problem_body,
)

log = logging.getLogger("robustscope.api")


def problem(status: int, type_: str, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = problem_body(status, type_, title, detail, **extra)
    headers = {"Retry-After": str(RETRY_AFTER[status])} if status in RETRY_AFTER else None
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def database_down(exc: BaseException) -> JSONResponse:
    """503 for a database (or broker) that cannot be reached; the driver's text stays in the
    log, since it names hosts and ports."""
    log.warning("backend unavailable: %s: %s", type(exc).__name__, str(exc)[:300])
    return problem(503, "unavailable", "Service unavailable",
                   "the database is unavailable; retry shortly")


def render(exc: DomainError) -> JSONResponse:
    """The one answer to a domain error, from the framework's handler and the request guard
    alike."""
    return problem(exc.status, exc.type, exc.title, exc.detail, **normalised(exc))


def install(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> JSONResponse:
        return render(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await _domain(request, Invalid(
            "invalid fields: " + "; ".join(f"{e['field'] or 'body'}: {e['message']}"
                                           for e in field_errors(exc)),
            errors=field_errors(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        slug = {404: "not-found", 405: "method-not-allowed", 401: "unauthorized"}.get(
            exc.status_code, "http-error")
        return problem(exc.status_code, slug, str(exc.detail), str(exc.detail))

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(SATimeoutError)
    async def _database(_: Request, exc: Exception) -> JSONResponse:
        return database_down(exc)

    @app.exception_handler(DataError)
    async def _data(_: Request, exc: DataError) -> JSONResponse:
        # Values the edge checks should have refused (e.g. a NUL in a string on PostgreSQL).
        log.warning("database refused a value: %s", str(exc.orig)[:300])
        return problem(422, "invalid", "Invalid request",
                       "a value was refused by the database: "
                       f"{str(exc.orig).splitlines()[0][:200]}")



def unexpected(exc: BaseException) -> JSONResponse:
    """The one answer to an unexpected error (see ``service.http.guard``); never re-raised."""
    return problem(500, "internal-error", "Internal server error",
                   f"an unexpected {type(exc).__name__} occurred; it has been logged")
