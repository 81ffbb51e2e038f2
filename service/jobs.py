"""What evaluation and training jobs share in the API: the cooperative cancel."""

from __future__ import annotations

from service.errors import Conflict
from service.tables import FINAL_STATES, Evaluation, Training, utcnow


def request_cancel(row: Evaluation | Training, what: str) -> None:
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
