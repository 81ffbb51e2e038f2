"""Fixtures of the service tests: the API on a migrated database (each kind in turn, or one a
module names) with an owner's key; an S3-compatible store (moto's standalone server on a free
port of 127.0.0.1, started by the first test that needs it) and a fresh bucket per test,
reached through the usual AWS variables."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from core.objectstore import open_store
from tests.factories import api, new_key, settings
from tests.service.servers import free_port


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """The API tests' database: SQLite, then the session's Postgres (a module that needs only
    SQLite returns ``sqlite_url`` from its own ``db_url``)."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
def client(db_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with api(settings(db_url, tmp_path)) as c:
        yield c


@pytest.fixture
def owner() -> str:
    return f"alice-{uuid.uuid4().hex[:8]}"  # the Postgres database is shared


@pytest.fixture
def key(db_url: str, owner: str) -> str:
    """An API key of ``owner``."""
    return new_key(db_url, owner)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_url(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the test's S3 server, reached through the usual AWS variables."""
    import boto3

    for name, value in (("AWS_ENDPOINT_URL", s3_endpoint), ("AWS_ACCESS_KEY_ID", "test"),
                        ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    bucket = f"rs-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    open_store.cache_clear()
    return f"s3://{bucket}/deploy-1"
