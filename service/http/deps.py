"""Request-scoped dependencies: one transaction per request, the caller's owner, the outbox."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from core.errors import Unauthorized
from core.keys import KeyCache
from core.queue import Outbox
from core.settings import Settings
from core.storage import run_rollback_hooks
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
    body was read), else here, on the request's own connection (one thread hop)."""
    owner: str | None = getattr(request.state, "owner", None)
    if owner is not None:
        return owner
    key = bearer_key(request.headers)
    if key is None:
        raise Unauthorized("send 'Authorization: Bearer <api key>'")
    cache: KeyCache = request.app.state.keys
    cached = cache.cached(key)
    if cached is not None:
        return cached
    verified: str = await run_in_threadpool(cache.verify, key, session)
    return verified


CurrentOwner = Annotated[str, Depends(current_owner)]
