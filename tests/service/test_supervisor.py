"""The supervisor's flags between heartbeats (workers/jobs.py, Supervisor): a cancel is seen
within the cancel poll, not on the next heartbeat; a job claimed by another attempt is
superseded; a job this attempt finished itself is neither."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import update

from core.db import make_engine, make_sessionmaker
from core.settings import Settings
from core.tables import Evaluation, Model
from tests.factories import META
from workers.jobs import Supervisor, claim
from workers.runtime import Runtime

HEARTBEAT = 30.0  # no heartbeat falls within a test


@dataclass
class Ref:
    id: uuid.UUID
    token: int


@pytest.fixture
def rt(sqlite_url: str, tmp_path: Path) -> Runtime:
    cfg = Settings(database_url=sqlite_url, data_dir=tmp_path, heartbeat_interval=HEARTBEAT,
                   cancel_poll_interval=0.2, sandbox="off")
    engine = make_engine(sqlite_url)
    return Runtime(settings=cfg, engine=engine, sessions=make_sessionmaker(engine),
                   device=torch.device("cpu"), name="test-worker")


@pytest.fixture
def running(rt: Runtime) -> Iterator[tuple[Supervisor, Callable[..., None]]]:
    model_id = uuid.uuid4()
    with rt.sessions.begin() as s:
        s.add(Model(id=model_id, owner="o", name="m", format="torchscript", num_classes=4,
                    input_shape=[3, 32, 32], model_metadata=META, sha256="0" * 64,
                    size_bytes=1, storage_path="models/m.pt"))
        s.flush()
        ev = Evaluation(owner="o", model_id=model_id, model_name="m", dataset="shapes-32",
                        dataset_params={}, split="test", suite=[{"benchmark": "clean"}],
                        seed=0, checks=[], artifacts={}, completed_entries=[], timings={},
                        status="queued")
        s.add(ev)
        s.flush()
        eid = ev.id
    token = claim(rt, eid, Evaluation)
    assert token == 1

    def change(**values: Any) -> None:
        with rt.sessions.begin() as s:
            s.execute(update(Evaluation).where(Evaluation.id == eid).values(**values))

    with Supervisor(rt, Ref(eid, token), Evaluation) as sup:
        time.sleep(0.8)  # its first heartbeat is written (the first tick, at most 0.5 s)
        yield sup, change


def _seen(sup: Supervisor, within: float) -> str | None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if sup.cancelled.is_set():
            return "cancelled"
        if sup.superseded.is_set():
            return "superseded"
        time.sleep(0.01)
    return None


def test_a_cancel_is_seen_within_the_poll_not_the_heartbeat(
        running: tuple[Supervisor, Callable[..., None]]) -> None:
    sup, change = running
    assert _seen(sup, 0.5) is None
    asked = time.monotonic()
    change(cancel_requested=True)
    assert _seen(sup, 2.0) == "cancelled"
    assert time.monotonic() - asked < HEARTBEAT / 2


def test_another_attempt_supersedes_between_heartbeats(
        running: tuple[Supervisor, Callable[..., None]]) -> None:
    sup, change = running
    change(attempts=2)
    assert _seen(sup, 2.0) == "superseded"


def test_a_job_this_attempt_finished_is_neither_cancelled_nor_superseded(
        running: tuple[Supervisor, Callable[..., None]]) -> None:
    """A training marks itself succeeded (registering its model) before its child exits."""
    sup, change = running
    change(status="succeeded", cancel_requested=True)
    assert _seen(sup, 1.0) is None


def test_a_job_failed_for_lost_workers_is_superseded(
        running: tuple[Supervisor, Callable[..., None]]) -> None:
    sup, change = running
    change(status="failed")
    assert _seen(sup, 2.0) == "superseded"
