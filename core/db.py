"""Database engine and sessions, shared by the API and the workers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import DeclarativeBase, Session, SessionTransaction, sessionmaker

log = logging.getLogger("robustscope.db")


class Base(DeclarativeBase):
    pass


#: A pooled connection unused for longer than this is tested with a round trip before it is
#: handed out; one used more recently is trusted (see :func:`_ping_when_idle`).
IDLE_PING_SECONDS = 10.0


def make_engine(url: str, *, pool_size: int = 5, max_overflow: int = 10,
                **kwargs: Any) -> Engine:
    """The engine for ``url``. On a server database, ``pool_size`` connections are kept open
    (set it to the number of requests a process serves at once: past it, each extra
    connection is opened and closed per use, a new server process each time) and at most
    ``max_overflow`` more are opened under a burst."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets the API read while a worker writes; foreign keys are off by default.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    if "poolclass" not in kwargs:
        kwargs.update(pool_size=pool_size, max_overflow=max_overflow)
    engine = create_engine(url, **kwargs)
    _ping_when_idle(engine, IDLE_PING_SECONDS)
    return engine


def _ping_when_idle(engine: Engine, idle: float) -> None:
    """Pessimistic disconnect handling that costs nothing under load.

    ``pool_pre_ping`` pings on every checkout: a round trip to the server per request. Here
    only a connection that sat idle for ``idle`` seconds is pinged (the server may have
    restarted, or a firewall dropped it, while nobody looked); a dead one is replaced before
    anyone uses it. A connection used moments ago that fails anyway (the server went down
    in between) fails that one request, which the API answers 503; SQLAlchemy then
    invalidates every connection of the pool opened before the failure, so none of them is
    handed out again."""

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.pop("idle_since", None)
        if since is None or time.monotonic() - since < idle:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # the pool retries the checkout with a new connection
            raise DisconnectionError("a pooled connection went away while idle") from exc


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose :func:`on_rollback` undo steps run whenever their transaction rolls
    back, in the API and the workers alike."""
    factory = sessionmaker(engine, expire_on_commit=False)
    event.listen(factory, "after_soft_rollback", _rolled_back)
    event.listen(factory, "after_commit", _committed)
    return factory


def on_rollback(session: Session, undo: Callable[[], None]) -> None:
    """Run ``undo`` if the session's transaction rolls back (e.g. delete a file stored for a
    row that is then never committed); forgotten when it commits."""
    session.info.setdefault("on_rollback", []).append(undo)


def run_rollback_hooks(session: Session) -> None:
    """The undo steps of a transaction that ended without a commit, each once."""
    for undo in session.info.pop("on_rollback", []):
        try:
            undo()
        except Exception:  # one failed clean-up must not hide the error being handled
            log.warning("an undo step failed after a rollback", exc_info=True)


def _rolled_back(session: Session, previous: SessionTransaction) -> None:
    if previous.parent is None:  # the outermost transaction, not a savepoint
        run_rollback_hooks(session)


def _committed(session: Session) -> None:
    session.info.pop("on_rollback", None)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work commits on success and rolls back on any error."""
    with factory() as session, session.begin():
        yield session
