"""The job model: what every kind of job (an evaluation, a training, a sweep of trainings) does
the same way in the API. One idempotent create, one cooperative cancel."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from contract.jobs import FINAL_STATES, JobStatus
from core.errors import Conflict
from core.queue import Outbox
from core.repository import owned_rows
from core.tables import Evaluation, EvaluationShard, JobColumns, Sweep, Training, utcnow

#: A request that may be repeated under an ``Idempotency-Key``: a job, or a sweep of jobs.
Created = TypeVar("Created", Evaluation, Training, Sweep)


def request_hash(body: BaseModel) -> str:
    return hashlib.sha256(body.model_dump_json().encode()).hexdigest()


def replay(session: Session, table: type[Created], owner: str, idempotency_key: str | None,
           digest: str) -> Created | None:
    """The row an earlier request with this Idempotency-Key created, if any; 409 when that
    request had another body."""
    if not idempotency_key:
        return None
    existing = session.scalar(owned_rows(table, owner)
                              .where(table.idempotency_key == idempotency_key))
    if existing is not None and existing.request_hash != digest:
        raise Conflict("this Idempotency-Key was used with a different request",
                       reason="idempotency-key-reused")
    return existing


def create(session: Session, outbox: Outbox, table: type[Created], owner: str, body: BaseModel,
           idempotency_key: str | None, build: Callable[[], Created],
           task: str | None = None) -> tuple[Created, bool]:
    """The one idempotent create: the row an earlier request with this Idempotency-Key made
    (``False``), or the row ``build`` makes from the validated request, stored and, for a job,
    queued (``task``, sent after commit) (``True``). Two concurrent requests with one key: the
    loser gets a 409 to retry, which then replays the winner's row."""
    digest = request_hash(body)
    existing = replay(session, table, owner, idempotency_key, digest)
    if existing is not None:
        return existing, False
    row = build()
    row.owner, row.idempotency_key, row.request_hash = owner, idempotency_key, digest
    if isinstance(row, JobColumns):
        row.status = row.progress_stage = JobStatus.QUEUED.value
        row.progress_message, row.enqueued_at = "waiting for a worker", utcnow()
    session.add(row)
    try:
        session.flush()
    except IntegrityError as exc:  # a concurrent retry with the same key won the race
        raise Conflict("a request with this Idempotency-Key is being processed; retry",
                       reason="idempotency-key-race") from exc
    if task is not None:
        outbox.add(task, str(row.id))
    return row, True


def request_cancel(row: Evaluation | Training | EvaluationShard, what: str) -> None:
    """A queued job is cancelled at once; a running one is asked to stop (its worker reads the
    flag between batches); a finished one is a 409."""
    if row.status in FINAL_STATES:
        raise Conflict(f"{what} {row.id} already {row.status}")
    if row.status == JobStatus.QUEUED:
        row.status, row.finished_at = JobStatus.CANCELLED.value, utcnow()
        row.progress_stage = JobStatus.CANCELLED.value
        row.progress_message = "cancelled before it started"
    else:
        row.cancel_requested = True
        row.progress_message = "cancellation requested; stopping after the current batch"
