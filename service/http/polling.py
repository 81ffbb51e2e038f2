"""The polling path, ``GET /evaluations/{id}`` and ``GET /trainings/{id}``: the busiest
requests a CI fleet sends.

The request guard (:mod:`service.http.guard`) serves them as plain ASGI (:func:`hot_route`),
before the framework's routing, dependencies and request objects, which cost more CPU than
the work itself; the FastAPI routes document them and answer the forms of the path this one
does not match, through the same functions.

A poll runs one statement (a training) or two (an evaluation) in autocommit mode (no BEGIN
or COMMIT): the key's row joined with the job's columns the record shows (so the key is
checked on every request, as everywhere: a revoked key is refused at once, by any process),
then an evaluation's results. On PostgreSQL they run on psycopg's own asyncio connections
(:class:`PostgresRecords`), on the event loop: the SQL is compiled once from the same
statements, and a poll costs neither a thread hop nor SQLAlchemy's per-statement work, which
together cost more CPU than the reads. On SQLite, whose driver has no asyncio interface, they
run through the engine in a worker thread (:class:`ThreadedRecords`). The record is serialized
once, by pydantic, into the bytes sent, and tagged with an ``ETag`` (a hash of those bytes):
a poller that sends it back in ``If-None-Match`` gets ``304 Not Modified`` and no body while
the job has not changed.

On PostgreSQL (read committed) each statement of a transaction sees its own snapshot anyway,
so reading without one changes nothing a caller can see.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from anyio import to_thread
from psycopg.pq import TransactionStatus
from psycopg.rows import namedtuple_row
from pydantic import BaseModel
from sqlalchemy import Engine, and_, bindparam, select
from sqlalchemy.orm import Session
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope, Send

from core.errors import NotFound, Unauthorized, Unavailable
from core.keys import key_matches, key_prefix
from core.repository import owned_by
from core.sessions import COOKIE
from core.tables import ApiKey, Result
from service.http.deps import current_viewer
from service.http.guard import bearer_key

log = logging.getLogger(__name__)

_KEYS = ApiKey.__table__
_RESULTS = Result.__table__


@dataclass(frozen=True)
class Polled:
    """A kind of job the polling path serves: its table, the columns its record shows (and no
    others), how the record is made from a row of them (and, for an evaluation, its results),
    and the job's name in a 404."""

    name: str
    table: Any
    shown: tuple[str, ...]
    render: Callable[..., BaseModel]
    with_results: bool = False
    # Rows of another table some records list (an evaluation's shards), read by ``job_id``
    # only where the job's column ``more_if`` is above 1; render then takes them third.
    more: Any | None = None
    more_if: str | None = None

    def statement(self) -> Any:
        """The key's row, joined with the key owner's job ``job_id`` (all NULL when there is
        no such job of theirs); no row at all for an unknown or revoked key."""
        job = self.table
        return (
            select(_KEYS.c.key_hash, *(job.c[name] for name in self.shown))
            .select_from(_KEYS.outerjoin(job, and_(
                job.c.id == bindparam("job_id", type_=job.c.id.type),
                owned_by(job.c, _KEYS.c.owner))))
            .where(_KEYS.c.prefix == bindparam("prefix"), _KEYS.c.revoked_at.is_(None))
        )


#: Per kind of job, by the first segment of its path (``evaluations``): what a poll reads.
Kinds = Mapping[str, Polled]

_RESULTS_OF = (
    select(_RESULTS.c.benchmark, _RESULTS.c.metric, _RESULTS.c.value, _RESULTS.c.params,
           _RESULTS.c.n)
    .where(_RESULTS.c.evaluation_id == bindparam("evaluation_id",
                                                 type_=_RESULTS.c.evaluation_id.type))
    .order_by(_RESULTS.c.id)
)


def autocommit(engine: Engine) -> Engine:
    """An engine on the same pool whose connections run each statement on its own."""
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def _owned(row: Any, key: str, job_id: uuid.UUID, kind: Polled) -> Any:
    """The row of the kind's statement, if the key is valid and the job its owner's: 401 for
    a key that is unknown or revoked, 404 for a job missing or someone else's."""
    if row is None or not key_matches(key, row.key_hash):
        raise Unauthorized("the API key is not valid")
    if row.id is None:
        raise NotFound(f"no {kind.name} {job_id}")
    return row


