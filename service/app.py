"""The API application: ``create_app(settings)`` wires routers, errors and shared state."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from sqlalchemy.exc import OperationalError

from service import errors
from service.auth.keys import ensure_key
from service.datasets.router import router as datasets_router
from service.db import make_engine, make_sessionmaker, transaction
from service.evaluations.router import router as evaluations_router
from service.leaderboard.router import router as leaderboard_router
from service.models.router import router as models_router
from service.ops.router import make_registry
from service.ops.router import router as ops_router
from service.pages import docs
from service.queue import make_celery
from service.settings import Settings, get_settings
from service.sweeps.router import router as sweeps_router
from service.theory.router import router as theory_router
from service.trainings.router import router as trainings_router

log = logging.getLogger("robustscope.api")

VERSION = "0.1.0"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.database_url)
        app.state.engine = engine
        app.state.sessionmaker = make_sessionmaker(engine)
        app.state.celery = make_celery(settings)
        app.state.metrics_registry = make_registry(app)
        if settings.bootstrap_key:
            try:
                with transaction(app.state.sessionmaker) as session:
                    ensure_key(session, "admin", settings.bootstrap_key)
            except OperationalError:
                log.warning("database unavailable at start-up; bootstrap key not registered")
        yield
        engine.dispose()

    app = FastAPI(title="robustscope", version=VERSION, lifespan=lifespan, docs_url=None,
                  description="Adversarial and natural distributional robustness of image "
                              "classifiers, measured side by side.")
    app.state.settings = settings
    errors.install(app)
    docs.install(app)  # Swagger UI from a package, so /docs works offline

    @app.middleware("http")
    async def limit_body(request: Request,
                         call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """Refuse a body whose declared size is over every upload limit before reading it."""
        length = request.headers.get("content-length")
        limit = max(settings.max_checkpoint_bytes, settings.max_dataset_bytes) + (1 << 20)
        if length and length.isdigit() and int(length) > limit:
            return errors.problem(413, "payload-too-large", "Upload too large",
                                  f"the body is {length} bytes; the limit is {limit}")
        return await call_next(request)

    for router in (models_router, datasets_router, evaluations_router, trainings_router,
                   sweeps_router, leaderboard_router, theory_router, ops_router):
        app.include_router(router)
    return app
