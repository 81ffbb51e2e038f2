"""Shared fixtures: real databases (a fresh SQLite file, or a Postgres database per run)."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from service.migrate import upgrade

PG_ADMIN = os.environ.get("ROBUSTSCOPE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("ROBUSTSCOPE_TEST_REDIS", "redis://127.0.0.1:6379")


def _pg_available() -> bool:
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite database, copied for each test that needs a fresh one."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    path = tmp_path / "robustscope.db"
    shutil.copy(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A Postgres database created for this test run and dropped after it."""
    if not _pg_available():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN}; .ci/run starts it")
        pytest.skip("PostgreSQL is not reachable")
    name = f"robustscope_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0]
    url = f"postgresql+psycopg://{base.split('://', 1)[1]}/{name}"
    upgrade(url)
    yield url
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_pg_url(pg_url: str) -> Iterator[str]:
    """A second, empty Postgres database (for migration tests)."""
    name = f"robustscope_mig_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield pg_url.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# Modules left out of the fast tier (``./scripts/test --fast``): attack strength against
# references, training to a measured accuracy, whole worker paths, jailed children, a browser,
# private database clusters, fuzzing and subprocess scans. CI runs them all.
SLOW_MODULES = frozenset({
    "test_attack_torchattacks.py", "test_attack_bf16.py", "test_attack_linear.py",
    "test_natural_training.py", "test_training_jobs.py", "test_import_rules.py",
    "test_attack_reference.py", "test_sandbox.py", "test_api_hardening.py",
    "test_openapi_fuzz.py", "test_pages_browser.py", "test_reproduce.py",
    "test_reproduction_api.py", "test_ingest_channels.py", "test_training_benchmark.py",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow modules are marked ``slow``. GPU tests run where a CUDA device is present; CI has
    none, so they are skipped there."""
    for item in items:
        if item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        if "pg_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.services)
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
