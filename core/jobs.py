"""What evaluation and training jobs share in the API: idempotent creation, the cooperative
cancel."""

from __future__ import annotations

import hashlib
from typing import TypeVar

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import Conflict
from core.tables import FINAL_STATES, Evaluation, EvaluationShard, Sweep, Training, utcnow


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
