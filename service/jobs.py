"""What evaluation and training jobs share in the API: idempotent creation, the cooperative
cancel, and the server-sent progress stream."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Protocol, TypeVar

from fastapi import Request
from fastapi.sse import ServerSentEvent
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.errors import Conflict
from service.tables import FINAL_STATES, Evaluation, EvaluationShard, Sweep, Training, utcnow


def request_cancel(row: Evaluation | Training | EvaluationShard, what: str) -> None:
    """A queued job is cancelled at once; a running one is asked to stop (its worker reads the
    flag between batches); a finished one is a 409."""
    if row.status in FINAL_STATES:
        raise Conflict(f"{what} {row.id} already {row.status}")
    if row.status == "queued":
        row.status, row.finished_at = "cancelled", utcnow()
        row.progress_stage, row.progress_message = "cancelled", "cancelled before it started"
    else:
        row.cancel_requested = True
        row.progress_message = "cancellation requested; stopping after the current batch"


def request_hash(body: BaseModel) -> str:
    return hashlib.sha256(body.model_dump_json().encode()).hexdigest()


J = TypeVar("J", Evaluation, Training, Sweep)


def replay(session: Session, table: type[J], owner: str, idempotency_key: str | None,
           digest: str) -> J | None:
    """The job an earlier request with this Idempotency-Key created, if any; 409 when that
    request had another body."""
    if not idempotency_key:
        return None
    existing = session.scalar(select(table).where(
        table.owner == owner, table.idempotency_key == idempotency_key))
    if existing is not None and existing.request_hash != digest:
        raise Conflict("this Idempotency-Key was used with a different request",
                       reason="idempotency-key-reused")
    return existing


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
