"""Alembic: upgrade from empty and downgrade to base on SQLite and Postgres; no model drift."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from core.db import Base, make_engine
from core.migrate import downgrade, upgrade

TABLES = {"api_keys", "models", "datasets", "evaluations", "results", "trainings", "sweeps",
          "browser_sessions", "share_links", "evaluation_shards", "workers_seen",
          "alembic_version"}


def _roundtrip(url: str) -> None:
    upgrade(url)
    engine = make_engine(url)
    assert set(inspect(engine).get_table_names()) == TABLES
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"the ORM and the migrations disagree: {diff}"
    downgrade(url)
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    upgrade(url)
    assert set(inspect(engine).get_table_names()) == TABLES
    engine.dispose()


def test_sqlite_upgrade_downgrade(tmp_path: Path) -> None:
    _roundtrip(f"sqlite:///{tmp_path / 'm.db'}")


@pytest.mark.services
def test_postgres_upgrade_downgrade(empty_pg_url: str) -> None:
    _roundtrip(empty_pg_url)
