"""A job's progress as server-sent events (``GET /evaluations/{id}/events`` and its kin)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from fastapi import Request
from fastapi.sse import ServerSentEvent
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from contract.jobs import FINAL_STATES


class _Progress(Protocol):
    fraction: float
    stage: str
    message: str


class JobOut(Protocol):
    """What the progress stream reads of a job record (EvaluationOut, TrainingOut)."""

    @property
    def status(self) -> str: ...
    @property
    def progress(self) -> _Progress: ...
    def model_dump_json(self) -> str: ...


async def progress_events(request: Request, read: Callable[[Session], JobOut],
                          poll_seconds: float = 0.5) -> AsyncIterator[ServerSentEvent]:
    """Server-sent events for a job: ``progress`` (status, fraction, stage, message) whenever
    one of them changes, then ``end`` with the whole record at a final state; each event has
    an increasing ``id``. ``read`` loads the record; it runs in the thread pool, in a session of
    its own, every ``poll_seconds`` until the job ends or the client goes away. The route
    declares ``response_class=EventSourceResponse``, which adds keep-alive comments while
    nothing changes."""
    factory = request.app.state.sessionmaker

    def snapshot() -> JobOut:
        with factory() as s:
            return read(s)

    last = None
    seq = 0
    while True:
        out = await run_in_threadpool(snapshot)
        p = out.progress
        state = (out.status, p.fraction, p.stage, p.message)
        if state != last:
            last, seq = state, seq + 1
            data = json.dumps({"status": out.status, "fraction": p.fraction,
                               "stage": p.stage, "message": p.message})
            yield ServerSentEvent(event="progress", id=str(seq), raw_data=data)
        if out.status in FINAL_STATES:
            yield ServerSentEvent(event="end", id=str(seq + 1), raw_data=out.model_dump_json())
            return
        if await request.is_disconnected():
            return
        await asyncio.sleep(poll_seconds)
