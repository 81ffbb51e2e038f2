"""Domain errors: what services raise, each with the status, ``type`` and title of its
RFC 9457 problem+json form (rendered by :mod:`service.http.problems`)."""

from __future__ import annotations

from typing import Any, Protocol

from pydantic import ValidationError

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


def problem_body(status: int, type_: str, title: str, detail: str,
                 **extra: Any) -> dict[str, Any]:
    """An RFC 9457 problem body: the one place its ``type`` is made (``TYPE_BASE`` and the
    problem's short name), whether it is answered at once or stored (a dataset's failed
    ingest)."""
    body = {"type": TYPE_BASE + type_, "title": title, "status": status, "detail": detail}
    body.update(extra)
    return body


def normalised(exc: DomainError) -> dict[str, Any]:
    """A domain error's extra members, with the fields of a problem about the request named
    the same way everywhere: ``field`` (the first) and ``errors`` (every one, with its
    message)."""
    extra = dict(exc.extra)
    if extra.get("field") and "errors" not in extra:
        extra["errors"] = [{"field": extra["field"], "message": exc.detail}]
    elif extra.get("errors") and "field" not in extra:
        extra["field"] = extra["errors"][0]["field"]
    return extra


#: Seconds a client is asked to wait (``Retry-After``) after a 503 or a 429.
RETRY_AFTER = {503: 5, 429: 30}


class _Failed(Protocol):
    """A validation failure: pydantic's, or the framework's for a request."""

    def errors(self) -> Any: ...


def field_errors(exc: ValidationError | _Failed,
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
