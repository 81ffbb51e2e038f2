"""The model runs alone: an uploaded TorchScript / torch.export model is served by a jailed
process of its own, and the evaluator (attacks, metrics, report channel) only asks it for
logits and VJPs (docs/SECURITY.md). Each hostile model is built here."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from service.db import make_engine, make_sessionmaker
from service.tables import Evaluation, Model, Result
from tests.factories import META, settings, tiny_net
from tests.factories import torchscript_bytes as scripted
from workers import evaluation_jobs
from workers.runtime import Runtime

SUITE = [{"benchmark": "clean"},
         {"benchmark": "adversarial", "attack": "apgd-ce", "norm": "linf", "eps": [4 / 255],
          "steps": 5}]


def _runtime(sqlite_url: str, data_dir: Path, **change: Any) -> Runtime:
    cfg = settings(sqlite_url, data_dir, heartbeat_interval=0.2, stale_after=5.0,
                   sandbox_memory_limit=8 << 30, job_time_limit=300.0, **change)
    engine = make_engine(sqlite_url)
    return Runtime(settings=cfg, engine=engine, sessions=make_sessionmaker(engine),
                   device=torch.device("cpu"), name="test-worker")


@pytest.fixture
def rt(sqlite_url: str, tmp_path: Path) -> Iterator[Runtime]:
    runtime = _runtime(sqlite_url, tmp_path / "data")
    yield runtime
    if runtime._jail is not None:
        runtime._jail.close()


@pytest.fixture
def unjailed(sqlite_url: str, tmp_path: Path) -> Runtime:
    return _runtime(sqlite_url, tmp_path / "data", sandbox="off")


def _job(rt: Runtime, model: bytes, fmt: str = "torchscript",
         suite: list[dict[str, Any]] | None = None) -> uuid.UUID:
    """An evaluation of ``model``, written straight to the database (no upload check)."""
    model_id = uuid.uuid4()
    rel = f"models/{model_id}.{'pt2' if fmt == 'torch_export' else 'pt'}"
    path = rt.settings.data_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model)
    with rt.sessions.begin() as s:
        s.add(Model(id=model_id, owner="mallory", name="m", format=fmt, num_classes=4,
                    input_shape=[3, 32, 32], model_metadata=META, sha256="0" * 64,
                    size_bytes=len(model), storage_path=rel))
        s.flush()
        ev = Evaluation(owner="mallory", model_id=model_id, model_name="m", dataset="shapes-32",
                        dataset_params={}, split="test", options={"n_examples": 48},
                        suite=suite or [{"benchmark": "clean"}], seed=0, checks=[],
                        artifacts={}, completed_entries=[], timings={}, status="queued")
        s.add(ev)
        s.flush()
        return ev.id


def _outcome(rt: Runtime, eid: uuid.UUID) -> tuple[str, dict[str, Any] | None,
                                                   dict[tuple[str, str, str], float]]:
    with rt.sessions() as s:
        ev = s.get(Evaluation, eid)
        assert ev is not None
        rows = s.query(Result).filter(Result.evaluation_id == eid).all()
        return ev.status, ev.error, {(r.benchmark, r.metric, r.params_key): r.value
                                     for r in rows if not r.metric.endswith("seconds")}


def test_a_torchscript_model_through_the_split_gives_the_unsplit_results(
        rt: Runtime, unjailed: Runtime) -> None:
    model = scripted(tiny_net())
    split, here = _job(rt, model, suite=SUITE), _job(unjailed, model, suite=SUITE)
    assert evaluation_jobs.run(rt, split) == "succeeded"
    assert evaluation_jobs.run(unjailed, here) == "succeeded"
    got, want = _outcome(rt, split), _outcome(unjailed, here)
    assert got[2] == want[2]
    assert {k[:2] for k in got[2]} >= {("clean", "accuracy"), ("adversarial", "robust_accuracy")}
