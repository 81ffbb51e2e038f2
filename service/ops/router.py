"""Liveness, readiness (database and broker) and Prometheus metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text

from service.tables import Evaluation

router = APIRouter(tags=["operations"])


@router.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
def ready(request: Request) -> JSONResponse:
    checks: dict[str, Any] = {}
    try:
        with request.app.state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any driver error means "not ready"; the reason is reported
        checks["database"] = f"unavailable: {type(exc).__name__}: {exc}"[:300]
    try:
        with request.app.state.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:  # kombu raises transport-specific errors
        checks["broker"] = f"unavailable: {type(exc).__name__}: {exc}"[:300]
    ok = all(v == "ok" for v in checks.values())
    if ok:
        return JSONResponse({"status": "ready", "checks": checks})
    down = ", ".join(k for k, v in checks.items() if v != "ok")
    return JSONResponse(
        {"type": "https://robustscope.dev/problems/not-ready", "title": "Not ready",
         "status": 503, "detail": f"unavailable: {down}", "checks": checks},
        status_code=503, media_type="application/problem+json")


class JobCollector(Collector):
    """Job counts by status, read from the database at scrape time."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily("robustscope_evaluations", "Evaluations by status",
                              labels=["status"])
        try:
            with self.app.state.sessionmaker() as s:
                counts = dict(s.execute(select(Evaluation.status, func.count())
                                        .group_by(Evaluation.status)).all())
        except Exception:  # a scrape must not fail because the database is down
            counts = {}
        for status in ("queued", "running", "succeeded", "failed", "cancelled"):
            g.add_metric([status], float(counts.get(status, 0)))
        yield g
        up = GaugeMetricFamily("robustscope_api_start_time_seconds", "API process start time")
        up.add_metric([], self.app.state.started_at)
        yield up


def make_registry(app: Any) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(JobCollector(app))
    app.state.started_at = time.time()
    return registry


@router.get("/metrics")
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics_registry),
                    media_type=CONTENT_TYPE_LATEST)