def _record(kind: Polled, row: Any, results: list[Any], more: list[Any]) -> bytes:
    """The job's record as the JSON bytes to send."""
    out = kind.render(row, results) if kind.more is None else kind.render(row, results, more)
    return out.model_dump_json().encode()


def _wants_more(kind: Polled, row: Any) -> bool:
    return kind.more is not None and kind.more_if is not None and getattr(row, kind.more_if) > 1


def record_json(engine: Engine, kind: Polled, key: str, job_id: uuid.UUID) -> bytes:
    """The record of the key owner's job, read through the engine (blocking)."""
    with engine.connect() as conn:
        row = conn.execute(kind.statement(), {"prefix": key_prefix(key),
                                              "job_id": job_id}).first()
        row = _owned(row, key, job_id, kind)
        results = (list(conn.execute(_RESULTS_OF, {"evaluation_id": job_id}).all())
                   if kind.with_results else [])
        more = (list(conn.execute(kind.more, {"job_id": job_id}).all())
                if kind.more is not None and _wants_more(kind, row) else [])
    return _record(kind, row, results, more)


class Records(Protocol):
    """What a poll reads: the record of the key owner's job as the JSON bytes to send."""

    kinds: Kinds

    async def json(self, kind: str, key: str, job_id: uuid.UUID) -> bytes: ...

    async def close(self) -> None: ...


class ThreadedRecords:
    """Polls through the engine, in a worker thread (any database)."""

    def __init__(self, engine: Engine, kinds: Kinds) -> None:
        self.engine = autocommit(engine)
        self.kinds = kinds

    async def json(self, kind: str, key: str, job_id: uuid.UUID) -> bytes:
        return await to_thread.run_sync(record_json, self.engine, self.kinds[kind], key,
                                        job_id)

    async def close(self) -> None:
        return None


class PostgresRecords:
    """Polls on PostgreSQL through psycopg's asyncio connections, on the event loop.

    At most ``size`` connections are in use at once (more polls wait their turn); a
    connection is kept for the next poll unless it broke or was left mid-statement. A poll
    that finds its kept connection dead (the server restarted, an idle connection was cut)
    is retried once on a new one; when none can be opened the poll is a 503."""

    def __init__(self, engine: Engine, kinds: Kinds, size: int,
                 connect_timeout: int = 5) -> None:
        self.kinds = kinds
        self.dsn = engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False)
        self.connect_timeout = connect_timeout
        dialect = engine.dialect
        self.sql = {name: str(statement.compile(dialect=dialect)) for name, statement in (
            *((name, kind.statement()) for name, kind in kinds.items()),
            *((f"{name}:more", kind.more) for name, kind in kinds.items()
              if kind.more is not None),
            ("results", _RESULTS_OF))}
        self.slots = asyncio.Semaphore(size)
        self.idle: list[psycopg.AsyncConnection[Any]] = []

    async def json(self, kind: str, key: str, job_id: uuid.UUID) -> bytes:
        async with self.slots:
            try:
                return await self._read(kind, key, job_id, reused=bool(self.idle))
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                log.warning("database unavailable: %s: %s", type(exc).__name__,
                            str(exc)[:300])
                raise Unavailable("the database is unavailable; retry shortly") from None

    async def _read(self, name: str, key: str, job_id: uuid.UUID, reused: bool) -> bytes:
        kind = self.kinds[name]
        try:
            async with self._connection() as conn:
                cur = await conn.execute(self.sql[name],
                                         {"prefix": key_prefix(key), "job_id": job_id})
                row = _owned(await cur.fetchone(), key, job_id, kind)
                results: list[Any] = []
                more: list[Any] = []
                if kind.with_results:
                    cur = await conn.execute(self.sql["results"], {"evaluation_id": job_id})
                    results = await cur.fetchall()
                if _wants_more(kind, row):
                    cur = await conn.execute(self.sql[f"{name}:more"], {"job_id": job_id})
                    more = await cur.fetchall()
        except (psycopg.OperationalError, psycopg.InterfaceError):
            if not reused:
                raise
            await self.close()  # kept connections die together (a restart): open anew
            return await self._read(name, key, job_id, reused=False)
        return _record(kind, row, results, more)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        conn = self.idle.pop() if self.idle else await psycopg.AsyncConnection.connect(
            self.dsn, autocommit=True, row_factory=namedtuple_row,
            connect_timeout=self.connect_timeout)
        try:
            yield conn
        finally:
            if conn.broken or conn.closed or (
                    conn.info.transaction_status != TransactionStatus.IDLE):
                await conn.close()
            else:
                self.idle.append(conn)

    async def close(self) -> None:
        """Closes the kept connections."""
        while self.idle:
            await self.idle.pop().close()


