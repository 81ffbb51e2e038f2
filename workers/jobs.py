"""Jobs: claim one, supervise it, run its work in the engine child, record the outcome.

Evaluations and trainings are one job concept (:class:`Work` describes what differs).
Postgres is the source of truth. A job is *claimed* by an atomic update that also counts the
attempt; that attempt number is a fencing token every later write checks, so a worker that
lost its job (its heartbeat went stale and another worker took over) cannot write results.

The worker is a supervisor that never loads a user's model: the work runs in a jailed child
process (:mod:`workers.sandbox`) that reports over a pipe, and the supervisor writes what it
reports, fenced by the attempt. Time limits and cancellation kill the child, so they take
effect within a second even inside one forward pass. Resumable state the child writes to its
scratch directory is copied to ``state/`` as it appears, so a job whose worker was killed
resumes where it stopped.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import DBAPIError

from service.tables import Evaluation, Training, utcnow
from workers.engine.types import Cancelled
from workers.runtime import Runtime
from workers.sandbox import child as engine_child
from workers.sandbox.jail import Child

log = logging.getLogger("robustscope.worker")

#: Seconds between two progress writes of one job, at most.
PROGRESS_EVERY = 0.5


class Superseded(Cancelled):
    """Another worker owns this job now; stop without writing anything."""


class TimeLimit(Exception):
    pass


class JobFailed(Exception):
    """The job failed with a typed error for the user (``{"type", "detail"}``)."""

    def __init__(self, error: dict[str, str]) -> None:
        super().__init__(error["detail"])
        self.error = error


JobTable = type[Evaluation] | type[Training]


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


class Work(Protocol):
    """One kind of job: what the child is asked to do and what its reports mean."""

    id: uuid.UUID
    token: int
    table: JobTable

    @property
    def state_dir(self) -> Path:
        """Resumable state kept across attempts (``state/...``)."""

    def inputs(self) -> dict[str, Path]:
        """Files the child reads, by their name under ``/job``."""

    def describe(self, files: dict[str, str], scratch: Scratch) -> dict[str, Any]:
        """The child's job, given where it sees its inputs and scratch."""

    def handle(self, message: dict[str, Any], scratch: Scratch) -> None:
        """Record one report of the child (fenced by the attempt)."""

    def finished(self, status: str, error: dict[str, str] | None) -> None:
        """After the outcome was written: notifications, clean-up."""


def claim(rt: Runtime, eid: uuid.UUID, table: JobTable = Evaluation) -> int | None:
    """Take the job if it is queued or its worker went silent; returns the attempt number."""
    now = utcnow()
    stale = now - timedelta(seconds=rt.settings.stale_after)
    with rt.sessions.begin() as s:
        res = s.execute(
            update(table)
            .where(table.id == eid,
                   table.attempts < rt.settings.max_attempts,
                   or_(table.status == "queued",
                       and_(table.status == "running", table.heartbeat_at < stale)))
            .values(status="running", attempts=table.attempts + 1, worker=rt.name,
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

    def __init__(self, rt: Runtime, job: JobRef, table: JobTable = Evaluation) -> None:
        self.rt, self.job, self.table = rt, job, table
        self.latest: tuple[float, str, str] | None = None
        self.cancelled = threading.Event()
        self.superseded = threading.Event()
        self.stop = threading.Event()
        self.deadline = time.monotonic() + rt.settings.job_time_limit
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
            raise Superseded("another worker took over this job")
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
                table.status == "running").values(**values)
                .execution_options(synchronize_session=False))
            if res.rowcount == 1:  # type: ignore[attr-defined]
                if s.scalar(select(table.cancel_requested).where(table.id == self.job.id)):
                    self.cancelled.set()
                return
        self._read_flags()  # not running under this attempt: whose is it now?

    def _read_flags(self) -> None:
        """The cancel flag, and whether this attempt lost the job, by primary key: another
        attempt claimed it, or it was failed for it (workers lost). A job ``succeeded`` under
        this attempt was finished by this attempt itself (a training registers its model
        before its child exits): neither cancelled nor superseded."""
        table = self.table
        with self.rt.sessions() as s:
            row = s.execute(select(table.cancel_requested, table.attempts, table.status)
                            .where(table.id == self.job.id)).one_or_none()
        if (row is None or row.attempts != self.job.token
                or row.status not in ("running", "succeeded")):
            self.superseded.set()
        elif row.status == "running" and row.cancel_requested:
            self.cancelled.set()


