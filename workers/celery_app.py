"""The Celery application the workers run (``robustscope worker``)."""

from __future__ import annotations

from typing import Any

from celery.signals import worker_ready, worker_shutdown

from core.queue import make_celery
from core.settings import get_settings

app = make_celery(get_settings())
app.conf.imports = ("workers.tasks",)

_reconciler: dict[str, Any] = {}


@worker_ready.connect
def _start_reconciler(**_: Any) -> None:
    from workers import reconciler
    from workers.runtime import runtime

    _reconciler["stop"] = reconciler.start(runtime(), app.send_task)


@worker_shutdown.connect
def _stop_reconciler(**_: Any) -> None:
    stop = _reconciler.pop("stop", None)
    if stop is not None:
        stop.set()
