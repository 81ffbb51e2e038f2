"""The API application: ``create_app(settings)`` wires routers, errors and shared state."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic.json_schema import models_json_schema
from sqlalchemy.exc import OperationalError

from core.db import make_engine, make_sessionmaker, transaction
from core.keys import KeyCache, ensure_key
from core.queue import make_celery
from core.settings import Settings, get_settings
from service.auth import login
from service.auth.router import router as keys_router
from service.auth.shares import router as shares_router
from service.datasets.router import router as datasets_router
from service.evaluations import service as evaluations
from service.evaluations.router import router as evaluations_router
from service.evaluations.schemas import EvaluationIn, EvaluationUpload
from service.http import problems
from service.http.guard import Guard
from service.http.polling import hot_route, records
from service.leaderboard.router import router as leaderboard_router
from service.models.router import router as models_router
from service.ops.router import make_registry
from service.ops.router import router as ops_router
from service.pages import docs
from service.pages.home import router as home_router
from service.sweeps.router import router as sweeps_router
from service.sweeps.shared import router as shared_router
from service.theory.router import router as theory_router
from service.trainings import service as trainings
from service.trainings.router import router as trainings_router

log = logging.getLogger("robustscope.api")

VERSION = "0.1.0"

#: The jobs whose records the polling path serves, by their path.
POLLED = {"evaluations": evaluations.POLLED, "trainings": trainings.POLLED}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.database_url, pool_size=settings.db_pool_size,
                             max_overflow=settings.db_max_overflow)
        app.state.engine = engine
        app.state.records = records(engine, POLLED, settings.db_poll_connections)
        app.state.sessionmaker = make_sessionmaker(engine)
        app.state.keys = KeyCache(engine, settings.auth_cache_seconds)
        app.state.celery = make_celery(settings)
        app.state.metrics_registry = make_registry(app)
        if settings.bootstrap_key:
            try:
                with transaction(app.state.sessionmaker) as session:
                    ensure_key(session, "admin", settings.bootstrap_key)
            except OperationalError:
                log.warning("database unavailable at start-up; bootstrap key not registered")
        yield
        await app.state.records.close()
        engine.dispose()

    app = FastAPI(title="robustscope", version=VERSION, lifespan=lifespan, docs_url=None,
                  generate_unique_id_function=_operation_id,
                  description="Adversarial and natural distributional robustness of image "
                              "classifiers, measured side by side.")
    app.state.settings = settings
    problems.install(app)
    login.install(app)
    docs.install(app)  # Swagger UI from a package, so /docs works offline

    app.add_middleware(Guard, settings=settings,
                       authenticate=lambda key: app.state.keys.verify(key),
                       hot_routes=[hot_route])

    _document_hand_parsed_bodies(app)
    for router in (home_router, login.router, keys_router, shares_router, shared_router,
                   models_router, datasets_router, evaluations_router, trainings_router,
                   sweeps_router, leaderboard_router, theory_router, ops_router):
        app.include_router(router)
    return app


def _operation_id(route: APIRoute) -> str:
    """A route's operationId is its function's name (``upload_model``), so generated clients
    name their calls after the operation."""
    return route.name


def _document_hand_parsed_bodies(app: FastAPI) -> None:
    """``POST /evaluations`` takes JSON or a multipart form on one route, so it reads its body
    itself; its two schemas are added to the OpenAPI components it references. File fields of
    multipart forms are marked ``format: binary`` as well, the form client generators read."""
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default()
            _, defs = models_json_schema(
                [(EvaluationIn, "validation"), (EvaluationUpload, "validation")],
                ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(
                defs.get("$defs", {}))
            _mark_file_fields(schema["components"]["schemas"])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _mark_file_fields(schemas: dict[str, Any]) -> None:
    """FastAPI describes an ``UploadFile`` as a string with a ``contentMediaType``; add the
    ``format: binary`` that OpenAPI 3.0 tools (and most client generators) look for."""
    for schema in schemas.values():
        for prop in schema.get("properties", {}).values():
            if prop.get("type") == "string" and "contentMediaType" in prop:
                prop.setdefault("format", "binary")