def run_work(rt: Runtime, table: JobTable, jid: uuid.UUID,
             prepare: Callable[[Runtime, uuid.UUID, int], Work]) -> str:
    """Run job ``jid`` if this worker can claim it; returns what happened."""
    token = claim(rt, jid, table)
    if token is None:
        _fail_exhausted(rt, jid, table)
        return "skipped"
    try:
        work = prepare(rt, jid, token)
    except JobFailed as exc:
        _finish(rt, table, jid, token, "failed", exc.error)
        return "failed"
    status, error = "succeeded", None
    with Supervisor(rt, work, table) as sup:
        try:
            execute(rt, sup, work)
        except Superseded:
            log.warning("%s %s was taken over by another worker; stopping", table.__tablename__,
                        jid)
            return "superseded"
        except DBAPIError:
            # The database went away mid-job: leave the job running. Its heartbeat goes stale
            # and the reconciler re-sends it once the database is back; it then resumes.
            log.warning("database error during %s %s; it will be resumed", table.__tablename__,
                        jid, exc_info=True)
            raise
        except Cancelled:
            status = "cancelled"
        except TimeLimit as exc:
            status, error = "failed", {"type": "time-limit", "detail": str(exc)}
        except SoftTimeLimitExceeded:  # Celery's own limit (prefork), a minute after ours
            status, error = "failed", {"type": "time-limit", "detail": (
                f"the job ran past its time limit of {rt.settings.job_time_limit:g} s")}
        except JobFailed as exc:
            status, error = "failed", exc.error
    if status != "succeeded" or table is Evaluation:
        _finish(rt, table, jid, token, status, error)
    work.finished(status, error)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return status


def execute(rt: Runtime, sup: Supervisor, work: Work) -> None:
    """Run the work in a jailed child, or in this process where the sandbox is off."""
    if rt.settings.sandbox == "off":
        _execute_here(rt, sup, work)
    else:
        _execute_jailed(rt, sup, work)


def _execute_here(rt: Runtime, sup: Supervisor, work: Work) -> None:
    artifacts = rt.settings.data_dir / "artifacts" / str(work.id)
    out = rt.settings.data_dir / "tmp" / f"{work.table.__tablename__}-{work.id}-{work.token}"
    scratch = Scratch(state=work.state_dir, artifacts=artifacts, out=out,
                      host_artifacts=artifacts, host_out=out)
    job = work.describe({k: str(v) for k, v in work.inputs().items()}, scratch)
    job.update(threads=torch.get_num_threads(), device=str(rt.device))

    def emit(message: dict[str, Any]) -> None:
        sup.check()
        _dispatch(sup, work, message, scratch)

    try:
        engine_child.run_job(job, emit)
    except (Cancelled, TimeLimit, DBAPIError, JobFailed):
        raise
    except Exception as exc:  # the model's (or the engine's) failure, as a typed error
        log.info("%s %s failed in the engine", work.table.__tablename__, work.id, exc_info=True)
        raise JobFailed(engine_child.classify(exc)) from exc
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _dispatch(sup: Supervisor, work: Work, message: dict[str, Any], scratch: Scratch) -> None:
    if message.get("t") == "progress":
        sup.progress(float(message["fraction"]), str(message["stage"]), str(message["message"]))
    else:
        work.handle(message, scratch)


def _execute_jailed(rt: Runtime, sup: Supervisor, work: Work) -> None:
    child = rt.jail().take()
    try:
        for name, src in work.inputs().items():
            _link(src, child.inputs / name)
        if work.state_dir.is_dir():
            shutil.copytree(work.state_dir, child.scratch / "state", dirs_exist_ok=True)
        sync = _StateSync(child.scratch / "state", work.state_dir)
        scratch = Scratch(state=Path("/scratch/state"), artifacts=Path("/scratch/artifacts"),
                          out=Path("/scratch/out"), host_artifacts=child.scratch / "artifacts",
                          host_out=child.scratch / "out")
        job = work.describe({k: f"/job/{k}" for k in work.inputs()}, scratch)
        job.update(threads=torch.get_num_threads(), device=str(rt.device))
        if rt.device.type == "cpu":  # CUDA reserves far more address space than it uses
            job["memory_limit"] = rt.settings.sandbox_memory_limit
        child.start(job)
        _supervise(rt, sup, work, child, scratch, sync)
    finally:
        child.close()


