"""Request-scoped dependencies: one transaction per request, the caller's owner, the outbox."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from core import sessions
from core.db import run_rollback_hooks
from core.errors import DomainError, NotFound, Unauthorized
from core.keys import KeyCache
from core.queue import Outbox
from core.repository import OwnedRow, is_owner
from core.sessions import LoginRequired
from core.settings import Settings
from service.http.guard import bearer_key


# Dependencies without I/O are ``async`` so FastAPI runs them on the event loop; a plain
# ``def`` would cost a thread hop per request each.
async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_outbox(request: Request) -> Outbox:
    return Outbox(request.app.state.celery)


async def get_session(
    request: Request, outbox: Annotated[Outbox, Depends(get_outbox)]
) -> AsyncIterator[Session]:
    """Commit when the endpoint returns, roll back if it raises; then flush the outbox.

    Function-scoped (below): this runs before the response is sent, so a client never holds
    a 201/202 for a row that is not committed yet, or that failed to commit.

    A session does no I/O until it is first used, so it is made here on the event loop; the
    commit (or rollback), the close and the outbox's sends take one thread hop together.
    """
    session: Session = request.app.state.sessionmaker()
    try:
        yield session
    except BaseException:
        if session.in_transaction():
            await run_in_threadpool(_abandon, session, outbox)
        else:  # never used: nothing to roll back on a connection
            _abandon(session, outbox)
        raise
    if session.in_transaction() or outbox.pending:
        await run_in_threadpool(_finish, session, outbox)
    else:
        session.close()


def _finish(session: Session, outbox: Outbox) -> None:
    try:
        session.commit()
    except BaseException:
        _abandon(session, outbox)
        raise
    session.close()
    outbox.flush()


def _abandon(session: Session, outbox: Outbox) -> None:
    try:
        session.rollback()
    finally:
        try:
            outbox.discard()
            run_rollback_hooks(session)
        finally:
            session.close()


SessionDep = Annotated[Session, Depends(get_session, scope="function")]
OutboxDep = Annotated[Outbox, Depends(get_outbox)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


_BEARER = HTTPBearer(
    auto_error=False, scheme_name="apiKey",
    description="An API key: `Authorization: Bearer rs_…` (`robustscope apikey create OWNER`, "
                "or the key `robustscope up` prints).")


async def current_owner(
    request: Request, session: SessionDep,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
) -> str:
    """The key's owner: verified by the request guard for a request with a body (before the
    body was read), else here, on the request's own connection (one thread hop). A read
    without a key may come from a browser's session cookie; without either, a browser asking
    for a page is sent to ``/login`` and any other client gets a 401."""
    owner: str | None = getattr(request.state, "owner", None)
    if owner is not None:
        return owner
    viewer = await current_viewer(request, session)
    if viewer.owner is None:
        raise viewer.refusal()
    return viewer.owner


@dataclass(frozen=True)
class Viewer:
    """Who reads a page: an owner (by key or session cookie), or nobody (``owner`` None)."""

    owner: str | None
    next_url: str  # the page asked for, to come back to after logging in
    wants_html: bool

    def refusal(self) -> DomainError:
        """What a request that needs an owner gets without one."""
        if self.wants_html:
            return LoginRequired(self.next_url)
        return Unauthorized("send 'Authorization: Bearer <api key>'")

    def may_read(self, row: OwnedRow | None, public: bool, what: str) -> None:
        """Pass if ``row`` (None: none was found) is public or the viewer's own; else ask an
        anonymous viewer to log in, and tell an owner it was not found (another owner's
        private row and a missing one are indistinguishable)."""
        if row is not None and (public or is_owner(row, self.owner)):
            return
        if self.owner is None:
            raise self.refusal()
        raise NotFound(f"no {what}")


async def current_viewer(
    request: Request, session: SessionDep,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)] = None,
) -> Viewer:
    """The reader of a page that may be public: a key (a wrong one is a 401), else a live
    session cookie (on ``GET``/``HEAD`` only: a cookie authorises no write), else nobody."""
    next_url = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    wants_html = (request.method in ("GET", "HEAD")
                  and "text/html" in request.headers.get("accept", ""))
    key = bearer_key(request.headers)
    if key is not None:
        cache: KeyCache = request.app.state.keys
        owner = cache.cached(key)
        if owner is None:
            owner = await run_in_threadpool(cache.verify, key, session)
        return Viewer(owner, next_url, wants_html)
    token = request.cookies.get(sessions.COOKIE)
    if token and request.method in ("GET", "HEAD"):
        owner = await run_in_threadpool(sessions.owner_of, session, token)
        return Viewer(owner, next_url, wants_html)
    return Viewer(None, next_url, wants_html)


CurrentOwner = Annotated[str, Depends(current_owner)]
CurrentViewer = Annotated[Viewer, Depends(current_viewer)]
