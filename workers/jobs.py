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

import json
import logging
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import DBAPIError

from service.queue import WEBHOOK_TASK
from service.tables import Dataset, Evaluation, Model, Result, Training, utcnow
from workers.engine import ENGINE_VERSION
from workers.engine.types import Cancelled
from workers.runtime import Runtime
from workers.sandbox import child as engine_child
from workers.sandbox.jail import Child

log = logging.getLogger("robustscope.worker")


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
    cancelled, superseded or ran out of time. A thread writes progress and heartbeats to the
    database and reads the cancel flag.
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
        last_beat = 0.0
        written: tuple[float, str, str] | None = None
        while not self.stop.wait(min(0.5, interval)):
            now = time.monotonic()
            latest = self.latest
            if latest == written and now - last_beat < interval:
                continue
            try:
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
                    if res.rowcount != 1:  # type: ignore[attr-defined]
                        self.superseded.set()
                    elif s.scalar(select(table.cancel_requested)
                                  .where(table.id == self.job.id)):
                        self.cancelled.set()
                written, last_beat = latest, now
            except Exception:  # the database may be restarting: keep trying, the job goes on
                log.warning("heartbeat for %s failed", self.job.id, exc_info=True)


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



# --- Evaluations -------------------------------------------------------------------------


def run(rt: Runtime, eid: uuid.UUID, send_task: Any = None) -> str:
    """Run evaluation ``eid`` if this worker can claim it; returns what happened."""
    return run_work(rt, Evaluation, eid,
                    lambda rt, eid, token: EvaluationWork.load(rt, eid, token, send_task))


