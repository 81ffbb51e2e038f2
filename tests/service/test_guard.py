"""The guard's write slots: how many writes one process runs at once, and their share of time."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from core.settings import Settings
from service.http.guard import Guard

WRITE_SECONDS = 0.05


def _guarded(tmp_path: Path, concurrency: int, share: float,
             log: list[tuple[str, float]]) -> Guard:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        log.append(("start", time.monotonic()))
        await asyncio.sleep(WRITE_SECONDS)
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})
        log.append(("end", time.monotonic()))

    settings = Settings(data_dir=tmp_path, api_write_concurrency=concurrency,
                        api_write_share=share)
    return Guard(app, settings=settings, authenticate=lambda key: "owner")


async def _post_at_once(guard: Guard, n: int) -> list[float]:
    """``n`` writes sent together; when each was answered (``time.monotonic()``)."""
    transport = httpx.ASGITransport(app=guard)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

        async def one() -> float:
            resp = await client.post("/evaluations", json={"x": 1},
                                     headers={"Authorization": "Bearer k"})
            assert resp.status_code == 202
            return time.monotonic()

        return list(await asyncio.gather(*(one() for _ in range(n))))


@pytest.mark.parametrize(("concurrency", "share", "gap"), [
    (1, 1.0, 1.0),   # one at a time, back to back
    (1, 0.5, 2.0),   # one at a time, each slot busy half the time: a pause as long as the write
    (1, 0.25, 4.0),  # a quarter: three times as long
])
def test_write_slots_keep_writes_to_their_share_of_the_time(
        tmp_path: Path, concurrency: int, share: float, gap: float) -> None:
    log: list[tuple[str, float]] = []
    answered = asyncio.run(_post_at_once(_guarded(tmp_path, concurrency, share, log), 3))
    starts = [t for kind, t in log if kind == "start"]
    ends = [t for kind, t in log if kind == "end"]
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert len(gaps) == 2
    for g, start, end in zip(gaps, starts, ends, strict=False):
        # The slot stays closed in proportion to how long the write really took (a busy
        # machine stretches the 50 ms sleep), so the bounds follow the write's own time.
        took = end - start
        assert gap * WRITE_SECONDS * 0.9 <= g, gaps
        assert took * gap * 0.9 <= g <= took * gap + 0.1, (gaps, took)
    if gap > 1:  # the slot pauses after each write; the write's answer does not wait for it
        pause = (gap - 1) * (ends[0] - starts[0])
        assert min(answered) < ends[0] + pause / 2, (answered, ends, pause)


def test_two_slots_run_two_writes_at_once(tmp_path: Path) -> None:
    log: list[tuple[str, float]] = []
    asyncio.run(_post_at_once(_guarded(tmp_path, 2, 1.0, log), 2))
    starts = [t for kind, t in log if kind == "start"]
    assert abs(starts[1] - starts[0]) < WRITE_SECONDS / 2
