"""Re-send jobs the broker lost, from the database (the source of truth).

Two cases: a job still ``queued`` long after it was sent (the broker restarted without
persistence, or the send failed), and a ``running`` job whose worker stopped heart-beating
(killed mid-run). Re-sending is safe: a worker runs a job only if it can claim it. Shards are
jobs like any other; a sharded evaluation whose shards are all final is settled
(:func:`workers.shard_jobs.settle`) in case the worker that finished the last one died before
it could. Each round also records this worker as live, if it serves evaluations.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update

from core.queue import EVALUATE_TASK, EVALUATIONS_QUEUE, INGEST_TASK, SHARD_TASK, TRAIN_TASK
from core.tables import Dataset, Evaluation, EvaluationShard, Training, WorkerSeen, utcnow
from workers.runtime import Runtime

log = logging.getLogger("robustscope.reconciler")


def reconcile_once(rt: Runtime, send_task: Callable[..., Any]) -> list[str]:
    """Re-send lost evaluations, trainings and dataset ingests; returns their ids."""
    resent: list[str] = []
    _seen(rt)
    for table, task in ((Evaluation, EVALUATE_TASK), (Training, TRAIN_TASK),
                        (EvaluationShard, SHARD_TASK)):
        resent += _reconcile(rt, send_task, table, task)
    _settle_sharded(rt, send_task)
    return resent + _reconcile_ingests(rt, send_task)


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
            Evaluation.status == "running", Evaluation.shards > 1,
            Evaluation.heartbeat_at.is_(None),
            or_(Evaluation.enqueued_at.is_(None), Evaluation.enqueued_at < cutoff)).limit(100)))
    for eid in ids:
        settle(rt, eid, send_task)


def _reconcile_ingests(rt: Runtime, send_task: Callable[..., Any]) -> list[str]:
    """Uploads still ``ingesting`` long after their ingest was sent. A re-sent ingest that
    meets one still running only repeats work: the first to finish decides the state."""
    now = utcnow()
    cutoff = now - timedelta(seconds=rt.settings.requeue_queued_after)
    with rt.sessions.begin() as s:
        q = select(Dataset.id).where(Dataset.status == "ingesting",
                                     Dataset.enqueued_at < cutoff).limit(100)
        if rt.engine.dialect.name == "postgresql":
            q = q.with_for_update(skip_locked=True)
        ids = list(s.scalars(q))
        if ids:
            s.execute(update(Dataset).where(Dataset.id.in_(ids)).values(enqueued_at=now)
                      .execution_options(synchronize_session=False))
    resent = [str(i) for i in ids]
    for did in resent:
        try:
            send_task(INGEST_TASK, args=[did])
            log.info("re-sent dataset ingest %s", did)
        except Exception:
            log.warning("could not re-send ingest %s; will retry", did, exc_info=True)
    return resent


def _reconcile(rt: Runtime, send_task: Callable[..., Any],
               table: type[Evaluation] | type[Training] | type[EvaluationShard],
               task: str) -> list[str]:
    now = utcnow()
    s_cfg = rt.settings
    queued_cutoff = now - timedelta(seconds=s_cfg.requeue_queued_after)
    stale_cutoff = now - timedelta(seconds=s_cfg.stale_after)
    resent: list[str] = []
    with rt.sessions.begin() as s:
        queued = and_(table.status == "queued", table.enqueued_at < queued_cutoff)
        if table is Evaluation:  # a sharded one's shards are sent, not the evaluation
            queued = and_(queued, Evaluation.shards == 1)
        q = select(table.id).where(or_(
            queued,
            and_(table.status == "running", table.heartbeat_at < stale_cutoff,
                 or_(table.enqueued_at.is_(None), table.enqueued_at < stale_cutoff)),
        )).limit(100)
        if rt.engine.dialect.name == "postgresql":
            q = q.with_for_update(skip_locked=True)
        ids = list(s.scalars(q))
        if ids:
            s.execute(update(table).where(table.id.in_(ids)).values(enqueued_at=now)
                      .execution_options(synchronize_session=False))
        resent = [str(i) for i in ids]
    for eid in resent:
        try:
            send_task(task, args=[eid])
            log.info("re-sent %s %s", table.__tablename__, eid)
        except Exception:
            log.warning("could not re-send %s; will retry", eid, exc_info=True)
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