@dataclass
class EvaluationWork:
    rt: Runtime
    id: uuid.UUID
    token: int  # the attempt number that owns the job
    suite: list[dict[str, Any]]
    completed: set[int]
    seed: int
    model_path: Path
    model_format: str
    model_metadata: dict[str, Any]
    dataset: str
    dataset_path: Path | None
    dataset_params: dict[str, Any]
    split: str
    options: dict[str, Any] = field(default_factory=dict)  # n_examples, class_map
    send_task: Any = None
    table: JobTable = Evaluation

    @classmethod
    def load(cls, rt: Runtime, eid: uuid.UUID, token: int,
             send_task: Any = None) -> EvaluationWork:
        with rt.sessions() as s:
            ev = s.get(Evaluation, eid)
            assert ev is not None
            model = s.get(Model, ev.model_id) if ev.model_id else None
            if model is None:
                raise JobFailed({"type": "checkpoint-error",
                                 "detail": "the model of this evaluation was deleted"})
            dataset_path = None
            if ev.dataset_id is not None:
                ds = s.get(Dataset, ev.dataset_id)
                if ds is None:
                    raise JobFailed({"type": "benchmark-error",
                                     "detail": "the dataset of this evaluation was deleted"})
                dataset_path = rt.settings.data_dir / ds.storage_path
            return cls(
                rt=rt, id=eid, token=token, suite=list(ev.suite),
                completed=set(ev.completed_entries or []), seed=ev.seed,
                model_path=rt.settings.data_dir / model.storage_path, model_format=model.format,
                model_metadata=dict(model.model_metadata), dataset=ev.dataset,
                dataset_path=dataset_path, dataset_params=dict(ev.dataset_params or {}),
                split=ev.split, options=dict(ev.options or {}), send_task=send_task)

    @property
    def state_dir(self) -> Path:
        return self.rt.settings.data_dir / "state" / str(self.id)

    def inputs(self) -> dict[str, Path]:
        files = {"model": self.model_path}
        if self.dataset_path is not None:
            files["dataset.npz"] = self.dataset_path
        return files

    def describe(self, files: dict[str, str], scratch: Scratch) -> dict[str, Any]:
        return {"kind": "evaluate", "suite": self.suite, "completed": sorted(self.completed),
                "seed": self.seed, "batch_size": self.rt.settings.batch_size,
                "amp": self.rt.bf16_search, "model_path": files["model"],
                "model_format": self.model_format, "model_metadata": self.model_metadata,
                "dataset": self.dataset, "dataset_path": files.get("dataset.npz"),
                "dataset_params": self.dataset_params, "split": self.split,
                "n_examples": self.options.get("n_examples"),
                "class_map": self.options.get("class_map"),
                "state_dir": str(scratch.state), "artifact_dir": str(scratch.artifacts)}

    def handle(self, message: dict[str, Any], scratch: Scratch) -> None:
        kind = message.get("t")
        if kind == "device":
            self._set_device_info()
        elif kind == "assets":
            self._record_data_source([tuple(a) for a in message["assets"]])
        elif kind == "entry":
            self._write_entry(message, scratch)

    def finished(self, status: str, error: dict[str, str] | None) -> None:
        with self.rt.sessions() as s:
            ev = s.get(Evaluation, self.id)
            webhook = ev.webhook_url if ev is not None and ev.attempts == self.token else None
        if webhook and self.send_task is not None:
            try:
                self.send_task(WEBHOOK_TASK, args=[str(self.id)])
            except Exception:
                log.warning("could not enqueue the webhook for %s", self.id, exc_info=True)

    def _set_device_info(self) -> None:
        with self.rt.sessions.begin() as s:
            s.execute(update(Evaluation).where(Evaluation.id == self.id,
                                               Evaluation.attempts == self.token)
                      .values(device=device_info(self.rt, self.rt.describe_device()),
                              engine_version=ENGINE_VERSION)
                      .execution_options(synchronize_session=False))

    def _record_data_source(self, assets: list[tuple[Any, ...]]) -> None:
        """Say what drew a built-in's pictures (installed art or the procedural fallback):
        the API cannot know what a worker has installed, and results are comparable only
        within one."""
        detail = ", ".join(f"{part}: {kind}" for part, kind in assets)
        note = {"name": "dataset_assets", "passed": True, "detail": f"{self.dataset} {detail}",
                "params": {str(part): kind for part, kind in assets}, "entry": None}
        with self.rt.sessions.begin() as s:
            ev = s.get(Evaluation, self.id)
            if ev is not None and ev.attempts == self.token and not any(
                    c.get("name") == "dataset_assets" for c in ev.checks):
                ev.checks = [*ev.checks, note]

    def _write_entry(self, message: dict[str, Any], scratch: Scratch) -> None:
        """Rows, checks, artifacts and the entry's completion in one transaction, fenced by
        the attempt."""
        index = int(message["index"])
        data_dir = self.rt.settings.data_dir
        artifacts: dict[str, str] = {}
        for name, rel in message["artifacts"].items():
            src = (scratch.host_artifacts / rel).resolve()
            if not src.is_relative_to(scratch.host_artifacts.resolve()) or not src.is_file():
                continue  # a path the engine did not write
            dst = data_dir / "artifacts" / str(self.id) / rel
            if src != dst.resolve():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
            artifacts[f"entry-{index}/{name}"] = str(dst.relative_to(data_dir))
        with self.rt.sessions.begin() as s:
            ev = s.scalar(select(Evaluation).where(Evaluation.id == self.id).with_for_update())
            if ev is None or ev.attempts != self.token or ev.status != "running":
                raise Superseded("the job changed hands before its results were written")
            for row in message["rows"]:
                params = dict(row["params"])
                s.add(Result(evaluation_id=self.id, entry_index=index,
                             benchmark=row["benchmark"], metric=row["metric"],
                             value=float(row["value"]), params=params,
                             params_key=json.dumps(params, sort_keys=True)))
            ev.checks = [*ev.checks, *[{**c, "entry": index} for c in message["checks"]]]
            ev.artifacts = {**ev.artifacts, **artifacts}
            ev.completed_entries = sorted({*ev.completed_entries, index})
            ev.timings = {**ev.timings, f"{index}:{self.suite[index]['benchmark']}":
                          round(float(message["seconds"]), 3)}
        self.completed.add(index)
