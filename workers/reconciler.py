"""Re-send jobs the broker lost, from the database (the source of truth).

Two cases: a job still ``queued`` long after it was sent (the broker restarted without
persistence, or the send failed), and a ``running`` job whose worker stopped heart-beating
(killed mid-run). Re-sending is safe: a worker runs a job only if it can claim it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, or_, select

from service.queue import EVALUATE_TASK
from service.tables import Evaluation, utcnow
from workers.runtime import Runtime

log = logging.getLogger("robustscope.reconciler")


def reconcile_once(rt: Runtime, send_task: Callable[..., Any]) -> list[str]:
    now = utcnow()
    s_cfg = rt.settings
    queued_cutoff = now - timedelta(seconds=s_cfg.requeue_queued_after)
    stale_cutoff = now - timedelta(seconds=s_cfg.stale_after)
    resent: list[str] = []
    with rt.sessions.begin() as s:
        q = select(Evaluation).where(or_(
            and_(Evaluation.status == "queued", Evaluation.enqueued_at < queued_cutoff),
            and_(Evaluation.status == "running", Evaluation.heartbeat_at < stale_cutoff,
                 or_(Evaluation.enqueued_at.is_(None), Evaluation.enqueued_at < stale_cutoff)),
        )).limit(100)
        if rt.engine.dialect.name == "postgresql":
            q = q.with_for_update(skip_locked=True)
        for ev in s.scalars(q):
            ev.enqueued_at = now
            resent.append(str(ev.id))
    for eid in resent:
        try:
            send_task(EVALUATE_TASK, args=[eid])
            log.info("re-sent evaluation %s", eid)
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
