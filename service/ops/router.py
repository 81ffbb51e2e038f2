"""Liveness, readiness (database and broker) and Prometheus metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text

from contract.jobs import JobStatus
from core.errors import Unauthorized, problem_responses
from core.tables import Evaluation
from service.http.guard import bearer_key
from service.http.problems import problem

router = APIRouter(tags=["operations"])


@router.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


def _operator(request: Request) -> bool:
    """Whether the caller may see operational detail: a valid key, or ``metrics_public``."""
    if request.app.state.settings.metrics_public:
        return True
    key = bearer_key(request.headers)
    if key is None:
        return False
    try:
        request.app.state.keys.verify(key)
    except Unauthorized:
        return False
    return True


@router.get("/ready")
def ready(request: Request) -> JSONResponse:
    """Readiness of the database and the broker. Without a key only the verdict is shown:
    the drivers' errors name hosts and ports."""
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
    shown = checks if _operator_or_down(request, checks) else {
        k: "ok" if v == "ok" else "unavailable" for k, v in checks.items()}
    # Whether workers of this deployment jail models (ROBUSTSCOPE_SANDBOX; each job's
    # ``device`` says what the worker that ran it did).
    sandbox = request.app.state.settings.sandbox
    if ok:
        return JSONResponse({"status": "ready", "checks": shown, "sandbox": sandbox})
    down = ", ".join(k for k, v in checks.items() if v != "ok")
    return problem(503, "not-ready", "Not ready", f"unavailable: {down}", checks=shown,
                   sandbox=sandbox)


def _operator_or_down(request: Request, checks: dict[str, Any]) -> bool:
    if checks.get("database") != "ok":
        # Keys cannot be checked without the database; only the metrics_public setting shows
        # detail then.
        return bool(request.app.state.settings.metrics_public)
    return _operator(request)


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
        for status in JobStatus:
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


@router.get("/metrics", response_class=PlainTextResponse, responses={
    **problem_responses(401),
    200: {"description": "the Prometheus text exposition format", "content": {
        "text/plain": {"schema": {"type": "string"}}}}})
def metrics(request: Request) -> Response:
    """Prometheus metrics (job counts across owners): for a valid key, or for anyone when
    ``ROBUSTSCOPE_METRICS_PUBLIC`` is set."""
    if not _operator(request):
        raise Unauthorized("send 'Authorization: Bearer <api key>' (or set "
                           "ROBUSTSCOPE_METRICS_PUBLIC for an operator's scraper)")
    return Response(generate_latest(request.app.state.metrics_registry),
                    media_type=CONTENT_TYPE_LATEST)
