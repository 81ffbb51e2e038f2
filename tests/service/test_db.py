"""The connection pool: connections kept open under load, and replaced when they died idle."""

from __future__ import annotations

import time

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from core import db


def _backend_pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _terminate(admin_url: str, pid: int) -> None:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    time.sleep(0.2)


def test_a_connection_reused_at_once_is_not_pinged(pg_url: str, pg_admin: str) -> None:
    """Under load a pooled connection is handed out as it is: no round trip per request. One
    that died in between fails its request (the API answers 503), and the pool then opens a
    new one."""
    engine = db.make_engine(pg_url, pool_size=1)
    try:
        pid = _backend_pid(engine)
        assert _backend_pid(engine) == pid  # the same connection, kept open
        _terminate(pg_admin, pid)
        with pytest.raises(OperationalError):
            _backend_pid(engine)
        assert _backend_pid(engine) not in (pid, 0)
    finally:
        engine.dispose()


def test_a_connection_that_died_while_idle_is_replaced_before_use(
        pg_url: str, pg_admin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(db, "IDLE_PING_SECONDS", 0.05)
    engine = db.make_engine(pg_url, pool_size=1)
    try:
        pid = _backend_pid(engine)
        _terminate(pg_admin, pid)  # sleeps past the idle time
        assert _backend_pid(engine) not in (pid, 0)  # pinged, found dead, replaced: no error
    finally:
        engine.dispose()


def test_the_pool_keeps_its_size_open(pg_url: str) -> None:
    """Connections up to ``pool_size`` stay open between uses: a process serving that many
    requests at once opens no connection per request."""
    engine = db.make_engine(pg_url, pool_size=3, max_overflow=2)
    try:
        held = [engine.connect() for _ in range(3)]
        pids = {int(c.execute(text("SELECT pg_backend_pid()")).scalar_one()) for c in held}
        for conn in held:
            conn.close()
        again = [engine.connect() for _ in range(3)]
        assert {int(c.execute(text("SELECT pg_backend_pid()")).scalar_one())
                for c in again} == pids
        for conn in again:
            conn.close()
    finally:
        engine.dispose()


def test_polls_on_postgresql_use_at_most_their_connections(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many polls at once on one process share ``DB_POLL_CONNECTIONS`` connections: the rest
    wait their turn, each gets its answer, and the connections are kept for the next polls."""
    import asyncio
    import uuid
    from typing import Any

    from core.errors import NotFound
    from core.keys import create_key
    from service.app import POLLED
    from service.http.polling import PostgresRecords

    engine = db.make_engine(pg_url)
    with db.transaction(db.make_sessionmaker(engine)) as s:
        key = create_key(s, f"polls-{uuid.uuid4().hex[:8]}")
    reader = PostgresRecords(engine, POLLED, size=2)
    opened: list[object] = []
    connect = psycopg.AsyncConnection.connect

    async def counted(*args: Any, **kwargs: Any) -> Any:
        conn = await connect(*args, **kwargs)
        opened.append(conn)
        return conn

    monkeypatch.setattr(psycopg.AsyncConnection, "connect", counted)

    async def run() -> tuple[list[BaseException | bytes], int]:
        answers = await asyncio.gather(
            *(reader.json("trainings", key, uuid.uuid4()) for _ in range(20)),
            return_exceptions=True)
        kept = len(reader.idle)
        await reader.close()
        return answers, kept

    answers, kept = asyncio.run(run())
    engine.dispose()
    assert [type(a) for a in answers] == [NotFound] * 20
    assert (len(opened), kept) == (2, 2)
