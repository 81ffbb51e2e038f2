"""Re-send jobs the broker lost, from the database (the source of truth).

Two cases: a job still ``queued`` long after it was sent (the broker restarted without
persistence, or the send failed), and a ``running`` job whose worker stopped heart-beating
(killed mid-run). Re-sending is safe: a worker runs a job only if it can claim it. Shards and
dataset ingests are jobs like any other; a sharded evaluation whose shards are all final is settled
(:func:`workers.shard_jobs.settle`) in case the worker that finished the last one died before
it could. Each round also records this worker as live, if it serves evaluations.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select, update

from contract.jobs import JobStatus
from core.queue import EVALUATE_TASK, EVALUATIONS_QUEUE, INGEST_TASK, SHARD_TASK, TRAIN_TASK
from core.tables import (
    DatasetIngest,
    Evaluation,
    EvaluationShard,
    Training,
    WorkerSeen,
    utcnow,
)
from workers.runtime import Runtime

log = logging.getLogger("robustscope.reconciler")


#: Which rows of a kind were lost, given the cut-offs for queued and for silent work.
Lost = Callable[[Any, datetime, datetime], ColumnElement[bool]]


def _lost_job(table: Any, queued_cutoff: datetime, stale_cutoff: datetime) -> Any:
    """A job still ``queued`` long after it was sent, or ``running`` with a silent worker."""
    return or_(
        and_(table.status == JobStatus.QUEUED, table.enqueued_at < queued_cutoff),
        and_(table.status == JobStatus.RUNNING, table.heartbeat_at < stale_cutoff,
             or_(table.enqueued_at.is_(None), table.enqueued_at < stale_cutoff)))


def _lost_evaluation(table: Any, queued_cutoff: datetime, stale_cutoff: datetime) -> Any:
    """As any job, but a sharded evaluation's shards are sent, never the evaluation itself."""
    return and_(_lost_job(table, queued_cutoff, stale_cutoff),
                or_(table.status != JobStatus.QUEUED, table.shards == 1))


#: What is re-sent: each kind of queued work, the task that runs it, and which rows were lost.
KINDS: tuple[tuple[Any, str, Lost], ...] = (
    (Evaluation, EVALUATE_TASK, _lost_evaluation), (Training, TRAIN_TASK, _lost_job),
    (EvaluationShard, SHARD_TASK, _lost_job), (DatasetIngest, INGEST_TASK, _lost_job))


def reconcile_once(rt: Runtime, send_task: Callable[..., Any]) -> list[str]:
    """Re-send lost evaluations, trainings, shards and dataset ingests; returns their ids."""
    _seen(rt)
    resent = [rid for table, task, lost in KINDS
              for rid in _reconcile(rt, send_task, table, task, lost)]
    _settle_sharded(rt, send_task)
    return resent


def _seen(rt: Runtime) -> None:
    """This worker is live (it serves the evaluations queue): a sharded evaluation's default
    counts the workers seen within ``stale_after``."""
    if EVALUATIONS_QUEUE not in rt.settings.worker_queues.split(","):
        return
    now = utcnow()
    with rt.sessions.begin() as s:
        res = s.execute(update(WorkerSeen).where(WorkerSeen.name == rt.name)
                        .values(seen_at=now).execution_options(synchronize_session=False))
        if res.rowcount == 0:  # type: ignore[attr-defined]
            s.add(WorkerSeen(name=rt.name, seen_at=now))


def _settle_sharded(rt: Runtime, send_task: Callable[..., Any]) -> None:
    """Sharded evaluations in their shards' phase that no merge was sent for lately."""
    from workers.shard_jobs import settle

    cutoff = utcnow() - timedelta(seconds=rt.settings.stale_after)
    with rt.sessions() as s:
        ids = list(s.scalars(select(Evaluation.id).where(
            Evaluation.status == JobStatus.RUNNING, Evaluation.shards > 1,
            Evaluation.heartbeat_at.is_(None),
            or_(Evaluation.enqueued_at.is_(None), Evaluation.enqueued_at < cutoff)).limit(100)))
    for eid in ids:
        settle(rt, eid, send_task)


def _reconcile(rt: Runtime, send_task: Callable[..., Any], table: Any, task: str,
               lost: Lost) -> list[str]:
    now = utcnow()
    queued_cutoff = now - timedelta(seconds=rt.settings.requeue_queued_after)
    stale_cutoff = now - timedelta(seconds=rt.settings.stale_after)
    with rt.sessions.begin() as s:
        q = select(table.id).where(lost(table, queued_cutoff, stale_cutoff)).limit(100)
        if rt.engine.dialect.name == "postgresql":
            q = q.with_for_update(skip_locked=True)
        ids = list(s.scalars(q))
        if ids:
            s.execute(update(table).where(table.id.in_(ids)).values(enqueued_at=now)
                      .execution_options(synchronize_session=False))
    resent = [str(i) for i in ids]
    for rid in resent:
        try:
            send_task(task, args=[rid])
            log.info("re-sent %s %s", table.__tablename__, rid)
        except Exception:
            log.warning("could not re-send %s %s; will retry", table.__tablename__, rid,
                        exc_info=True)
    return resent


def start(rt: Runtime, send_task: Callable[..., Any]) -> threading.Event:
    """Reconcile every ``reconcile_interval`` seconds in a daemon thread; set the event to stop."""
    stop = threading.Event()

    def loop() -> None:
        while True:
            try:
                reconcile_once(rt, send_task)
            except Exception:  # the database may be down; try again next round
                log.warning("reconciliation failed", exc_info=True)
            if stop.wait(rt.settings.reconcile_interval):
                return

    threading.Thread(target=loop, name="reconciler", daemon=True).start()
    return stop
