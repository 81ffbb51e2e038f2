"""What every job (an evaluation, a training, a dataset's ingest) shares with its clients and
with the engine: the states it goes through and the types of error it can end with.

The API, the workers and the jailed engine child all name states and errors through these
enums; nothing else spells them.
"""

from __future__ import annotations

import enum


class JobStatus(enum.StrEnum):
    """A job's state: ``queued`` -> ``running`` -> one of the final three."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class DatasetStatus(enum.StrEnum):
    """An uploaded dataset's state: ``ingesting`` (its ingest job is queued or running) ->
    ``ready`` or ``failed``, written with the ingest job's outcome. Built-in datasets are
    always ``ready``."""

    INGESTING = "ingesting"
    READY = "ready"
    FAILED = "failed"


#: The states a job never leaves.
FINAL_STATES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
#: The states that hold a worker or wait for one (the active-jobs quota counts them).
ACTIVE_STATES = (JobStatus.QUEUED, JobStatus.RUNNING)


class JobErrorType(enum.StrEnum):
    """Why a job failed: the ``error.type`` of its record (docs/API.md, "Errors")."""

    OUT_OF_MEMORY = "out-of-memory"
    CHECKPOINT_ERROR = "checkpoint-error"
    BENCHMARK_ERROR = "benchmark-error"
    DATASET_ERROR = "dataset-error"
    TRAINING_ERROR = "training-error"
    MODEL_CRASHED = "model-crashed"
    SANDBOX_ERROR = "sandbox-error"
    TIME_LIMIT = "time-limit"
    DISK_QUOTA = "disk-quota"
    WORKER_LOST = "worker-lost"
    STORAGE_ERROR = "storage-error"


#: The errors a model (rather than the service) causes: the model server reports them as the
#: model's, and the engine child passes them on unchanged.
MODEL_ERRORS = (JobErrorType.MODEL_CRASHED, JobErrorType.OUT_OF_MEMORY,
                JobErrorType.CHECKPOINT_ERROR)


#: The longest detail a job's error keeps.
DETAIL_LIMIT = 500


def job_error(type_: JobErrorType, detail: str) -> dict[str, str]:
    """The one way a job's error is made: a known type, the detail cut to its limit."""
    return {"type": JobErrorType(type_).value, "detail": detail[:DETAIL_LIMIT]}
