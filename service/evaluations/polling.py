"""The polling path, ``GET /evaluations/{id}``: the busiest request a CI fleet sends.

The request guard (:mod:`service.guard`) serves it as plain ASGI (:func:`hot_route`), before
the framework's routing, dependencies and request objects, which cost more CPU than the
work itself; the FastAPI route in :mod:`service.evaluations.router` documents it and answers
the forms of the path this one does not match.

It costs one thread hop and two statements on a connection in autocommit mode (no BEGIN or
COMMIT): the key's row joined with the evaluation's columns the record shows (so the key is
checked on every request, as everywhere: a revoked key is refused at once, by any process),
then the evaluation's results. The record is serialized once, by pydantic, into the bytes
sent, and tagged with an ``ETag`` (a hash of those bytes): a poller that sends it back in
``If-None-Match`` gets ``304 Not Modified`` and no body while the job has not changed.

On PostgreSQL (read committed) each statement of a transaction sees its own snapshot anyway,
so reading without one changes nothing a caller can see.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Awaitable, Callable

from anyio import to_thread
from sqlalchemy import Engine, and_, bindparam, select
from starlette.datastructures import Headers
from starlette.types import Scope, Send

from service.auth.keys import key_matches, key_prefix
from service.errors import NotFound, Unauthorized
from service.evaluations.service import out_of
from service.guard import bearer_key
from service.tables import ApiKey, Evaluation, Result

_KEYS = ApiKey.__table__
_EVALUATIONS = Evaluation.__table__
_RESULTS = Result.__table__

#: The columns :func:`service.evaluations.service.out_of` reads, and no others.
_SHOWN = ("id", "status", "progress_fraction", "progress_stage", "progress_message",
          "model_id", "model_name", "dataset", "dataset_params", "split", "suite", "seed",
          "public", "created_at", "started_at", "finished_at", "attempts", "device",
          "engine_version", "error", "checks", "timings", "artifacts", "options")

_KEY_AND_EVALUATION = (
    select(_KEYS.c.key_hash, *(_EVALUATIONS.c[name] for name in _SHOWN))
    .select_from(_KEYS.outerjoin(_EVALUATIONS, and_(
        _EVALUATIONS.c.id == bindparam("evaluation_id", type_=_EVALUATIONS.c.id.type),
        _EVALUATIONS.c.owner == _KEYS.c.owner)))
    .where(_KEYS.c.prefix == bindparam("prefix"), _KEYS.c.revoked_at.is_(None))
)

_RESULTS_OF = (
    select(_RESULTS.c.benchmark, _RESULTS.c.metric, _RESULTS.c.value, _RESULTS.c.params)
    .where(_RESULTS.c.evaluation_id == bindparam("evaluation_id",
                                                 type_=_RESULTS.c.evaluation_id.type))
    .order_by(_RESULTS.c.id)
)


def autocommit(engine: Engine) -> Engine:
    """An engine on the same pool whose connections run each statement on its own."""
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def evaluation_json(engine: Engine, key: str, evaluation_id: uuid.UUID) -> bytes:
    """The record of the key owner's evaluation, as the JSON bytes to send; 401 for a key
    that is unknown or revoked, 404 for an evaluation that is missing or someone else's."""
    with engine.connect() as conn:
        row = conn.execute(_KEY_AND_EVALUATION,
                           {"prefix": key_prefix(key), "evaluation_id": evaluation_id}).first()
        if row is None or not key_matches(key, row.key_hash):
            raise Unauthorized("the API key is not valid")
        if row.id is None:
            raise NotFound(f"no evaluation {evaluation_id}")
        results = conn.execute(_RESULTS_OF, {"evaluation_id": evaluation_id}).all()
    return out_of(row, results).model_dump_json().encode()


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


#: The canonical forms of an id (hyphenated or 32 hex digits); others go to the framework.
_PATH = re.compile(r"/evaluations/([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                   r"[0-9a-fA-F]{12}|[0-9a-fA-F]{32})")


def hot_route(scope: Scope) -> Callable[[Send], Awaitable[None]] | None:
    """The handler of a ``GET /evaluations/{id}`` request as plain ASGI, or None for any
    other request. Errors are raised as the domain's exceptions, which the guard answers."""
    if scope["method"] != "GET":
        return None
    found = _PATH.fullmatch(scope["path"])
    if found is None:
        return None
    evaluation_id = uuid.UUID(found[1])

    async def serve(send: Send) -> None:
        headers = Headers(scope=scope)
        key = bearer_key(headers)
        if key is None:
            raise Unauthorized("send 'Authorization: Bearer <api key>'")
        body = await to_thread.run_sync(evaluation_json, scope["app"].state.autocommit_engine,
                                        key, evaluation_id)
        tag = etag(body)
        if not_modified(headers.get("if-none-match"), tag):
            await send({"type": "http.response.start", "status": 304,
                        "headers": [(b"etag", tag.encode())]})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-length", str(len(body)).encode()),
            (b"content-type", b"application/json"), (b"etag", tag.encode())]})
        await send({"type": "http.response.body", "body": body})

    return serve
