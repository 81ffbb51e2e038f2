"""The record fields every job shows, whatever its kind."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from contract.jobs import JobStatus


class Progress(BaseModel):
    """How far a job has come."""

    fraction: float = Field(description="the share of the work done, 0 to 1")
    stage: str = Field(description="the step under way, e.g. `queued`, `loading`, `clean`")
    message: str = Field(description="a human-readable line about the step")


class ErrorOut(BaseModel):
    """Why a job failed: a problem type and its detail."""

    type: str = Field(description="the problem type, a short token (docs/API.md, Errors)")
    detail: str = Field(description="what went wrong, for a person")


class JobRecord(BaseModel):
    """A job's state, progress, times and where it ran; each kind adds its own fields."""

    id: uuid.UUID = Field(description="the job's id")
    status: JobStatus = Field(description="`queued`, `running`, `succeeded`, `failed` or "
                                          "`cancelled`")
    progress: Progress = Field(description="how far the job has come")
    created_at: datetime = Field(description="when the job was submitted (UTC)")
    started_at: datetime | None = Field(description="when a worker started it (UTC)")
    finished_at: datetime | None = Field(description="when it reached a final state (UTC)")
    attempts: int = Field(description="how many times a worker has started the job")
    device: str | None = Field(description="the device it ran on, e.g. `cpu`, `cuda:0`")
    worker: str | None = Field(None, description="the worker that ran (or runs) it: "
                               "`robustscope worker --name`, else host:pid")
    engine_version: str | None = Field(description="the version of the engine that ran it")
    error: ErrorOut | None = Field(description="why it failed; null unless `failed`")


def record_fields(row: Any) -> dict[str, Any]:
    """The :class:`JobRecord` fields of a job's row (an ORM row, or a Core row of the polling
    path with the job columns)."""
    return {
        "id": row.id, "status": row.status,
        "progress": Progress(fraction=row.progress_fraction, stage=row.progress_stage,
                             message=row.progress_message),
        "created_at": row.created_at, "started_at": row.started_at,
        "finished_at": row.finished_at, "attempts": row.attempts, "device": row.device,
        "worker": row.worker, "engine_version": row.engine_version,
        "error": ErrorOut(**row.error) if row.error else None,
    }


#: The job columns :func:`record_fields` reads (what a poll selects besides a kind's own).
RECORD_COLUMNS = ("id", "status", "progress_fraction", "progress_stage", "progress_message",
                  "created_at", "started_at", "finished_at", "attempts", "device", "worker",
                  "engine_version", "error")
