"""A cancel through the API stops a running job between heartbeats: the job's jailed child is
killed and its status ``cancelled`` long before the next heartbeat would have carried the flag
(workers/jobs.py, Supervisor: the flag is read alone every ``CANCEL_POLL_INTERVAL``, and with
every progress write).

The heartbeat here is 30 s, so a worker that read the flag only with heartbeats would take
about 30 s; the bound is a third of that, far from what scheduling on a loaded machine adds.
How long a cancel takes (about half a second) is measured by ``benchmarks/cancel_latency.py``
against a heartbeat-only reference in the same run, not timed here.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

from core.db import make_engine, make_sessionmaker
from core.settings import Settings
from core.tables import Evaluation, Training
from tests.factories import api, auth, new_key, settings
from tests.factories import torchscript_bytes as scripted
from tests.service.test_sandbox import Spins, _job
from tests.service.test_training_jobs import SPEC
from workers import evaluation_jobs, training_jobs
from workers.runtime import Runtime

pytestmark = pytest.mark.slow

#: Long enough that the flag read with heartbeats alone is unmistakable.
HEARTBEAT = 30.0
#: A cancel is recorded within this many seconds of the request, a third of the heartbeat.
BOUND = HEARTBEAT / 3


def _runtime(sqlite_url: str, data_dir: Path) -> Runtime:
    cfg = settings(sqlite_url, data_dir, heartbeat_interval=HEARTBEAT, stale_after=4 * HEARTBEAT,
                   job_time_limit=300.0, sandbox_memory_limit=8 << 30)
    assert cfg.cancel_poll_interval == Settings().cancel_poll_interval  # production's
    engine = make_engine(sqlite_url)
    return Runtime(settings=cfg, engine=engine, sessions=make_sessionmaker(engine),
                   device=torch.device("cpu"), name="test-worker")


def _row(rt: Runtime, table: type[Evaluation] | type[Training], jid: uuid.UUID) -> Evaluation:
    with rt.sessions() as s:
        row = s.get(table, jid)
        assert row is not None
        return row  # type: ignore[return-value]


def _wait(what: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _naive_utc(when: datetime) -> datetime:
    return when.astimezone(UTC).replace(tzinfo=None) if when.tzinfo else when


def test_a_cancel_stops_a_running_evaluation_between_heartbeats(
        sqlite_url: str, tmp_path: Path) -> None:
    rt = _runtime(sqlite_url, tmp_path / "data")
    key = new_key(sqlite_url, "mallory")
    eid = _job(rt, scripted(Spins()))  # its forward pass never returns
    outcome: dict[str, str] = {}
    worker = threading.Thread(
        target=lambda: outcome.setdefault("r", evaluation_jobs.run(rt, eid)))
    try:
        with api(rt.settings) as client:
            worker.start()
            # The stage "loading" came with a write (and its heartbeat); the progress stays
            # still inside the endless forward pass, so the next write is the heartbeat's,
            # HEARTBEAT seconds later.
            _wait(lambda: _row(rt, Evaluation, eid).progress_stage == "loading", 120)
            time.sleep(0.5)  # inside the endless forward pass
            beat = _row(rt, Evaluation, eid).heartbeat_at
            asked = datetime.now(UTC).replace(tzinfo=None)
            began = time.monotonic()
            resp = client.post(f"/evaluations/{eid}/cancel", headers=auth(key))
            assert resp.status_code == 202
            assert resp.json()["status"] == "running"  # the running job is asked to stop
            worker.join(timeout=HEARTBEAT)
            returned = time.monotonic() - began
        assert outcome["r"] == "cancelled"
        row = _row(rt, Evaluation, eid)
        assert row.status == "cancelled"
        assert row.finished_at is not None
        recorded = (_naive_utc(row.finished_at) - asked).total_seconds()
        measured = (f"cancel recorded {recorded:.3f} s after the request; the worker returned "
                    f"(child killed and reaped) {returned:.3f} s after it")
        assert row.heartbeat_at == beat, measured  # the flag was read alone, between beats
        assert 0 < recorded <= BOUND, measured
        assert returned <= BOUND, measured
    finally:
        worker.join(timeout=HEARTBEAT)
        if rt._jail is not None:
            rt._jail.close()


def test_a_cancel_stops_a_running_training_between_heartbeats(
        sqlite_url: str, tmp_path: Path) -> None:
    """The same supervisor stops trainings (progress writes read the flag too)."""
    rt = _runtime(sqlite_url, tmp_path / "data")
    key = new_key(sqlite_url, "alice")
    outcome: dict[str, str] = {}
    try:
        with api(rt.settings) as client:
            resp = client.post("/trainings", headers=auth(key),
                               json={**SPEC, "epochs": 200, "train_examples": 256})
            assert resp.status_code == 202, resp.text
            tid = uuid.UUID(resp.json()["id"])
            worker = threading.Thread(
                target=lambda: outcome.setdefault("r", training_jobs.run(rt, tid)))
            worker.start()
            _wait(lambda: (_row(rt, Training, tid).progress_message or "").startswith(
                "epoch 1/"), 180)  # training, in its first epoch
            asked = datetime.now(UTC).replace(tzinfo=None)
            began = time.monotonic()
            resp = client.post(f"/trainings/{tid}/cancel", headers=auth(key))
            assert resp.status_code == 202
            assert resp.json()["status"] == "running"
            worker.join(timeout=HEARTBEAT)
            returned = time.monotonic() - began
        assert outcome["r"] == "cancelled"
        row = _row(rt, Training, tid)
        assert row.status == "cancelled"
        assert row.finished_at is not None
        recorded = (_naive_utc(row.finished_at) - asked).total_seconds()
        measured = f"cancel recorded {recorded:.3f} s after the request"
        assert 0 < recorded <= BOUND, measured
        assert returned <= BOUND, measured
    finally:
        if rt._jail is not None:
            rt._jail.close()
