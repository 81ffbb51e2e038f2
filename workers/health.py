"""``python -m workers.health``: the worker container's health check (Dockerfile, compose).

Healthy (exit 0) when what a job needs answers: the database, the broker, and the data folder
with every folder in it writable by this user (the API stores uploads there, the worker writes
datasets, state and artifacts beside them). Otherwise exit 1, one line per problem on stderr.
It does not ask the Celery worker: with ``--pool solo`` a worker busy with a job answers no
control message until the job ends, which is not ill health. Imports neither torch nor the
engine, so a check costs a fraction of a second.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

from kombu import Connection
from sqlalchemy import text

from core.db import make_engine
from core.settings import Settings, get_settings


def _data_problems(data_dir: Path) -> list[str]:
    who = f"uid {os.getuid()}"
    if not data_dir.is_dir():
        return [f"the data folder {data_dir} does not exist"]
    problems = []
    for folder in [data_dir, *sorted(p for p in data_dir.iterdir() if p.is_dir())]:
        if not os.access(folder, os.W_OK | os.X_OK):
            problems.append(f"{folder} is not writable by {who} (owner uid "
                            f"{folder.stat().st_uid})")
    probe = data_dir / f".health-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        problems.append(f"cannot write in {data_dir} as {who}: {exc}")
    return problems


def problems(cfg: Settings) -> list[str]:
    found = _data_problems(cfg.data_dir)
    engine = make_engine(cfg.database_url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error is a failed check, named
        found.append(f"database: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    finally:
        engine.dispose()
    try:
        with Connection(cfg.broker_url, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
    except Exception as exc:
        found.append(f"broker: {type(exc).__name__}: {str(exc)[:200]}")
    try:
        store_problem = cfg.store().check()
    except Exception as exc:  # a malformed URL, a library that cannot start
        store_problem = f"{type(exc).__name__}: {exc}"
    if store_problem:
        found.append(f"storage: {store_problem[:300]}")
    return found


def main() -> int:
    found = problems(get_settings())
    for line in found:
        sys.stderr.write(f"unhealthy: {line}\n")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
