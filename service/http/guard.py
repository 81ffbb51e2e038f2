"""The request guard: the first code a request meets, as plain ASGI.

- A request that carries a body (POST, PUT, PATCH, DELETE) must hold a valid key before one
  byte of its body is read, so an unauthenticated upload costs nothing (no spooling, no
  parsing). A session cookie never stands in for the key: it authorises no write. The only
  exceptions are the small browser forms of ``FORM_POSTS`` (log in, log out, share a report),
  which carry the key in the form itself or change nothing but the session.
- Body size limits are enforced on the bytes as they arrive, chunked bodies included: an
  upload route may take its upload limit, any other body ``max_json_bytes``.
- Strings with a NUL character are refused in query strings and JSON bodies, naming the field;
  JSON bodies nested deeper than ``MAX_JSON_DEPTH`` are refused (422) before any parser recurses.
- Writes with a JSON body are processed at most ``api_write_concurrency`` at a time per
  process, once their body is read, and each of these write slots is busy at most
  ``api_write_share`` of the time: the rest wait (no CPU), so a flood of submissions
  cannot starve the polling reads of the event loop, the GIL and the cores.
- The hottest reads (``hot_routes``: polling a job) are served here as plain ASGI, past the
  framework's routing, dependency solving and request objects, which cost more CPU than the
  read itself; the framework's route for the same path documents it.
- Any exception that escapes the application becomes one problem+json answer (503 for a
  database that cannot be reached, else 500), and is never re-raised into the server, so the
  connection is kept alive.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl

from anyio import to_thread
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core import errors
from core.settings import Settings
from service.http import problems
from service.http.validation import MAX_JSON_DEPTH, find_nul, loads, may_be_deep

log = logging.getLogger("robustscope.api")

BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Browser forms that carry their own credential (the API key typed into the form) or none
#: (logging out ends only the session its cookie names): posted without a bearer key.
FORM_POSTS = frozenset({"/login", "/logout", "/share-links/form"})
#: A multipart body holds its form fields and boundaries besides the file.
MULTIPART_SLACK = 1 << 20


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a body passes its limit; an HTTPException so that the
    framework's body parsing passes it on instead of calling it a parse error."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the body is larger than the limit of {limit} bytes")
        self.limit = limit


def bearer_key(headers: Headers) -> str | None:
    scheme, _, key = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return key.strip()


#: Given a request's scope, the handler that serves it (sending the response), or None.
HotRoute = Callable[[Scope], Callable[[Send], Awaitable[None]] | None]


class Guard:
    def __init__(self, app: ASGIApp, settings: Settings,
                 authenticate: Callable[[str], str], hot_routes: Sequence[HotRoute] = ()) -> None:
        self.app = app
        self.settings = settings
        self.authenticate = authenticate
        self.hot_routes = tuple(hot_routes)
        self._semaphore: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None

    def _writes(self) -> asyncio.Semaphore | None:
        """The running loop's write semaphore (an app may be served by more than one loop
        in its life, e.g. by successive test clients)."""
        if self.settings.api_write_concurrency <= 0:
            return None
        loop = asyncio.get_running_loop()
        if self._semaphore is None or self._semaphore[0] is not loop:
            self._semaphore = (loop, asyncio.Semaphore(self.settings.api_write_concurrency))
        return self._semaphore[1]

    def body_limit(self, path: str, method: str) -> int:
        s = self.settings
        if method == "POST" and path in ("/models", "/evaluations"):
            return s.max_checkpoint_bytes + MULTIPART_SLACK
        if method == "POST" and path == "/datasets":
            return s.max_dataset_bytes + MULTIPART_SLACK
        return s.max_json_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            receive, json_write = await self._admit(scope, receive)
            writes = self._writes() if json_write else None
            hot = None if json_write else self._hot(scope)
            if hot is not None:
                await hot(tracked_send)
            elif writes is not None:
                await self._write(writes, scope, receive, tracked_send)
            else:
                await self.app(scope, receive, tracked_send)
        except ClientDisconnect:
            return  # the client is gone (or its connection was closed at a deadline)
        except Exception as exc:  # the one place an escaped error is answered
            response = self._answer(scope, exc)
            if started:
                log.error("error after the response started on %s %s: %r",
                          scope["method"], scope["path"], exc)
                return
            await response(scope, receive, send)

    async def _write(self, writes: asyncio.Semaphore, scope: Scope, receive: Receive,
                     send: Send) -> None:
        """One write in one of the process's write slots. A slot that served a write taking
        ``t`` seconds stays closed ``t * (1 / share - 1)`` seconds more, so that writes keep to
        their share of the process's time however many are waiting. The write's own answer
        is not held back: the slot reopens on a timer."""
        await writes.acquire()
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            await self.app(scope, receive, send)
        finally:
            share = self.settings.api_write_share
            rest = (loop.time() - began) * (1 / share - 1)
            if rest > 0:
                loop.call_later(rest, writes.release)
            else:
                writes.release()

    def _hot(self, scope: Scope) -> Callable[[Send], Awaitable[None]] | None:
        for route in self.hot_routes:
            handler = route(scope)
            if handler is not None:
                return handler
        return None

    def _answer(self, scope: Scope, exc: Exception) -> Any:
        if isinstance(exc, errors.DomainError):
            return problems.render(exc)
        if isinstance(exc, BodyTooLarge):
            return problems.problem(413, "payload-too-large", "Upload too large", exc.detail,
                                  limit=exc.limit)
        if isinstance(exc, RecursionError):
            # Data nested past what a parser could hold, where no depth check ran first (e.g.
            # JSON inside an uploaded file): the client's input, not a server fault.
            log.warning("%s %s: input nested too deeply", scope["method"], scope["path"],
                        exc_info=exc)
            return problems.problem(
                422, "invalid", "Invalid request",
                f"the request holds data nested too deeply to process (JSON may nest at most "
                f"{MAX_JSON_DEPTH} levels)", limit=MAX_JSON_DEPTH)
        if isinstance(exc, OperationalError | InterfaceError | SATimeoutError) or (
                isinstance(exc, DBAPIError) and exc.connection_invalidated):
            return problems.database_down(exc)
        log.error("unhandled error on %s %s", scope["method"], scope["path"], exc_info=exc)
        return problems.unexpected(exc)

    async def _admit(self, scope: Scope, receive: Receive) -> tuple[Receive, bool]:
        """Checks what can be checked before the body is read; returns the receive to use,
        and whether the request is a write whose JSON body has been read (and is replayed)."""
        query = scope.get("query_string", b"")
        if b"%00" in query or b"\x00" in query:
            for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
                if "\x00" in name or "\x00" in value:
                    raise errors.Invalid(f"query parameter {name.strip(chr(0))!r} contains a "
                                         "NUL character", field=name.strip("\x00"))
        method = scope["method"]
        if method not in BODY_METHODS:
            return receive, False
        headers = Headers(scope=scope)
        key = bearer_key(headers)
        if key is None and method == "POST" and scope["path"] in FORM_POSTS:
            return _limited(receive, self.settings.max_json_bytes), False
        if key is None:
            raise errors.Unauthorized("send 'Authorization: Bearer <api key>'")
        owner = await to_thread.run_sync(self.authenticate, key)
        scope.setdefault("state", {})["owner"] = owner
        limit = self.body_limit(scope["path"], method)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise BodyTooLarge(limit)
        limited = _limited(receive, limit)
        ctype = headers.get("content-type", "").split(";")[0].strip()
        if not ctype or ctype.endswith("json"):  # the framework reads a body with no type as JSON
            return await _checked_json(limited), True
        return limited, False


def _limited(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
        return message

    return wrapped


async def _checked_json(receive: Receive) -> Receive:
    """Reads a JSON body (already bounded), refuses NULs in its strings and nesting past
    ``MAX_JSON_DEPTH``, and replays it."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    nul = b"\\u0000" in body
    if nul or may_be_deep(body):
        try:
            value = loads(body)  # Invalid past the depth limit
        except ValueError:
            return _replay(body, receive)  # malformed JSON: the framework answers it
        where = find_nul(value) if nul else None
        if where is not None:
            raise errors.Invalid(f"{where} contains a NUL character", field=where)
    return _replay(body, receive)


def _replay(body: bytes, receive: Receive) -> Receive:
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay

