"""Deadlines and a bound for the API server's connections, below ASGI (uvicorn's protocol).

The request guard (``service.http.guard``) runs once a request's head has been read; a client that
never finishes its head, or sends its body a byte at a time, never reaches it. This protocol
(uvicorn's own, httptools or h11, with three additions) bounds them where the bytes arrive:

- **head**: a request's head (request line and headers) must be complete within
  ``api_header_timeout`` seconds of the connection opening, or of the first byte of a next
  request on a kept-alive connection; else 408 and the connection is closed. (An idle kept-alive
  connection is closed by uvicorn's keep-alive timeout.)
- **body**: a body is given ``api_body_timeout`` seconds, plus one second per
  ``api_body_min_rate`` bytes received, so an upload at least that fast never ends while a
  trickle is closed after about ``api_body_timeout``. While the server itself has stopped
  reading (the application has not taken the bytes yet), the body's clock starts again.
- **bound**: past ``api_max_connections`` open connections in one process, a new connection
  is answered 503 at once, without reading its request, and closed (at the latest
  ``REFUSAL_LINGER`` seconds later), instead of being held.

The processing of a request once its body is read has no deadline here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.h11_impl import H11Protocol

from core.errors import problem_body

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is a dependency; h11 is uvicorn's fallback
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

log = logging.getLogger("robustscope.api")


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    body_min_rate: float = 1024.0  # bytes per second
    max_connections: int = 1000  # per process; 0: no bound

    @classmethod
    def from_settings(cls) -> ConnectionLimits:
        from core.settings import get_settings

        s = get_settings()
        return cls(header_timeout=s.api_header_timeout, body_timeout=s.api_body_timeout,
                   body_min_rate=s.api_body_min_rate, max_connections=s.api_max_connections)


def _response(status: int, reason: str, type_: str, detail: str) -> bytes:
    """A whole problem+json answer that closes the connection, written before any request."""
    body = json.dumps(problem_body(status, type_, reason, detail)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/problem+json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


REQUEST_TIMEOUT = _response(408, "Request Timeout", "request-timeout",
                            "the request head did not arrive within the deadline")
TOO_MANY = _response(503, "Service Unavailable", "unavailable",
                     "this server holds as many connections as it takes; retry shortly")
#: Seconds between two log lines about refused connections.
LOG_EVERY = 10.0
#: Seconds a refused connection is kept for its client to read the 503 and close.
REFUSAL_LINGER = 0.5


class _Deadlines:
    """Mixed into a uvicorn HTTP protocol class (which provides ``transport``, ``cycle``,
    ``connections``, ``flow``, ``loop``)."""

    limits: ClassVar[ConnectionLimits | None] = None  # None: from the settings, once
    _refused: ClassVar[int] = 0
    _logged_at: ClassVar[float] = 0.0

    transport: asyncio.Transport
    connections: set[Any]
    loop: asyncio.AbstractEventLoop
    cycle: Any
    flow: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cls = type(self)
        if cls.limits is None:
            cls.limits = ConnectionLimits.from_settings()
        self._limits: ConnectionLimits = cls.limits
        self._timer: asyncio.TimerHandle | None = None
        self._phase: str | None = None  # "head", "body" or None
        self._seen: Any = None  # the request cycle last looked at
        self._body_start = 0.0
        self._body_bytes = 0
        self._refusing = False

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        bound = self._limits.max_connections
        if bound and len(self.connections) > bound:
            self._refuse()
            return
        self._arm_head()

    def data_received(self, data: bytes) -> None:
        if self._refusing:
            return  # answered 503 already; what it sends is not read
        self._track()
        if self._phase is None and (self.cycle is None or self.cycle.response_complete):
            self._arm_head()  # the first bytes of a next request
        counted = self._phase == "body"
        super().data_received(data)  # type: ignore[misc]
        if counted:
            self._body_bytes += len(data)
        self._track()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    # -- deadlines --------------------------------------------------------------------------

    def _track(self) -> None:
        """Moves to the body phase when a new request's head has been read (in this data or
        from data the protocol held back), and out of it once the body is complete."""
        cycle = self.cycle
        if cycle is not self._seen:
            self._seen = cycle
            if cycle is not None and cycle.more_body and not cycle.response_complete:
                self._arm_body()
            else:
                self._disarm()
        elif self._phase == "body" and (cycle is None or not cycle.more_body):
            self._disarm()

    def _arm_head(self) -> None:
        self._disarm()
        if self._limits.header_timeout > 0:
            self._phase = "head"
            self._timer = self.loop.call_later(self._limits.header_timeout, self._head_expired)

    def _arm_body(self) -> None:
        self._disarm()
        if self._limits.body_timeout > 0:
            self._phase = "body"
            self._body_start = self.loop.time()
            self._body_bytes = 0
            self._timer = self.loop.call_at(self._body_due(), self._body_check)

    def _body_due(self) -> float:
        rate = self._limits.body_min_rate  # 0: the whole body within body_timeout
        return (self._body_start + self._limits.body_timeout
                + (self._body_bytes / rate if rate > 0 else 0.0))

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = None

    def _head_expired(self) -> None:
        self._timer = None
        self._phase = None
        if not self.transport.is_closing():
            self.transport.write(REQUEST_TIMEOUT)
            self._close()

    def _body_check(self) -> None:
        self._timer = None
        now = self.loop.time()
        if self.flow is not None and self.flow.read_paused:
            # The server is not reading: the client is not late. The clock starts again.
            self._body_start, self._body_bytes = now, 0
        due = self._body_due()
        if due > now:
            self._timer = self.loop.call_at(due, self._body_check)
            return
        self._phase = None
        log.info("closing a connection whose request body came slower than %s bytes/s",
                 self._limits.body_min_rate)
        self._close()

    def _close(self) -> None:
        if self.transport.get_write_buffer_size():
            self.transport.abort()  # a client that does not read its answer is not waited for
        else:
            self.transport.close()

    def _refuse(self) -> None:
        cls = type(self)
        cls._refused += 1
        now = time.monotonic()
        if now - cls._logged_at >= LOG_EVERY:
            log.warning("refused %d connection(s): %d open, the bound is %d "
                        "(ROBUSTSCOPE_API_MAX_CONNECTIONS)", cls._refused,
                        len(self.connections) - 1, self._limits.max_connections)
            cls._refused, cls._logged_at = 0, now
        # The answer, then our end closed for writing; the client reads the 503 and closes. A
        # close right away would reset the connection once the client's request arrives, and
        # the client could lose the answer. One that does not close is cut at the linger.
        self._refusing = True
        self.transport.write(TOO_MANY)
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._timer = self.loop.call_later(REFUSAL_LINGER, self.transport.abort)
        else:
            self._close()


class H11Guarded(_Deadlines, H11Protocol):
    """uvicorn's h11 protocol with deadlines and a connection bound."""


if HttpToolsProtocol is not None:
    class HttpToolsGuarded(_Deadlines, HttpToolsProtocol):
        """uvicorn's httptools protocol with deadlines and a connection bound."""

    #: The protocol ``robustscope api`` and ``robustscope up`` serve with.
    GuardedHTTP: type[asyncio.Protocol] = HttpToolsGuarded
else:  # pragma: no cover
    GuardedHTTP = H11Guarded


def with_limits(base: type[asyncio.Protocol], limits: ConnectionLimits) -> type[asyncio.Protocol]:
    """``base`` (one of the classes above) with these limits instead of the settings' (tests,
    and servers in one process)."""
    return type(base.__name__, (base,), {"limits": limits})
