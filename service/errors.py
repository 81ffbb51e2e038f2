"""Domain errors and their RFC 9457 problem+json form.

Services raise these; one handler turns them into responses with a stable ``type``. Nothing
else in the API returns an error body, and an unexpected exception becomes a problem+json
500 that names the request, never a bare traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("robustscope.api")

PROBLEM = "application/problem+json"
TYPE_BASE = "https://robustscope.dev/problems/"


class DomainError(Exception):
    status: int = 400
    type: str = "bad-request"
    title: str = "Bad request"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class NotFound(DomainError):
    status, type, title = 404, "not-found", "Not found"


class Unauthorized(DomainError):
    status, type, title = 401, "unauthorized", "Missing or invalid API key"


class Conflict(DomainError):
    status, type, title = 409, "conflict", "Conflict"


class PayloadTooLarge(DomainError):
    status, type, title = 413, "payload-too-large", "Upload too large"


class Invalid(DomainError):
    status, type, title = 422, "invalid", "Invalid request"


class CheckpointRefused(DomainError):
    status, type, title = 422, "checkpoint-refused", "Checkpoint refused"


class PickleRefused(CheckpointRefused):
    type, title = "checkpoint-pickle-refused", "Pickled checkpoints are refused"


class CheckpointMismatch(CheckpointRefused):
    type, title = "checkpoint-architecture-mismatch", "Checkpoint does not fit the architecture"


class Unavailable(DomainError):
    status, type, title = 503, "unavailable", "Service unavailable"


class QuotaExceeded(DomainError):
    status, type, title = 429, "quota-exceeded", "Quota exceeded"


#: Seconds a client is asked to wait (``Retry-After``) after a 503 or a 429.
RETRY_AFTER = {503: 5, 429: 30}


def problem(status: int, type_: str, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = {"type": TYPE_BASE + type_, "title": title, "status": status, "detail": detail}
    body.update(extra)
    headers = {"Retry-After": str(RETRY_AFTER[status])} if status in RETRY_AFTER else None
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def database_down(exc: BaseException) -> JSONResponse:
    """503 for a database (or broker) that cannot be reached; the driver's text stays in the
    log, since it names hosts and ports."""
    log.warning("backend unavailable: %s: %s", type(exc).__name__, str(exc)[:300])
    return problem(503, "unavailable", "Service unavailable",
                   "the database is unavailable; retry shortly")


def field_errors(exc: ValidationError | RequestValidationError,
                 prefix: str = "") -> list[dict[str, str]]:
    """A validation failure as ``[{field, message}]``, the dotted field path under ``prefix``
    (the one shape every 422 of the API carries)."""
    out = []
    for e in exc.errors():
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        out.append({"field": ".".join([prefix, *loc] if prefix else loc),
                    "message": str(e.get("msg", ""))})
    return out


def invalid(exc: ValidationError, prefix: str = "", what: str = "invalid fields") -> Invalid:
    """The 422 for a pydantic validation failure of a request part (a body, a form field)."""
    errors = field_errors(exc, prefix)
    return Invalid(what + ": " + "; ".join(f"{e['field'] or 'body'}: {e['message']}"
                                           for e in errors), errors=errors)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for the problem+json errors an endpoint may return."""
    return {status: _problem_schema() for status in statuses}


def _problem_schema() -> dict[str, Any]:
    return {
        "description": "RFC 9457 problem details",
        "content": {PROBLEM: {"schema": {"type": "object", "properties": {
            "type": {"type": "string"}, "title": {"type": "string"},
            "status": {"type": "integer"}, "detail": {"type": "string"}}}}},
    }


def install(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> JSONResponse:
        extra = dict(exc.extra)
        # A problem about the request's fields names them the same way everywhere: ``field``
        # (the first) and ``errors`` (every one, with its message).
        if extra.get("field") and "errors" not in extra:
            extra["errors"] = [{"field": extra["field"], "message": exc.detail}]
        elif extra.get("errors") and "field" not in extra:
            extra["field"] = extra["errors"][0]["field"]
        return problem(exc.status, exc.type, exc.title, exc.detail, **extra)

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
    """The one answer to an unexpected error (see ``service.guard``); never re-raised."""
    return problem(500, "internal-error", "Internal server error",
                   f"an unexpected {type(exc).__name__} occurred; it has been logged")
