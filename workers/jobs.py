"""Running one evaluation job: claim it, supervise it, run the suite, record the outcome.

Postgres is the source of truth. A job is *claimed* by an atomic update that also counts the
attempt; that attempt number is a fencing token every later write checks, so a worker that
lost its job (its heartbeat went stale and another worker took over) cannot write results.
Results are written per suite entry, in the same transaction that marks the entry done, so a
restarted job resumes after the last finished entry and no result is written twice.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import DBAPIError

from service.queue import WEBHOOK_TASK
from service.tables import Dataset, Evaluation, Model, Result, Training, utcnow
from workers.engine import ENGINE_VERSION, benchmarks
from workers.engine.data import DatasetFormatError, load_builtin, load_npz
from workers.engine.models import CheckpointError, ModelSpec
from workers.engine.models import load as load_model
from workers.engine.scope import scoped
from workers.engine.types import (
    BenchmarkError,
    BenchmarkResult,
    Cancelled,
    EvalData,
    RunContext,
)
from workers.runtime import Runtime

log = logging.getLogger("robustscope.worker")


class Superseded(Cancelled):
    """Another worker owns this job now; stop without writing anything."""


class TimeLimit(Exception):
    pass


class JobRef(Protocol):
    """What the supervisor needs of a job: its id and the attempt that owns it."""

    id: uuid.UUID
    token: int


@dataclass
class Job:
    id: uuid.UUID
    token: int  # the attempt number that owns the job
    suite: list[dict[str, Any]]
    completed: set[int]
    seed: int
    model_path: Path
    model_spec: ModelSpec
    dataset: str
    dataset_path: Path | None
    dataset_params: dict[str, Any]
    split: str
    options: dict[str, Any] | None = None  # n_examples, class_map


JobTable = type[Evaluation] | type[Training]
"""The job tables share the columns claim, supervision and failure need."""


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


def load_job(rt: Runtime, eid: uuid.UUID, token: int) -> Job:
    with rt.sessions() as s:
        ev = s.get(Evaluation, eid)
        assert ev is not None
        model = s.get(Model, ev.model_id) if ev.model_id else None
        if model is None:
            raise CheckpointError("the model of this evaluation was deleted")
        dataset_path = None
        if ev.dataset_id is not None:
            ds = s.get(Dataset, ev.dataset_id)
            if ds is None:
                raise BenchmarkError("the dataset of this evaluation was deleted")
            dataset_path = rt.settings.data_dir / ds.storage_path
        return Job(
            id=eid, token=token, suite=list(ev.suite), completed=set(ev.completed_entries or []),
            seed=ev.seed, model_path=rt.settings.data_dir / model.storage_path,
            model_spec=ModelSpec.from_metadata(model.format, model.model_metadata),
            dataset=ev.dataset, dataset_path=dataset_path,
            dataset_params=dict(ev.dataset_params or {}), split=ev.split,
            options=dict(ev.options or {}),
        )


class Supervisor:
    """Heartbeats, progress writes and cancellation, off the engine's hot loop.

    The engine calls :meth:`progress` between batches; that only stores the latest value and
    raises if the job was cancelled, superseded or ran out of time. A thread writes progress
    and heartbeats to the database and reads the cancel flag.
    """

    def __init__(self, rt: Runtime, job: Job | JobRef,
                 table: JobTable = Evaluation) -> None:
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
        if self.superseded.is_set():
            raise Superseded("another worker took over this job")
        if self.cancelled.is_set():
            raise Cancelled("cancelled by the user")
        if time.monotonic() > self.deadline:
            raise TimeLimit(f"the job ran past its time limit of {self.rt.settings.job_time_limit}"
                            " s")

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
                                  progress_message=latest[2])
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


def run(rt: Runtime, eid: uuid.UUID, send_task: Any = None) -> str:
    """Run evaluation ``eid`` if this worker can claim it; returns what happened."""
    token = claim(rt, eid)
    if token is None:
        _fail_exhausted(rt, eid)
        return "skipped"
    try:
        job = load_job(rt, eid, token)
    except _JOB_ERRORS as exc:
        _finish(rt, eid, token, "failed", send_task, error=_error(exc))
        return "failed"
    with Supervisor(rt, job) as sup:
        status, error = "succeeded", None
        try:
            _run_suite(rt, job, sup)
        except Superseded:
            log.warning("evaluation %s was taken over by another worker; stopping", eid)
            return "superseded"
        except DBAPIError:
            # The database went away mid-job: leave the job running. Its heartbeat goes stale
            # and the reconciler re-sends it once the database is back; it then resumes.
            log.warning("database error during evaluation %s; it will be resumed", eid,
                        exc_info=True)
            raise
        except Cancelled:
            status = "cancelled"
        except _JOB_ERRORS as exc:
            status, error = "failed", _error(exc)
        except Exception as exc:  # a crash in user code or the engine is reported, not lost
            log.exception("evaluation %s crashed", eid)
            status, error = "failed", {"type": "internal-error",
                                       "detail": f"{type(exc).__name__}: {exc}"}
    _finish(rt, eid, token, status, send_task, error=error)
    return status


# Errors that fail a job with a typed, user-facing error (anything else is "internal-error").
_ERROR_TYPES: dict[type[Exception], str] = {
    CheckpointError: "checkpoint-error", BenchmarkError: "benchmark-error",
    DatasetFormatError: "dataset-error", TimeLimit: "time-limit",
    SoftTimeLimitExceeded: "time-limit",
}
_JOB_ERRORS = tuple(_ERROR_TYPES)


def _error(exc: BaseException) -> dict[str, str]:
    for cls, name in _ERROR_TYPES.items():
        if isinstance(exc, cls):
            return {"type": name, "detail": str(exc) or cls.__name__}
    return {"type": "internal-error", "detail": str(exc)}


def _load_data(rt: Runtime, job: Job) -> EvalData:
    if job.dataset_path is not None:
        return load_npz(job.dataset_path, job.split)
    return load_builtin(job.dataset, job.split, **job.dataset_params)


def _run_suite(rt: Runtime, job: Job, sup: Supervisor) -> None:
    n = len(job.suite)
    sup.progress(len(job.completed) / n, "loading", "loading the model and the data")
    model: torch.nn.Module = load_model(job.model_path, job.model_spec, rt.device)
    data = _load_data(rt, job)
    if data.x.shape[1:] != tuple(job.model_spec.input_shape):
        raise BenchmarkError(f"the data has shape {list(data.x.shape[1:])} but the model takes "
                             f"{list(job.model_spec.input_shape)}")
    opts = job.options or {}
    model, data = scoped(model, data, n_examples=opts.get("n_examples"),
                         class_map=opts.get("class_map"), seed=job.seed, device=rt.device)
    _set_device_info(rt, job)
    _record_data_source(rt, job, data)
    artifact_dir = rt.settings.data_dir / "artifacts" / str(job.id)
    for i, entry in enumerate(job.suite):
        if i in job.completed:
            continue
        name = entry["benchmark"]
        params = {k: v for k, v in entry.items() if k != "benchmark"}

        def progress(fraction: float, message: str, i: int = i, name: str = name) -> None:
            sup.progress((i + fraction) / n, name, message)

        progress(0.0, f"starting {name}")
        ctx = RunContext(
            device=rt.device, seed=job.seed, batch_size=rt.settings.batch_size,
            amp=rt.bf16_search, progress=progress,
            state_dir=rt.settings.data_dir / "state" / str(job.id) / f"entry-{i}",
            artifact_dir=artifact_dir / f"entry-{i}",
        )
        ctx.state_dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
        ctx.artifact_dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
        start = time.perf_counter()
        result = benchmarks.run(name, model, data, params, ctx)
        _write_entry(rt, job, i, result, time.perf_counter() - start)


def _record_data_source(rt: Runtime, job: Job, data: EvalData) -> None:
    """Say what drew a built-in's pictures (installed art or the procedural fallback): the API
    cannot know what a worker has installed, and results are comparable only within one."""
    assets = getattr(data.source, "assets", None)
    if not assets:
        return
    detail = ", ".join(f"{part}: {kind}" for part, kind in assets)
    note = {"name": "dataset_assets", "passed": True, "detail": f"{job.dataset} {detail}",
            "params": dict(assets), "entry": None}
    with rt.sessions.begin() as s:
        ev = s.get(Evaluation, job.id)
        if ev is not None and ev.attempts == job.token and not any(
                c.get("name") == "dataset_assets" for c in ev.checks):
            ev.checks = [*ev.checks, note]


def _set_device_info(rt: Runtime, job: Job) -> None:
    with rt.sessions.begin() as s:
        s.execute(update(Evaluation).where(Evaluation.id == job.id,
                                           Evaluation.attempts == job.token)
                  .values(device=rt.describe_device(), engine_version=ENGINE_VERSION)
                  .execution_options(synchronize_session=False))


def _write_entry(rt: Runtime, job: Job, index: int, result: BenchmarkResult,
                 seconds: float) -> None:
    """Rows, checks and the entry's completion in one transaction, fenced by the attempt."""
    with rt.sessions.begin() as s:
        ev = s.scalar(select(Evaluation).where(Evaluation.id == job.id).with_for_update())
        if ev is None or ev.attempts != job.token or ev.status != "running":
            raise Superseded("the job changed hands before its results were written")
        for row in result.rows:
            params = dict(row.params)
            s.add(Result(evaluation_id=job.id, entry_index=index, benchmark=row.benchmark,
                         metric=row.metric, value=float(row.value), params=params,
                         params_key=json.dumps(params, sort_keys=True)))
        ev.checks = [*ev.checks, *[{**c.as_dict(), "entry": index} for c in result.checks]]
        ev.artifacts = {**ev.artifacts, **{
            f"entry-{index}/{name}": str(path.relative_to(rt.settings.data_dir))
            for name, path in result.artifacts.items()}}
        ev.completed_entries = sorted({*ev.completed_entries, index})
        ev.timings = {**ev.timings, f"{index}:{job.suite[index]['benchmark']}": round(seconds, 3)}
    job.completed.add(index)


def _finish(rt: Runtime, eid: uuid.UUID, token: int, status: str, send_task: Any,
            error: dict[str, str] | None = None) -> None:
    with rt.sessions.begin() as s:
        ev = s.get(Evaluation, eid)
        if ev is None or ev.attempts != token:
            return
        ev.status, ev.error, ev.finished_at = status, error, utcnow()
        ev.progress_stage = status
        if status == "succeeded":
            ev.progress_fraction, ev.progress_message = 1.0, "done"
        elif status == "cancelled":
            ev.progress_message = "cancelled by the user"
        else:
            ev.progress_message = (error or {}).get("detail", "failed")[:500]
        webhook = ev.webhook_url
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if webhook and send_task is not None:
        try:
            send_task(WEBHOOK_TASK, args=[str(eid)])
        except Exception:
            log.warning("could not enqueue the webhook for %s", eid, exc_info=True)


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
