"""Jobs: claim one, supervise it, run its work, record the outcome.

Evaluations, trainings, shards and dataset ingests are one job concept
(:class:`workers.work.Work` or :class:`workers.work.LocalWork` describes what differs).
Postgres is the source of truth. A job is *claimed* by an atomic update that also counts the
attempt; that attempt number is a fencing token every later write checks, so a worker that
lost its job (its heartbeat went stale and another worker took over) cannot write results.

The worker is a supervisor that never loads a user's model: the work runs in a jailed child
process (:mod:`workers.execute`), and the supervisor writes what it reports, fenced by the
attempt. Time limits and cancellation kill the child, so they take effect within a second even
inside one forward pass. A dataset's ingest runs no user code (Pillow decodes its images):
it runs in this process, as a :class:`~workers.work.LocalWork`, under the same claim and
supervisor.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import torch
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from contract.jobs import JobErrorType, JobStatus, job_error
from core.tables import JobRow, JobTable, utcnow
from workers.engine.types import Cancelled
from workers.execute import execute
from workers.runtime import Runtime
from workers.work import JobFailed, JobRef, LocalWork, Superseded, TimeLimit, Work

log = logging.getLogger("robustscope.worker")

#: Seconds between two progress writes of one job, at most.
PROGRESS_EVERY = 0.5


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
        ingest's, with its dataset). A job ``succeeded`` under this attempt was finished by
        this attempt itself (a training registers its model before its child exits): neither
        cancelled nor superseded."""
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