def records(engine: Engine, kinds: Kinds, connections: int) -> Records:
    """The polling reader of ``kinds`` for the engine's database (``connections``:
    PostgreSQL's most)."""
    if engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg":
        return PostgresRecords(engine, kinds, connections)
    return ThreadedRecords(engine, kinds)


async def answer(kind: str, records: Records, headers: Headers,
                 job_id: uuid.UUID) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of a poll: 200 with the record and its ``ETag``, or 304
    when ``If-None-Match`` names that tag."""
    key = bearer_key(headers)
    if key is None:
        raise Unauthorized("send 'Authorization: Bearer <api key>'")
    body = await records.json(kind, key, job_id)
    tag = etag(body)
    if not_modified(headers.get("if-none-match"), tag):
        return 304, [(b"etag", tag.encode())], b""
    return 200, [(b"content-length", str(len(body)).encode()),
                 (b"content-type", b"application/json"), (b"etag", tag.encode())], body


async def response(kind: str, request: Request, job_id: uuid.UUID) -> Response:
    """A poll answered through the framework (the forms of the path :func:`hot_route` does
    not take)."""
    status, headers, body = await answer(kind, request.app.state.records, request.headers,
                                         job_id)
    return Response(body, status_code=status,
                    headers={k.decode(): v.decode() for k, v in headers
                             if k != b"content-length"})


def from_browser(headers: Headers) -> bool:
    """A request without a key that carries a browser's session cookie: its route reads the
    record through the session (a link on a page), not through the key's poll."""
    return bearer_key(headers) is None and f"{COOKIE}=" in headers.get("cookie", "")


async def browser_record(request: Request,
                         read: Callable[[Session, str], BaseModel]) -> Response:
    """The record ``read(session, owner)`` returns, for the owner of the request's browser
    session (a 303 to the login page for a browser without a live one)."""
    session = request.app.state.sessionmaker()
    try:
        viewer = await current_viewer(request, session)
        if viewer.owner is None:
            raise viewer.refusal()
        owner = viewer.owner
        out = await to_thread.run_sync(lambda: read(session, owner))
    finally:
        await to_thread.run_sync(session.close)
    return Response(out.model_dump_json(), media_type="application/json")


def documented(errors: dict[int | str, dict[str, Any]]) -> dict[str, Any]:
    """The OpenAPI of a polled record's route, besides its model: the errors, its 304 and
    the ``If-None-Match`` header."""
    return {
        "responses": {**errors, 304: {"description": "Not modified: the record still has the "
                                                     "`ETag` sent in `If-None-Match` (no body)"}},
        "openapi_extra": {"security": [{"apiKey": []}], "parameters": [{
            "name": "If-None-Match", "in": "header", "required": False,
            "description": "the `ETag` of a record already held: answered 304 while it is "
                           "current",
            "schema": {"type": "string", "maxLength": 1000}}]}}


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
_PATH = re.compile(r"/([a-z]+)/([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
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
    records: Records = scope["app"].state.records
    if kind not in records.kinds or from_browser(Headers(raw=scope.get("headers", []))):
        return None

    async def serve(send: Send) -> None:
        status, headers, body = await answer(kind, records, Headers(scope=scope), job_id)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return serve
