"""The polling path, ``GET /evaluations/{id}`` and ``GET /trainings/{id}``: the busiest
requests a CI fleet sends.

The request guard (:mod:`service.guard`) serves them as plain ASGI (:func:`hot_route`),
before the framework's routing, dependencies and request objects, which cost more CPU than
the work itself; the FastAPI routes document them and answer the forms of the path this one
does not match, through the same functions.

A poll costs one thread hop and, on a connection in autocommit mode (no BEGIN or COMMIT),
one statement (a training) or two (an evaluation): the key's row joined with the job's
columns the record shows (so the key is checked on every request, as everywhere: a revoked
key is refused at once, by any process), then an evaluation's results. The record is
serialized once, by pydantic, into the bytes sent, and tagged with an ``ETag`` (a hash of
those bytes): a poller that sends it back in ``If-None-Match`` gets ``304 Not Modified`` and
no body while the job has not changed.

On PostgreSQL (read committed) each statement of a transaction sees its own snapshot anyway,
so reading without one changes nothing a caller can see.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from anyio import to_thread
from sqlalchemy import Connection, Engine, and_, bindparam, select
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope, Send

from service.auth.keys import key_matches, key_prefix
from service.errors import NotFound, Unauthorized
from service.evaluations.service import out_of
from service.guard import bearer_key
from service.tables import ApiKey, Evaluation, Result, Training
from service.trainings.service import to_out as training_out

_KEYS = ApiKey.__table__
_EVALUATIONS = Evaluation.__table__
_TRAININGS = Training.__table__
_RESULTS = Result.__table__


def _key_and_job(job: Any, shown: tuple[str, ...]) -> Any:
    """The key's row, joined with the key owner's job ``job_id`` (all NULL when there is no
    such job of theirs); no row at all for an unknown or revoked key."""
    return (
        select(_KEYS.c.key_hash, *(job.c[name] for name in shown))
        .select_from(_KEYS.outerjoin(job, and_(
            job.c.id == bindparam("job_id", type_=job.c.id.type),
            job.c.owner == _KEYS.c.owner)))
        .where(_KEYS.c.prefix == bindparam("prefix"), _KEYS.c.revoked_at.is_(None))
    )


#: The columns :func:`service.evaluations.service.out_of` reads, and no others.
_KEY_AND_EVALUATION = _key_and_job(_EVALUATIONS, (
    "id", "status", "progress_fraction", "progress_stage", "progress_message", "model_id",
    "model_name", "dataset", "dataset_params", "split", "suite", "seed", "public",
    "created_at", "started_at", "finished_at", "attempts", "device", "engine_version", "error",
    "checks", "timings", "artifacts", "options"))

#: The columns :func:`service.trainings.service.to_out` reads, and no others.
_KEY_AND_TRAINING = _key_and_job(_TRAININGS, (
    "id", "status", "progress_fraction", "progress_stage", "progress_message", "name",
    "dataset", "dataset_params", "held_out_split", "architecture", "method", "threat",
    "epochs", "batch_size", "lr", "seed", "options", "evaluate", "history", "created_at",
    "started_at", "finished_at", "attempts", "device", "engine_version", "error", "model_id",
    "evaluation_id"))

_RESULTS_OF = (
    select(_RESULTS.c.benchmark, _RESULTS.c.metric, _RESULTS.c.value, _RESULTS.c.params)
    .where(_RESULTS.c.evaluation_id == bindparam("evaluation_id",
                                                 type_=_RESULTS.c.evaluation_id.type))
    .order_by(_RESULTS.c.id)
)


def autocommit(engine: Engine) -> Engine:
    """An engine on the same pool whose connections run each statement on its own."""
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def _owned_job(conn: Connection, statement: Any, key: str, job_id: uuid.UUID,
               what: str) -> Any:
    row = conn.execute(statement, {"prefix": key_prefix(key), "job_id": job_id}).first()
    if row is None or not key_matches(key, row.key_hash):
        raise Unauthorized("the API key is not valid")
    if row.id is None:
        raise NotFound(f"no {what} {job_id}")
    return row


def evaluation_json(engine: Engine, key: str, evaluation_id: uuid.UUID) -> bytes:
    """The record of the key owner's evaluation, as the JSON bytes to send; 401 for a key
    that is unknown or revoked, 404 for an evaluation that is missing or someone else's."""
    with engine.connect() as conn:
        row = _owned_job(conn, _KEY_AND_EVALUATION, key, evaluation_id, "evaluation")
        results = conn.execute(_RESULTS_OF, {"evaluation_id": evaluation_id}).all()
    return out_of(row, results).model_dump_json().encode()


def training_json(engine: Engine, key: str, training_id: uuid.UUID) -> bytes:
    """The record of the key owner's training, as :func:`evaluation_json` gives an
    evaluation's."""
    with engine.connect() as conn:
        row = _owned_job(conn, _KEY_AND_TRAINING, key, training_id, "training")
    return training_out(row).model_dump_json().encode()


#: What a poll of each kind of job reads, by the first segment of its path.
RECORDS: dict[str, Callable[[Engine, str, uuid.UUID], bytes]] = {
    "evaluations": evaluation_json, "trainings": training_json}


async def answer(kind: str, engine: Engine, headers: Headers,
                 job_id: uuid.UUID) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of a poll: 200 with the record and its ``ETag``, or 304
    when ``If-None-Match`` names that tag."""
    key = bearer_key(headers)
    if key is None:
        raise Unauthorized("send 'Authorization: Bearer <api key>'")
    body = await to_thread.run_sync(RECORDS[kind], engine, key, job_id)
    tag = etag(body)
    if not_modified(headers.get("if-none-match"), tag):
        return 304, [(b"etag", tag.encode())], b""
    return 200, [(b"content-length", str(len(body)).encode()),
                 (b"content-type", b"application/json"), (b"etag", tag.encode())], body


async def response(kind: str, request: Request, job_id: uuid.UUID) -> Response:
    """A poll answered through the framework (the forms of the path :func:`hot_route` does
    not take)."""
    status, headers, body = await answer(kind, request.app.state.autocommit_engine,
                                         request.headers, job_id)
    return Response(body, status_code=status,
                    headers={k.decode(): v.decode() for k, v in headers
                             if k != b"content-length"})


def etag(body: bytes) -> str:
    """A strong validator: the same bytes, the same tag."""
    return '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"'


def not_modified(if_none_match: str | None, tag: str) -> bool:
    """Whether ``If-None-Match`` names ``tag`` (weak comparison, RFC 9110 13.1.2)."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    return any(candidate.strip().removeprefix("W/") == tag
               for candidate in if_none_match.split(","))


#: A job's path with the canonical forms of its id (hyphenated or 32 hex digits); the
#: framework takes the others.
_PATH = re.compile(r"/(evaluations|trainings)/([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                   r"[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|[0-9a-fA-F]{32})")


def hot_route(scope: Scope) -> Callable[[Send], Awaitable[None]] | None:
    """The handler of a poll (``GET /evaluations/{id}``, ``GET /trainings/{id}``) as plain
    ASGI, or None for any other request. Errors are raised as the domain's exceptions, which
    the guard answers."""
    if scope["method"] != "GET":
        return None
    found = _PATH.fullmatch(scope["path"])
    if found is None:
        return None
    kind, job_id = found[1], uuid.UUID(found[2])

    async def serve(send: Send) -> None:
        status, headers, body = await answer(kind, scope["app"].state.autocommit_engine,
                                             Headers(scope=scope), job_id)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return serve