def _supervise(rt: Runtime, sup: Supervisor, work: Work, child: Child, scratch: Scratch,
               sync: _StateSync) -> None:
    error: dict[str, str] | None = None
    done = False
    last_sync = time.monotonic()
    while True:
        try:
            sup.check()
        except BaseException:
            child.kill()
            raise
        messages = child.read(0.25)
        if messages is None:
            break
        for message in messages:
            kind = message.get("t")
            if kind == "error":
                error = {"type": str(message.get("type", "model-crashed")),
                         "detail": str(message.get("detail", ""))[:500]}
            elif kind == "done":
                done = True
            else:
                if kind in ("entry", "epoch", "trained"):
                    sync.run()  # the state that goes with this report, before it is recorded
                _dispatch_or_kill(sup, work, message, scratch, child)
        if (done or error is not None) and not child.alive():
            break
        if time.monotonic() - last_sync > rt.settings.heartbeat_interval:
            sync.run()
            last_sync = time.monotonic()
    status = child.exit_status()
    if error is not None:
        raise JobFailed(error)
    if not done:
        log.warning("engine child of %s %s died: status %s; its log ends: %s",
                    work.table.__tablename__, work.id, status, child.log_tail(800))
        raise JobFailed(_died(status))


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
            return {"type": "out-of-memory",
                    "detail": "the model's process was killed (SIGKILL), most likely for "
                              "running out of memory"}
        return {"type": "model-crashed", "detail": f"the model's process died ({name})"}
    return {"type": "model-crashed",
            "detail": f"the model's process exited without a result (status {status})"}


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copyfile(src, dst)


class _StateSync:
    """Copies the child's finished state files to ``state/`` (temporary files are skipped)."""

    def __init__(self, src: Path, dst: Path) -> None:
        self.src, self.dst = src, dst
        self.seen: dict[Path, tuple[int, int]] = {}
        for path in self._files():
            st = path.stat()
            self.seen[path] = (st.st_size, st.st_mtime_ns)

    def _files(self) -> list[Path]:
        if not self.src.is_dir():
            return []
        return [p for p in self.src.rglob("*") if p.is_file() and ".tmp" not in p.name]

    def run(self) -> None:
        for path in self._files():
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            key = (st.st_size, st.st_mtime_ns)
            if self.seen.get(path) == key:
                continue
            target = self.dst / path.relative_to(self.src)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
            self.seen[path] = key


def device_info(rt: Runtime, base: str) -> str:
    """The job's ``device`` field: where it ran, and whether the model was jailed."""
    where = "sandbox" if rt.settings.sandbox == "on" else "no sandbox"
    return f"{base[:-1]}; {where})" if base.endswith(")") else f"{base} ({where})"


def _finish(rt: Runtime, table: JobTable, jid: uuid.UUID, token: int, status: str,
            error: dict[str, str] | None) -> None:
    with rt.sessions.begin() as s:
        row: Evaluation | Training | None = s.get(table, jid)  # type: ignore[assignment]
        if row is None or row.attempts != token:
            return
        row.status, row.error, row.finished_at = status, error, utcnow()
        row.progress_stage = status
        if status == "succeeded":
            row.progress_fraction, row.progress_message = 1.0, "done"
        elif status == "cancelled":
            row.progress_message = "cancelled by the user"
        else:
            row.progress_message = (error or {}).get("detail", "failed")[:500]


def _fail_exhausted(rt: Runtime, eid: uuid.UUID, table: JobTable = Evaluation) -> None:
    """A job whose workers kept dying is failed rather than retried forever."""
    stale = utcnow() - timedelta(seconds=rt.settings.stale_after)
    with rt.sessions.begin() as s:
        s.execute(update(table).where(
            table.id == eid, table.status == "running",
            table.attempts >= rt.settings.max_attempts, table.heartbeat_at < stale)
            .values(status="failed", finished_at=utcnow(), progress_stage="failed",
                    progress_message="workers were lost repeatedly",
                    error={"type": "worker-lost",
                           "detail": f"the job's worker died {rt.settings.max_attempts} times"})
            .execution_options(synchronize_session=False))
