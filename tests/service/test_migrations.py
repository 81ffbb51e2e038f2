"""Alembic: upgrade from empty and downgrade to base on SQLite and Postgres; no model drift."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.orm import Session

from core.db import Base, make_engine
from core.migrate import downgrade, upgrade
from core.tables import Evaluation

TABLES = {"api_keys", "models", "datasets", "evaluations", "results", "trainings", "sweeps",
          "browser_sessions", "share_links", "evaluation_shards", "workers_seen",
          "dataset_ingests", "alembic_version"}


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


def test_an_ingesting_dataset_gets_a_queued_ingest_job(tmp_path: Path) -> None:
    """0010 gives every upload its ingest job: one still ``ingesting`` a queued one, sent when
    the dataset's ingest was (so the reconciler re-sends it), under the dataset's id (so a
    message the broker still holds finds it); a ready one a succeeded one. The evaluations
    that name a dataset still do (SQLite drops the column in place: copying the table would
    null them). Downgrading puts the send time back on the dataset."""
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url, "0009")
    engine = make_engine(url)
    sent = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    ingesting, ready = uuid.uuid4(), uuid.uuid4()
    with engine.begin() as conn:
        for did, status in ((ingesting, "ingesting"), (ready, "ready")):
            conn.execute(text(
                "INSERT INTO datasets (id, owner, name, info, sha256, size_bytes, storage_path,"
                " status, created_at, enqueued_at, finished_at) VALUES (:id, 'o', :name, '{}',"
                " 'ab', 1, 'datasets/x.npz', :status, :at, :at, :done)"),
                {"id": did.hex, "name": status, "status": status, "at": sent,
                 "done": sent if status == "ready" else None})
    with Session(engine) as s, s.begin():
        s.add(Evaluation(id=(evaluation := uuid.uuid4()), owner="o", model_name="m",
                         dataset=str(ready), dataset_id=ready, suite=[], seed=0))
    upgrade(url)
    with engine.connect() as conn:
        jobs = {row.dataset_id: row for row in conn.execute(text(
            "SELECT id, dataset_id, status, attempts, progress_stage, enqueued_at "
            "FROM dataset_ingests"))}
        assert "enqueued_at" not in {c["name"] for c in inspect(conn).get_columns("datasets")}
    assert set(jobs) == {ingesting.hex, ready.hex}
    queued = jobs[ingesting.hex]
    assert (queued.id, queued.status, queued.attempts, queued.progress_stage) == (
        ingesting.hex, "queued", 0, "queued")
    assert datetime.fromisoformat(str(queued.enqueued_at)).replace(tzinfo=UTC) == sent
    assert jobs[ready.hex].status == "succeeded"
    with Session(engine) as s:
        assert s.get_one(Evaluation, evaluation).dataset_id == ready
    downgrade(url, "0009")
    with engine.connect() as conn:
        back = conn.execute(text("SELECT enqueued_at FROM datasets WHERE id = :id"),
                            {"id": ingesting.hex}).scalar_one()
    assert datetime.fromisoformat(str(back)).replace(tzinfo=UTC) == sent
    engine.dispose()
