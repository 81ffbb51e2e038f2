"""Shards of a sharded evaluation: each a job of its own over a slice of the examples.

A shard is claimed, heart-beaten, fenced by its attempt and resumed like any job
(:mod:`workers.jobs`): its child runs the suite's adversarial entries on the examples
``start`` to ``stop`` of the evaluation's set, batched and seeded by blocks of the whole set
(``workers/engine/runner.py``), and its per-example state goes to the store. It writes no
results: when every shard has succeeded, :func:`settle` sends the evaluation itself, whose job
merges the shards' states into the whole set's and runs the suite from them (nothing is
attacked again), so its results are exactly those of the same evaluation run as one job.
Progress, cancellation, the time limit and failure are the evaluation's: a shard's progress
moves the evaluation's, a failed shard fails it (the other shards are cancelled), and the time
limit counts from the evaluation's start.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from contract.jobs import ACTIVE_STATES, FINAL_STATES, JobErrorType, JobStatus, job_error
from contract.suite import dump_entry
from core.jobs import request_cancel
from core.queue import EVALUATE_TASK, WEBHOOK_TASK, Outbox
from core.tables import Evaluation, EvaluationShard, JobTable, utcnow
from service.evaluations.service import shardable
from workers.evaluation_jobs import SHARDS_SHARE, EvaluationWork
from workers.jobs import run_work
from workers.runtime import Runtime
from workers.sandbox.protocol import EvaluateJob
from workers.work import JobFailed, Scratch, Sender, Superseded, claimed, sandbox_error

log = logging.getLogger("robustscope.worker")


def run(rt: Runtime, sid: uuid.UUID, send_task: Any = None) -> str:
    """Run shard ``sid`` if this worker can claim it, then settle its evaluation."""
    status = run_work(rt, EvaluationShard, sid,
                      lambda rt, sid, token: ShardWork.load(rt, sid, token, send_task))
    with rt.sessions() as s:
        eid = s.scalar(select(EvaluationShard.evaluation_id).where(EvaluationShard.id == sid))
    if eid is not None:
        settle(rt, eid, send_task)
    return status


@dataclass
class ShardWork:
    rt: Runtime
    id: uuid.UUID
    token: int
    evaluation: EvaluationWork  # what the whole evaluation runs; this shard runs a slice
    index: int
    start: int
    stop: int
    completed: set[int]
    started: datetime | None  # the evaluation's start: its time limit counts from there
    runs: set[int] = field(default_factory=set)  # the entries shards run
    table: JobTable = EvaluationShard
    records_own_success = False

    @classmethod
    def load(cls, rt: Runtime, sid: uuid.UUID, token: int, send_task: Any = None) -> ShardWork:
        now = utcnow()
        with rt.sessions.begin() as s:
            shard = claimed(s, EvaluationShard, sid)
            eid = shard.evaluation_id
            s.execute(update(Evaluation).where(Evaluation.id == eid,
                                               Evaluation.status == JobStatus.QUEUED)
                      .values(status=JobStatus.RUNNING, started_at=now, progress_stage="shards",
                              progress_message="the shards are running")
                      .execution_options(synchronize_session=False))
            started = s.scalar(select(Evaluation.started_at).where(Evaluation.id == eid))
            index, start, stop = shard.index, shard.start, shard.stop
            completed = set(shard.completed_entries or [])
        whole = EvaluationWork.load(rt, eid, 0, send_task)
        runs = set(shardable([dump_entry(e) for e in whole.suite]))
        return cls(rt=rt, id=sid, token=token, evaluation=whole, index=index, start=start,
                   stop=stop, completed=completed, started=started, runs=runs)

    @property
    def state_dir(self) -> Path:
        return self.rt.settings.data_dir / "state" / str(self.id)

    def inputs(self) -> dict[str, Path]:
        return self.evaluation.inputs()

    def describe(self, files: dict[str, str], scratch: Scratch, threads: int,
                 device: str) -> EvaluateJob:
        job = self.evaluation.describe(files, scratch, threads, device)
        others = set(range(len(self.evaluation.suite))) - self.runs
        return job.sliced(self.start, self.stop, completed=sorted(others | self.completed))

    def handle(self, message: dict[str, Any], scratch: Scratch) -> None:
        """A finished entry is recorded as done (no results: the merge reports them); the
        state that goes with it is in the store already."""
        kind = message.get("t")
        if kind == "device":
            with self.rt.sessions.begin() as s:
                s.execute(update(EvaluationShard).where(EvaluationShard.id == self.id,
                                                        EvaluationShard.attempts == self.token)
                          .values(device=self.rt.describe_device())
                          .execution_options(synchronize_session=False))
        elif kind == "entry":
            index = int(message["index"])
            if index not in self.runs or index in self.completed:
                raise JobFailed(sandbox_error(f"the engine child reported entry {index}, "
                                              "which is not one it was asked to run"))
            with self.rt.sessions.begin() as s:
                row = s.scalar(select(EvaluationShard).where(EvaluationShard.id == self.id)
                               .with_for_update())
                if row is None or row.attempts != self.token or row.status != JobStatus.RUNNING:
                    raise Superseded("the shard changed hands before its entry was recorded")
                row.completed_entries = sorted({*row.completed_entries, index})
            self.completed.add(index)

    def on_write(self, session: Session) -> None:
        """With each heartbeat: the evaluation's progress, the mean of its shards'."""
        mean = (select(func.avg(EvaluationShard.progress_fraction))
                .where(EvaluationShard.evaluation_id == self.evaluation.id).scalar_subquery())
        session.execute(update(Evaluation).where(
            Evaluation.id == self.evaluation.id, Evaluation.status == JobStatus.RUNNING,
            Evaluation.heartbeat_at.is_(None))
            .values(progress_fraction=SHARDS_SHARE * mean)
            .execution_options(synchronize_session=False))

    def finished(self, status: str, error: dict[str, str] | None) -> None:
        return None  # run() settles the evaluation, whatever became of this shard


def settle(rt: Runtime, eid: uuid.UUID, send_task: Any = None) -> str | None:
    """Move a sharded evaluation on from its shards' states: a failed shard fails it (and
    cancels the others), shards all final after a cancel cancel it, shards all succeeded send
    it to be merged. Returns what it did, or None. Safe to call from anywhere at any time."""
    outbox = Outbox(Sender(send_task))
    did: str | None = None
    with rt.sessions.begin() as s:
        ev = s.scalar(select(Evaluation).where(Evaluation.id == eid).with_for_update())
        if (ev is None or ev.shards <= 1 or ev.status != JobStatus.RUNNING
                or ev.heartbeat_at is not None):
            return None
        shards = list(s.scalars(select(EvaluationShard).where(
            EvaluationShard.evaluation_id == eid).order_by(EvaluationShard.index)))
        now = utcnow()
        failed = next((sh for sh in shards if sh.status == JobStatus.FAILED), None)
        if failed is not None:
            error = failed.error or job_error(JobErrorType.WORKER_LOST, "the shard was lost")
            detail = f"shard {failed.index} ({failed.start}-{failed.stop}): {error['detail']}"
            ev.status = ev.progress_stage = JobStatus.FAILED.value
            ev.finished_at, ev.error = now, job_error(JobErrorType(error["type"]), detail)
            ev.progress_message = detail[:500]
            for sh in shards:
                if sh.status in ACTIVE_STATES:
                    request_cancel(sh, "shard")
            did = JobStatus.FAILED
        elif all(sh.status in FINAL_STATES for sh in shards):
            if any(sh.status == JobStatus.CANCELLED for sh in shards):
                ev.status = ev.progress_stage = JobStatus.CANCELLED.value
                ev.finished_at = now
                ev.progress_message = "cancelled by the user"
                did = JobStatus.CANCELLED
            else:
                ev.enqueued_at, ev.progress_fraction = now, SHARDS_SHARE
                ev.progress_stage = "merging"
                ev.progress_message = f"{len(shards)} shards done; merging their results"
                outbox.add(EVALUATE_TASK, str(eid))
                did = "merge"
        if did in (JobStatus.FAILED, JobStatus.CANCELLED) and ev.webhook_url:
            outbox.add(WEBHOOK_TASK, str(eid))
    outbox.flush()
    if did:
        log.info("sharded evaluation %s: %s", eid, did)
    return did
