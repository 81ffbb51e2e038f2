"""Jobs: claim one, supervise it, run its work in the engine child, record the outcome.

Evaluations, trainings, shards and dataset ingests are one job concept (:class:`Work` or
:class:`LocalWork` describes what differs). Postgres is the source of truth. A job is
*claimed* by an atomic update that also counts the attempt; that attempt number is a fencing
token every later write checks, so a worker that lost its job (its heartbeat went stale and
another worker took over) cannot write results.

The worker is a supervisor that never loads a user's model: the work runs in a jailed child
process (:mod:`workers.sandbox`) that reports over a pipe, and the supervisor writes what it
reports, fenced by the attempt. Time limits and cancellation kill the child, so they take
effect within a second even inside one forward pass. Resumable state the child writes to its
scratch directory is copied to ``state/`` as it appears, so a job whose worker was killed
resumes where it stopped. A dataset's ingest runs no user code (Pillow decodes its images):
it runs in this process, as a :class:`LocalWork`, under the same claim and supervisor.
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from contract.jobs import JobErrorType, JobStatus, job_error
from core.objectstore import StateMirror, StoreError, file_sha256
from core.tables import (
    Dataset,
    DatasetIngest,
    Evaluation,
    EvaluationShard,
    JobRow,
    JobTable,
    Training,
    utcnow,
)
from workers.engine.types import Cancelled
from workers.runtime import Runtime
from workers.sandbox import child as engine_child
from workers.sandbox import files
from workers.sandbox.jail import Child
from workers.sandbox.protocol import EvaluateJob, ProtocolError, Report, TrainJob
from workers.sandbox.remote import SERVER_EXITED

log = logging.getLogger("robustscope.worker")

#: Seconds between two progress writes of one job, at most.
PROGRESS_EVERY = 0.5


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


@runtime_checkable
class LocalWork(Protocol):
    """One kind of job whose work runs in this process, not in the engine child: it runs no
    user code and needs no torch (a dataset's ingest). The claim, the supervisor and the
    outcome are those of any job; :meth:`run_here` reports progress through
    :meth:`Supervisor.progress`, which raises when the job is cancelled, superseded or out of
    time, and must then stop and leave nothing behind."""

    id: uuid.UUID
    token: int
    table: JobTable
    records_own_success: bool

    def run_here(self, sup: Supervisor) -> None:
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


def claim(rt: Runtime, eid: uuid.UUID, table: JobTable) -> int | None:
    """Take the job if it is queued or its worker went silent; returns the attempt number."""
    now = utcnow()
    stale = now - timedelta(seconds=rt.settings.stale_after)
    claimable = getattr(table, "claimable", None)
    when = claimable(stale) if claimable is not None else or_(
        table.status == JobStatus.QUEUED,
        and_(table.status == JobStatus.RUNNING, table.heartbeat_at < stale))
    with rt.sessions.begin() as s:
        res = s.execute(
            update(table)
            .where(table.id == eid, table.attempts < rt.settings.max_attempts, when)
            .values(status=JobStatus.RUNNING, attempts=table.attempts + 1, worker=rt.name,
                    heartbeat_at=now,
                    progress_stage="starting", progress_message=f"claimed by {rt.name}")
            .execution_options(synchronize_session=False)
        )
        if res.rowcount != 1:  # type: ignore[attr-defined]
            return None
        started, attempts = s.execute(select(table.started_at, table.attempts)
                                      .where(table.id == eid)).one()
        if started is None:
            s.execute(update(table).where(table.id == eid).values(started_at=now)
                      .execution_options(synchronize_session=False))
        return int(attempts)


class Supervisor:
    """Heartbeats, progress writes and cancellation, off the engine's hot loop.

    :meth:`progress` only stores the latest value; :meth:`check` raises if the job was
    cancelled, superseded or ran out of time. A thread writes progress (at most every
    :data:`PROGRESS_EVERY` seconds) and heartbeats (every ``heartbeat_interval``) to the
    database, reading the cancel flag with each write; between writes it reads the flag alone
    every ``cancel_poll_interval`` seconds (one row by its primary key), so that a cancel takes
    effect within that time plus the supervising loop's turn, not on the next heartbeat.
    """

    def __init__(self, rt: Runtime, job: JobRef, table: JobTable) -> None:
        self.rt, self.job, self.table = rt, job, table
        self.latest: tuple[float, str, str] | None = None
        self.cancelled = threading.Event()
        self.superseded = threading.Event()
        self.lost_why = "another worker took over this job"
        self.stop = threading.Event()
        started: datetime | None = getattr(job, "started", None)
        spent = 0.0 if started is None else max(0.0, (utcnow() - started).total_seconds())
        self.deadline = time.monotonic() + rt.settings.job_time_limit - spent
        self.on_write = getattr(job, "on_write", None)
        self.thread = threading.Thread(target=self._loop, name=f"supervise-{job.id}", daemon=True)

    def __enter__(self) -> Supervisor:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)

    def progress(self, fraction: float, stage: str, message: str) -> None:
        self.latest = (min(max(fraction, 0.0), 1.0), stage, message)
        self.check()

    def check(self) -> None:
        if self.superseded.is_set():
            raise Superseded(self.lost_why)
        if self.cancelled.is_set():
            raise Cancelled("cancelled by the user")
        if time.monotonic() > self.deadline:
            raise TimeLimit(f"the job ran past its time limit of "
                            f"{self.rt.settings.job_time_limit:g} s")

    def _loop(self) -> None:
        interval = self.rt.settings.heartbeat_interval
        poll = self.rt.settings.cancel_poll_interval
        tick = min(poll, PROGRESS_EVERY, interval)
        last_beat = last_write = last_read = 0.0
        written: tuple[float, str, str] | None = None
        while not self.stop.wait(tick):
            now = time.monotonic()
            latest = self.latest
            try:
                if now - last_beat >= interval or (
                        latest != written and now - last_write >= PROGRESS_EVERY):
                    self._write(latest)
                    written, last_beat, last_write, last_read = latest, now, now, now
                elif now - last_read >= poll - tick / 2:  # the wait may end a little early
                    self._read_flags()
                    last_read = now
            except Exception:  # the database may be restarting: keep trying, the job goes on
                log.warning("heartbeat for %s failed", self.job.id, exc_info=True)

    def _write(self, latest: tuple[float, str, str] | None) -> None:
        """The heartbeat and the latest progress; reads the cancel flag in the same
        transaction."""
        values: dict[str, Any] = {"heartbeat_at": utcnow()}
        if latest is not None:
            values.update(progress_fraction=latest[0], progress_stage=latest[1][:100],
                          progress_message=latest[2][:500])
        table = self.table
        with self.rt.sessions.begin() as s:
            res = s.execute(update(table).where(
                table.id == self.job.id, table.attempts == self.job.token,
                table.status == JobStatus.RUNNING).values(**values)
                .execution_options(synchronize_session=False))
            if res.rowcount == 1:  # type: ignore[attr-defined]
                if s.scalar(select(table.cancel_requested).where(table.id == self.job.id)):
                    self.cancelled.set()
                if self.on_write is not None:
                    self.on_write(s)
                return
        self._read_flags()  # not running under this attempt: whose is it now?

    def _read_flags(self) -> None:
        """The cancel flag, and whether this attempt lost the job, by primary key: another
        attempt claimed it, it was failed for it (workers lost), or its row was deleted (an
        ingest's, with its dataset). A job ``succeeded`` under
        this attempt was finished by this attempt itself (a training registers its model
        before its child exits): neither cancelled nor superseded."""
        table = self.table
        with self.rt.sessions() as s:
            row = s.execute(select(table.cancel_requested, table.attempts, table.status)
                            .where(table.id == self.job.id)).one_or_none()
        if (row is None or row.attempts != self.job.token
                or row.status not in (JobStatus.RUNNING, JobStatus.SUCCEEDED)):
            if row is None:
                self.lost_why = "the job was deleted"
            self.superseded.set()
        elif row.status == JobStatus.RUNNING and row.cancel_requested:
            self.cancelled.set()


def run_work(rt: Runtime, table: JobTable, jid: uuid.UUID,
             prepare: Callable[[Runtime, uuid.UUID, int], Work | LocalWork]) -> str:
    """Run job ``jid`` if this worker can claim it; returns what happened."""
    token = claim(rt, jid, table)
    if token is None:
        _fail_exhausted(rt, jid, table)
        return "skipped"
    try:
        work = prepare(rt, jid, token)
    except JobFailed as exc:
        _finish(rt, table, jid, token, JobStatus.FAILED, exc.error)
        return JobStatus.FAILED
    status, error = JobStatus.SUCCEEDED, None
    with Supervisor(rt, work, table) as sup:
        try:
            execute(rt, sup, work)
        except Superseded as exc:
            log.warning("%s %s: %s; stopping", table.__tablename__, jid, exc)
            return "superseded"
        except DBAPIError:
            # The database went away mid-job: leave the job running. Its heartbeat goes stale
            # and the reconciler re-sends it once the database is back; it then resumes.
            log.warning("database error during %s %s; it will be resumed", table.__tablename__,
                        jid, exc_info=True)
            raise
        except Cancelled:
            status = JobStatus.CANCELLED
        except TimeLimit as exc:
            status, error = JobStatus.FAILED, job_error(JobErrorType.TIME_LIMIT, str(exc))
        except SoftTimeLimitExceeded:  # Celery's own limit (prefork), a minute after ours
            status, error = JobStatus.FAILED, job_error(JobErrorType.TIME_LIMIT, (
                f"the job ran past its time limit of {rt.settings.job_time_limit:g} s"))
        except JobFailed as exc:
            status, error = JobStatus.FAILED, exc.error
    if status != JobStatus.SUCCEEDED or not work.records_own_success:
        _finish(rt, table, jid, token, status, error)
    work.finished(status, error)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return status


def state_mirror(rt: Runtime, state_dir: Path) -> StateMirror:
    """The job's resumable state in the store (a no-op where the store is the data folder)."""
    prefix = state_dir.relative_to(rt.settings.data_dir).as_posix()
    return StateMirror(rt.store, prefix, state_dir)


def execute(rt: Runtime, sup: Supervisor, work: Work | LocalWork) -> None:
    """Run the work in a jailed child, or in this process where the sandbox is off or the
    work is a :class:`LocalWork`. The job's state comes from the store first (another worker
    may have started it) and goes back with each report that depends on it, and with the
    heartbeat; the local copy is removed at the end."""
    if isinstance(work, LocalWork):
        work.run_here(sup)
        return
    mirror = state_mirror(rt, work.state_dir)
    try:
        mirror.pull()
        if rt.settings.sandbox == "off":
            _execute_here(rt, sup, work, mirror)
        else:
            _execute_jailed(rt, sup, work, mirror)
    except StoreError as exc:
        raise JobFailed(storage_error(exc)) from exc
    finally:
        if mirror.active:  # the store has it; this folder is the worker's own
            shutil.rmtree(work.state_dir, ignore_errors=True)


def _execute_here(rt: Runtime, sup: Supervisor, work: Work, mirror: StateMirror) -> None:
    out = rt.settings.data_dir / "tmp" / f"{work.table.__tablename__}-{work.id}-{work.token}"
    artifacts = out / "artifacts"
    dirs: dict[str, Path] = getattr(work, "scratch_dirs", dict)()
    scratch = Scratch(state=work.state_dir, artifacts=artifacts, out=out,
                      host_artifacts=artifacts, host_out=out, dirs=dirs)
    job = work.describe({k: str(v) for k, v in work.inputs().items()}, scratch,
                        threads=torch.get_num_threads(), device=str(rt.device))

    pushed = time.monotonic()

    def emit(message: Report) -> None:
        # Validated as it was built: a report its model refuses raises in the engine, and
        # fails the job ``sandbox-error`` (engine_child.classify), as the jailed child's would.
        sup.check()
        checked = message.model_dump()
        nonlocal pushed
        if checked.get("t") in ("entry", "epoch", "trained") or (
                time.monotonic() - pushed > rt.settings.heartbeat_interval):
            mirror.push()  # the state that goes with this report first
            pushed = time.monotonic()
        _dispatch(sup, work, checked, scratch)

    try:
        engine_child.run_job(job, emit)
    except (Cancelled, TimeLimit, DBAPIError, JobFailed, StoreError):
        raise
    except Exception as exc:  # the model's (or the engine's) failure, as a typed error
        log.info("%s %s failed in the engine", work.table.__tablename__, work.id, exc_info=True)
        raise JobFailed(engine_child.classify(exc)) from exc
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _dispatch(sup: Supervisor, work: Work, message: dict[str, Any], scratch: Scratch) -> None:
    if message.get("t") == "progress":
        low, span = getattr(work, "progress_span", (0.0, 1.0))
        sup.progress(low + span * float(message["fraction"]), str(message["stage"]),
                     str(message["message"]))
    else:
        work.handle(message, scratch)


def _execute_jailed(rt: Runtime, sup: Supervisor, work: Work, mirror: StateMirror) -> None:
    child = rt.jail().take()
    try:
        for name, src in work.inputs().items():
            files.link_in(src, child.inputs / name)
        _copy_state_in(work.state_dir, child.scratch / "state")
        dirs: dict[str, Path] = getattr(work, "scratch_dirs", dict)()
        for name, src in dirs.items():
            _copy_state_in(src, child.scratch / "in" / name)
        sync = _StateSync(child.scratch, "state", work.state_dir, mirror)
        scratch = Scratch(state=Path("/scratch/state"), artifacts=Path("/scratch/artifacts"),
                          out=Path("/scratch/out"), host_artifacts=child.scratch / "artifacts",
                          host_out=child.scratch / "out", host_root=child.scratch,
                          dirs={name: Path("/scratch/in") / name for name in dirs})
        job = work.describe({k: f"/job/{k}" for k in work.inputs()}, scratch,
                            threads=torch.get_num_threads(), device=str(rt.device))
        # The jail adds the memory and pids limits its config says.
        child.start(_serve_model(rt, child, work, job))
        try:
            _supervise(rt, sup, work, child, scratch, sync)
        except JobFailed as exc:
            if child.server is None or exc.error.get("detail") != SERVER_EXITED:
                raise
            raise JobFailed(_died(child.server.exit_status())) from exc  # why it exited
    finally:
        child.close()


def _serve_model(rt: Runtime, child: Child, work: Work,
                 job: EvaluateJob | TrainJob) -> EvaluateJob | TrainJob:
    """An uploaded model's code runs in the child's model server, never in the child
    (docs/SECURITY.md); other jobs do not need the server. Returns the job as the child is
    given it."""
    if child.server is None:
        return job
    if not isinstance(job, EvaluateJob) or job.model_format == "safetensors":
        child.server.close()
        child.server = None
        return job
    return job.served(child.server.start(
        work.inputs()["model"], job.server_job(child.config.address_space()), child.channel,
        rt.settings.sandbox_model_timeout))


def _supervise(rt: Runtime, sup: Supervisor, work: Work, child: Child, scratch: Scratch,
               sync: _StateSync) -> None:
    """Read the child's reports until it ends. Every report was validated by
    :meth:`Child.read`; a protocol violation kills the child and fails the job as
    ``sandbox-error``, and so does a child that exits before it said it was ready (the
    jail itself could not start it)."""
    error: dict[str, str] | None = None
    done = False
    recorded: float | None = None  # when the job's outcome was written (a training's model)
    last_sync = time.monotonic()
    while True:
        try:
            if recorded is None:
                sup.check()
            elif time.monotonic() - recorded > 30:  # it had its say; it may not linger
                child.kill()
        except BaseException:
            child.kill()
            raise
        try:
            messages = child.read(0.25)
        except ProtocolError as exc:
            child.kill()
            log.warning("engine child of %s %s broke the protocol: %s; its log ends: %s",
                        work.table.__tablename__, work.id, exc, child.log_tail(800))
            raise JobFailed(sandbox_error(f"the engine child broke the report protocol: {exc}")
                            ) from exc
        if messages is None:
            break
        for message in messages:
            kind = message["t"]
            if kind == "error":
                error = job_error(message["type"], message["detail"])
            elif kind == "done":
                done = True
            elif kind != "ready":
                if kind in ("entry", "epoch", "trained"):
                    _sync_or_kill(sync, child)  # the state that goes with this report first
                _dispatch_or_kill(sup, work, message, scratch, child)
                if kind == "trained":  # the success is written: the job is no longer running
                    recorded = time.monotonic()
        if (done or error is not None) and not child.alive():
            break
        if time.monotonic() - last_sync > rt.settings.heartbeat_interval:
            _sync_or_kill(sync, child)
            _check_scratch(rt, child)
            last_sync = time.monotonic()
    status = child.exit_status()
    if recorded is not None:
        if error is not None or not done:
            log.warning("engine child of %s %s ended badly after its outcome was recorded: %s",
                        work.table.__tablename__, work.id, error or f"status {status}")
        return
    if error is not None:
        raise JobFailed(error)
    if not done:
        tail = child.log_tail(800)
        log.warning("engine child of %s %s died: status %s; its log ends: %s",
                    work.table.__tablename__, work.id, status, tail)
        if not child.ready:
            raise JobFailed(_jail_failed(status, tail))
        raise JobFailed(_died(status))


def _check_scratch(rt: Runtime, child: Child) -> None:
    """``/scratch`` is the data directory's disk (RAM where that is a tmpfs), not one of the
    jail's sized mounts: what the job wrote there is counted, and past the limit it fails."""
    used = files.usage(child.scratch)
    if used > rt.settings.sandbox_scratch_limit:
        child.kill()
        raise JobFailed(job_error(JobErrorType.DISK_QUOTA, (
            f"the job wrote {used} bytes to its scratch directory, more than the "
            f"limit of {rt.settings.sandbox_scratch_limit}")))


def _sync_or_kill(sync: _StateSync, child: Child) -> None:
    try:
        sync.run()
    except BaseException:
        child.kill()
        raise


def _jail_failed(status: int | None, log_tail: str) -> dict[str, str]:
    """The child exited before it was ready: the jail (bubblewrap) or the engine's imports
    failed, not the user's model. bubblewrap's own message names the cause."""
    lines = [line.strip() for line in log_tail.splitlines() if line.strip()]
    cause = next((line for line in reversed(lines) if line.startswith("bwrap:")), None)
    if cause is None and lines:
        cause = lines[-1]
    detail = "the jail could not start the engine"
    if cause:
        detail += f": {engine_child.strip_paths(cause)}"
    return sandbox_error(f"{detail} (status {status})")


def _dispatch_or_kill(sup: Supervisor, work: Work, message: dict[str, Any], scratch: Scratch,
                      child: Child) -> None:
    try:
        _dispatch(sup, work, message, scratch)
    except BaseException:
        child.kill()
        raise


def _died(status: int | None) -> dict[str, str]:
    if status is not None and status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        if -status == signal.SIGKILL:
            return job_error(JobErrorType.OUT_OF_MEMORY,
                             "the model's process was killed (SIGKILL), most likely for "
                             "running out of memory")
        return job_error(JobErrorType.MODEL_CRASHED, f"the model's process died ({name})")
    return job_error(JobErrorType.MODEL_CRASHED,
                     f"the model's process exited without a result (status {status})")


def _copy_state_in(src: Path, dst: Path) -> None:
    """The job's resumable state (written by earlier attempts' syncs) into the new child's
    scratch, regular files only."""
    if not src.is_dir():
        return
    for rel, st in files.regular_files(src):
        files.copy_out(src, rel, dst / rel, st.st_size)


class _StateSync:
    """Copies the child's finished state files (``root/sub``) to ``dst`` as they appear
    (temporary files are skipped), never through a link: a link, FIFO or device in the
    child's state fails the job as ``sandbox-error``, and so does a file over the cap."""

    MAX_BYTES = 4 << 30

    def __init__(self, root: Path, sub: str, dst: Path, mirror: StateMirror) -> None:
        self.root, self.sub, self.dst, self.mirror = root, sub, dst, mirror
        self.seen: dict[str, tuple[int, int]] = dict(self._files())

    def _files(self) -> list[tuple[str, tuple[int, int]]]:
        try:
            return [(str(rel), (st.st_size, st.st_mtime_ns))
                    for rel, st in files.regular_files(self.root, self.sub)
                    if ".tmp" not in rel.name]
        except (files.UnsafeFile, OSError) as exc:
            raise JobFailed(sandbox_error(f"the job's state was refused: {exc}")) from exc

    def run(self) -> None:
        for rel, key in self._files():
            if self.seen.get(rel) == key:
                continue
            try:
                files.copy_out(self.root, f"{self.sub}/{rel}", self.dst / rel, self.MAX_BYTES)
            except FileNotFoundError:
                continue  # replaced while we looked (the engine writes and renames)
            except (files.UnsafeFile, OSError) as exc:
                raise JobFailed(sandbox_error(f"the job's state was refused: {exc}")) from exc
            self.seen[rel] = key
        self.mirror.push()


def device_info(rt: Runtime, base: str) -> str:
    """The job's ``device`` field: where it ran, and whether the model was jailed."""
    where = "sandbox" if rt.settings.sandbox == "on" else "no sandbox"
    return f"{base[:-1]}; {where})" if base.endswith(")") else f"{base} ({where})"


def _finish(rt: Runtime, table: JobTable, jid: uuid.UUID, token: int, status: str,
            error: dict[str, str] | None) -> None:
    with rt.sessions.begin() as s:
        row: JobRow | None = s.get(table, jid)  # type: ignore[assignment]
        if row is None or row.attempts != token:
            return
        row.status, row.error, row.finished_at = status, error, utcnow()
        _settled(s, table, jid)
        row.progress_stage = status
        if status == JobStatus.SUCCEEDED:
            row.progress_fraction, row.progress_message = 1.0, "done"
        elif status == JobStatus.CANCELLED:
            row.progress_message = "cancelled by the user"
        else:
            # words for people (the state has its own column)
            row.progress_message = (error or {}).get("detail", "failed")[:500]


def _settled(s: Session, table: JobTable, jid: uuid.UUID) -> None:
    """What the table's kind changes with an outcome the loop wrote, in its transaction."""
    settled = getattr(table, "settled", None)
    if settled is not None:
        s.flush()
        settled(s, jid)


def _fail_exhausted(rt: Runtime, eid: uuid.UUID, table: JobTable) -> None:
    """A job whose workers kept dying is failed rather than retried forever."""
    stale = utcnow() - timedelta(seconds=rt.settings.stale_after)
    with rt.sessions.begin() as s:
        res = s.execute(update(table).where(
            table.id == eid, table.status == JobStatus.RUNNING,
            table.attempts >= rt.settings.max_attempts, table.heartbeat_at < stale)
            .values(status=JobStatus.FAILED, finished_at=utcnow(),
                    progress_stage=JobStatus.FAILED,
                    progress_message="workers were lost repeatedly",
                    error=job_error(JobErrorType.WORKER_LOST,
                                    f"the job's worker died {rt.settings.max_attempts} times"))
            .execution_options(synchronize_session=False))
        if res.rowcount == 1:  # type: ignore[attr-defined]
            _settled(s, table, eid)
