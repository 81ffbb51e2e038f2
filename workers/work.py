"""What one kind of job gives the job loop (:class:`Work`, or :class:`LocalWork` for work that
runs in the worker's process), and what its work uses: the typed
failures, where the child's files are (:class:`Scratch`), its inputs from the store, its
outputs into the store.

Evaluations, trainings, shards and dataset ingests are one job concept; each kind's module
(``workers/*_jobs.py``, ``workers/ingest.py``) builds its work for :func:`workers.jobs.run_work`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from sqlalchemy.orm import Session

from contract.jobs import JobErrorType, job_error
from core.objectstore import StoreError, file_sha256
from core.tables import Dataset, DatasetIngest, Evaluation, EvaluationShard, JobTable, Training
from workers.engine.types import Cancelled
from workers.runtime import Runtime
from workers.sandbox import files
from workers.sandbox.protocol import EvaluateJob, TrainJob


class Superseded(Cancelled):
    """Another worker owns this job now; stop without writing anything."""


class TimeLimit(Exception):
    pass


class JobFailed(Exception):
    """The job failed with a typed error for the user (``{"type", "detail"}``, or a dataset
    ingest's problem body)."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error["detail"])
        self.error = error



def sandbox_error(detail: str) -> dict[str, str]:
    """The jail or the supervisor failed (not the user's model): bubblewrap could not start
    the child, the child broke the report protocol, a file from the jail was refused."""
    return job_error(JobErrorType.SANDBOX_ERROR, detail)


class Sender:
    """An outbox's sender from a worker's ``send_task`` (None: send nothing, as in tests)."""

    def __init__(self, send_task: Any) -> None:
        self._send = send_task

    def send_task(self, name: str, args: list[Any]) -> Any:
        if self._send is None:
            return None
        return self._send(name, args=args)


def storage_error(exc: StoreError) -> dict[str, str]:
    """The store (core/objectstore.py) failed or holds a file that is not what was stored."""
    return job_error(JobErrorType.STORAGE_ERROR, str(exc))


@dataclass(frozen=True)
class StoredFile:
    """A checkpoint or dataset in the store: its key and the SHA-256 it was stored with."""

    key: str
    sha256: str | None

    @classmethod
    def of_dataset(cls, s: Session, dataset_id: uuid.UUID | None, missing: JobErrorType,
                   job: str) -> StoredFile | None:
        """The uploaded dataset a job reads (None: a built-in, generated where it runs); one
        deleted since the job was queued fails the ``job`` as ``missing``."""
        if dataset_id is None:
            return None
        ds = s.get(Dataset, dataset_id)
        if ds is None:
            raise JobFailed(job_error(missing, f"the dataset of this {job} was deleted"))
        return cls(ds.storage_path, (ds.info or {}).get("content_sha256"))


#: The row of one kind of job.
Claimed = TypeVar("Claimed", Evaluation, Training, EvaluationShard, DatasetIngest)


def claimed(s: Session, table: type[Claimed], jid: uuid.UUID) -> Claimed:
    """The row of a job this worker has claimed (so it exists), read in ``s``."""
    row = s.get(table, jid)
    assert row is not None, f"{table.__tablename__} {jid} was claimed"
    return row


def fetch(rt: Runtime, stored: StoredFile, missing: JobErrorType) -> Path:
    """The local file of a job's input; a file the store no longer has fails the job as
    ``missing`` (the kind of input it is), any other store failure as ``storage-error``."""
    try:
        return rt.fetch(stored.key, stored.sha256)
    except StoreError as exc:
        if "is not in the store" in str(exc):
            raise JobFailed(job_error(missing, str(exc))) from exc
        raise JobFailed(storage_error(exc)) from exc


def keep_output(rt: Runtime, scratch: Scratch, host_dir: Path, rel: str, folder: str,
                max_bytes: int) -> str:
    """Copy the child's file out (no link followed), store it as ``folder/<sha256>`` and
    return that key."""
    tmp = rt.settings.data_dir / "tmp" / f"out-{uuid.uuid4().hex}"
    try:
        scratch.copy_out(host_dir, rel, tmp, max_bytes)
        key = f"{folder}/{file_sha256(tmp)}"
        rt.store.put_file(key, tmp)
    except StoreError as exc:
        raise JobFailed(storage_error(exc)) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return key


class JobRef(Protocol):
    id: uuid.UUID
    token: int


@dataclass
class Scratch:
    """Where the child's files are, as the child sees them and as the supervisor does."""

    state: Path  # the child's resumable state (as the child sees it)
    artifacts: Path  # the child's artifacts (as the child sees it)
    out: Path  # the child's outputs (as the child sees it)
    host_artifacts: Path  # the same directories, as the supervisor sees them
    host_out: Path
    # Folders the work asked for beside its state (Work.scratch_dirs), as the child sees them.
    dirs: dict[str, Path] = field(default_factory=dict)
    # The jailed child's scratch directory as the supervisor made it: files under it are
    # read only through :mod:`workers.sandbox.files` (no link followed). ``None``: no jail.
    host_root: Path | None = None

    def copy_out(self, host_dir: Path, rel: str, dst: Path, max_bytes: int) -> int:
        """Copy the child's file ``host_dir/rel`` (``host_dir`` one of the host paths above)
        to ``dst``; a link, a non-regular file or one over ``max_bytes`` fails the job as
        ``sandbox-error``."""
        root, path = (host_dir, rel) if self.host_root is None else (
            self.host_root, f"{host_dir.relative_to(self.host_root).as_posix()}/{rel}")
        try:
            return files.copy_out(root, path, dst, max_bytes)
        except (files.UnsafeFile, OSError) as exc:
            raise JobFailed(sandbox_error(f"a file from the jail was refused: {exc}")) from exc


class Work(Protocol):
    """One kind of job: what the child is asked to do and what its reports mean."""

    id: uuid.UUID
    token: int
    table: JobTable
    #: True for a kind whose work records its own success (a training registers its model
    #: before its child exits); the loop then records only the other outcomes.
    records_own_success: bool

    @property
    def state_dir(self) -> Path:
        """Resumable state kept across attempts (``state/...``)."""

    def inputs(self) -> dict[str, Path]:
        """Files the child reads, by their name under ``/job``."""

    def describe(self, files: dict[str, str], scratch: Scratch, threads: int,
                 device: str) -> EvaluateJob | TrainJob:
        """The child's job, given where it sees its inputs and scratch, and the threads and
        device it runs on."""

    def handle(self, message: dict[str, Any], scratch: Scratch) -> None:
        """Record one report of the child (fenced by the attempt)."""

    def finished(self, status: str, error: dict[str, str] | None) -> None:
        """After the outcome was written: notifications, clean-up."""


class Supervision(Protocol):
    """What a job's work sees of the supervisor that runs it (:class:`workers.jobs.Supervisor`):
    :meth:`progress` stores the latest progress and, like :meth:`check`, raises when the job
    was cancelled, superseded or ran out of time."""

    def check(self) -> None: ...

    def progress(self, fraction: float, stage: str, message: str) -> None: ...


@runtime_checkable
class LocalWork(Protocol):
    """One kind of job whose work runs in this process, not in the engine child: it runs no
    user code and needs no torch (a dataset's ingest). The claim, the supervisor and the
    outcome are those of any job; :meth:`run_here` reports progress through
    :meth:`Supervision.progress`, which raises when the job is cancelled, superseded or out of
    time, and must then stop and leave nothing behind."""

    id: uuid.UUID
    token: int
    table: JobTable
    records_own_success: bool

    def run_here(self, sup: Supervision) -> None:
        """Do the whole job; raise :class:`JobFailed` for a failure the user is told."""

    def finished(self, status: str, error: dict[str, Any] | None) -> None:
        """After the outcome was written: notifications, clean-up."""


#: Optional parts of a Work (read with getattr): ``scratch_dirs()`` (folders copied into the
#: child's scratch beside its state, by name), ``progress_span`` (the part of the job's
#: progress its child's 0..1 fills), ``started`` (when the time limit started counting, if
#: not at this attempt's claim) and ``on_write(session)`` (written with each heartbeat).
#: Optional parts of a job's table: ``claimable(stale)`` (which rows a claim may take) and
#: ``settled(session, id)`` (what else changes in the transaction that writes an outcome the
#: loop writes: a failed ingest's dataset).
