"""The broker, as the API and the workers see it.

The API only ever *sends* task names with job ids (``send_task``); it never imports the task
code. Sends are buffered during a request and flushed after its transaction commits, so a
worker never receives a job whose row does not exist yet. If the broker is down at that
moment the row stays ``queued`` and the reconciler sends it later.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from celery import Celery

from core.settings import Settings

log = logging.getLogger("robustscope.queue")

EVALUATE_TASK = "robustscope.evaluate"  # an evaluation, or a sharded one's merge
SHARD_TASK = "robustscope.evaluate_shard"  # one shard of a sharded evaluation
TRAIN_TASK = "robustscope.train"  # on the evaluations queue: the GPU workers take both
WEBHOOK_TASK = "robustscope.webhook"
INGEST_TASK = "robustscope.ingest"
EVALUATIONS_QUEUE = "evaluations"
WEBHOOKS_QUEUE = "webhooks"
INGEST_QUEUE = "ingest"  # CPU work: any worker may take it, no GPU needed


def make_celery(settings: Settings) -> Celery:
    app = Celery("robustscope", broker=settings.broker_url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=EVALUATIONS_QUEUE,
        task_routes={EVALUATE_TASK: {"queue": EVALUATIONS_QUEUE},
                     SHARD_TASK: {"queue": EVALUATIONS_QUEUE},
                     TRAIN_TASK: {"queue": EVALUATIONS_QUEUE},
                     WEBHOOK_TASK: {"queue": WEBHOOKS_QUEUE},
                     INGEST_TASK: {"queue": INGEST_QUEUE}},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    if not settings.embedded_broker:
        # Redis redelivers an unacked message after this long; the reconciler acts sooner.
        # (The SQLAlchemy transport passes its options to create_engine, so none there.)
        options: dict[str, Any] = {"visibility_timeout": settings.broker_visibility_timeout}
        if settings.broker_key_prefix:
            options["global_keyprefix"] = settings.broker_key_prefix
        app.conf.broker_transport_options = options
    return app


class TaskSender(Protocol):
    """What the outbox sends through: the Celery app, or a worker's ``send_task``."""

    def send_task(self, name: str, args: list[Any]) -> Any: ...


@dataclass
class Outbox:
    """Tasks to send once the current transaction has committed."""

    celery: TaskSender
    pending: list[tuple[str, list[Any]]] = field(default_factory=list)

    def add(self, task: str, *args: Any) -> None:
        self.pending.append((task, list(args)))

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for task, args in pending:
            try:
                self.celery.send_task(task, args=args)
            except Exception:  # the broker is down: the reconciler re-sends from the database
                log.warning("could not send %s%s now; the reconciler will retry", task, args,
                            exc_info=True)

    def discard(self) -> None:
        self.pending.clear()
