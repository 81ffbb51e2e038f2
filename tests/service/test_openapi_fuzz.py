"""Schemathesis over the API's own OpenAPI description, on SQLite and on PostgreSQL: every
operation with generated (and mutated) input, authenticated, must never answer a 5xx.

Bounded so it stays well under a minute per database: a few examples per operation, no
deadline per example (the machine is shared), no stateful phase.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from service.app import create_app
from tests.factories import auth, new_key
from tests.factories import settings as make_settings

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_no_operation_answers_a_server_error(backend: str, request: pytest.FixtureRequest,
                                             tmp_path: Path) -> None:
    url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url")
    key = new_key(url, f"fuzz-{uuid.uuid4().hex[:6]}")
    app = create_app(make_settings(url, tmp_path, max_checkpoint_bytes=1 << 20,
                                   max_dataset_bytes=1 << 20))
    failures: list[str] = []
    calls = 0
    with TestClient(app):  # runs the lifespan: engine, sessions, broker client
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        for result in schema.get_all_operations():
            operation = result.ok()

            @given(case=operation.as_strategy())
            @settings(max_examples=8, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def call(case: Any) -> None:
                nonlocal calls
                calls += 1
                response = case.call(headers=auth(key))
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path} -> "
                                    f"{response.status_code}: {response.text[:300]}")

            call()
    assert calls > 100
    assert failures == []
