"""Slow connections against the real ``robustscope api`` process: heads and bodies that trickle
are closed at their deadline, connections past the bound are refused at once, and a normal
request is answered meanwhile (service/http/connections.py)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest

from benchmarks.slow_connections import api_server, get_health, slow_clients
from core.settings import Settings
from service.http.connections import ConnectionLimits, H11Guarded, with_limits
from service.http.guard import Guard
from tests.service.servers import serve_asgi

pytestmark = pytest.mark.slow  # servers in subprocesses, seconds of deadlines

DEADLINE = 2.0
#: Scheduling on a shared 2-core machine: a deadline may be kept this much late.
SLACK = 1.5


@pytest.fixture(scope="module")
def api() -> Iterator[int]:
    with api_server({"API_HEADER_TIMEOUT": str(DEADLINE), "API_BODY_TIMEOUT": str(DEADLINE),
                     "API_BODY_MIN_RATE": "1024", "API_MAX_CONNECTIONS": "1000"}) as port:
        yield port


def test_slow_heads_and_bodies_are_closed_at_the_deadline(api: int) -> None:
    async def run() -> tuple[list, list[tuple[int, float]]]:
        attack = asyncio.create_task(slow_clients(
            api, {"head": 90, "body": 90, "idle": 20}, interval=0.25, hold=DEADLINE + 8))
        await asyncio.sleep(0.5)
        during = [await get_health(api)]
        return await attack, during

    held, during = asyncio.run(run())
    assert len(held) == 200
    assert [status for status, _ in during] == [200]
    late = [(h.kind, h.seconds) for h in held
            if h.seconds is None or h.seconds > DEADLINE + SLACK]
    assert late == []
    # No body was cut before its deadline: its clock starts once its head is read, after
    # the client's clock did.
    assert min(h.seconds or 0 for h in held if h.kind == "body") >= DEADLINE
    for h in held:
        if h.kind in ("head", "idle"):
            assert h.answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), h.answer[:80]
    # A trickled body is not an answer anyone waits for: the connection is just closed.
    assert all(h.answer == b"" for h in held if h.kind == "body")


def test_a_body_that_keeps_the_minimum_rate_is_not_cut(api: int) -> None:
    """3 s of body at ~4 KiB/s (over the 1 KiB/s minimum): the request completes, though it
    took longer than the body's 2 s grace."""
    body = (b'{"model_id": "00000000-0000-4000-8000-000000000000", "dataset": "shapes-32", '
            b'"suite": "standard"' + b" " * 12_000)
    body += b"}"
    with socket.create_connection(("127.0.0.1", api)) as s:
        s.sendall(b"POST /evaluations HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
                  b"authorization: Bearer rs_slowbench_0123456789abcdef\r\n"
                  b"content-type: application/json\r\n"
                  b"content-length: " + str(len(body)).encode() + b"\r\n\r\n")
        began = time.monotonic()
        for i in range(0, len(body), 1000):
            s.sendall(body[i:i + 1000])
            time.sleep(0.25)
        assert time.monotonic() - began > DEADLINE + 0.5
        answer = s.recv(200)
    # The request reached the application, which answered it (the model does not exist).
    assert answer.startswith(b"HTTP/1.1 404"), answer


def test_connections_past_the_bound_are_refused_at_once() -> None:
    with api_server({"API_HEADER_TIMEOUT": "60", "API_MAX_CONNECTIONS": "20"}) as port:
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        try:
            time.sleep(0.3)  # the server has accepted them all
            began = time.monotonic()
            with socket.create_connection(("127.0.0.1", port)) as extra:
                extra.settimeout(5)
                answer = extra.recv(200)
            assert time.monotonic() - began < 1.0
            assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer
        finally:
            for s in held:
                s.close()
        time.sleep(0.3)  # closed connections leave the count
        status, _ = asyncio.run(get_health(port))
        assert status == 200


def test_the_h11_protocol_keeps_the_same_deadlines(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """uvicorn falls back to h11 where httptools is missing: the same deadlines hold there."""
    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    settings = Settings(data_dir=tmp_path)
    guarded = Guard(app, settings, authenticate=lambda key: "someone")
    protocol = with_limits(H11Guarded, ConnectionLimits(header_timeout=DEADLINE,
                                                        body_timeout=DEADLINE))
    with serve_asgi(guarded, http=protocol) as port:
        held = asyncio.run(slow_clients(port, {"head": 10, "body": 10}, interval=0.25,
                                        hold=DEADLINE + 6))
    late = [(h.kind, h.seconds) for h in held
            if h.seconds is None or h.seconds > DEADLINE + SLACK]
    assert late == []
