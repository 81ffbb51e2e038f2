"""The worker's job logic in-process: claim, resume, fencing, cancel, failures, reconciler."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from sqlalchemy import func, select, update
from torch import nn

from contract.suite import BaseEntry
from core.db import make_engine, make_sessionmaker
from core.settings import Settings
from core.tables import Evaluation, Model, Result, utcnow
from tests.factories import META, accept_test_entries, tiny_net, torchscript_bytes
from workers import evaluation_jobs, jobs, reconciler
from workers.engine.benchmarks import _REGISTRY, register
from workers.engine.types import BenchmarkResult, EvalData, MetricRow, RunContext, fast_bf16
from workers.execute import execute
from workers.runtime import Runtime
from workers.work import JobFailed, Scratch, Superseded


@pytest.fixture
def rt(sqlite_url: str, tmp_path: Path) -> Runtime:
    # These tests register benchmarks in this process, so the engine runs here; the jailed
    # child is tested in test_sandbox.py and the other job tests.
    cfg = Settings(database_url=sqlite_url, data_dir=tmp_path, heartbeat_interval=0.2,
                   stale_after=1.0, max_attempts=3, sandbox="off")
    engine = make_engine(sqlite_url)
    return Runtime(settings=cfg, engine=engine, sessions=make_sessionmaker(engine),
                   device=torch.device("cpu"), name="test-worker")


@pytest.mark.slow
def test_search_precision_follows_the_setting(rt: Runtime) -> None:
    assert rt.bf16_search == fast_bf16(torch.device("cpu"))
    fp32 = dataclasses.replace(rt, settings=rt.settings.model_copy(update={"precision": "fp32"}))
    assert fp32.bf16_search is False
    assert fp32.describe_device().endswith("fp32 search)")
    bf16 = dataclasses.replace(rt, settings=rt.settings.model_copy(update={"precision": "bf16"}))
    assert bf16.bf16_search is True
    assert bf16.describe_device().endswith("bf16 search)")


def _job(rt: Runtime, suite: list[dict[str, Any]], model_bytes: bytes | None = None,
         **fields: Any) -> uuid.UUID:
    model_id = uuid.uuid4()
    path = rt.settings.data_dir / "models" / f"{model_id}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model_bytes if model_bytes is not None else torchscript_bytes(tiny_net()))
    with rt.sessions.begin() as s:
        s.add(Model(id=model_id, owner="o", name="tiny", format="torchscript", num_classes=4,
                    input_shape=[3, 32, 32], model_metadata=META, sha256="0" * 64,
                    size_bytes=1, storage_path=f"models/{model_id}.pt"))
        s.flush()
        fields = {"status": "queued", **fields}
        ev = Evaluation(owner="o", model_id=model_id, model_name="tiny", dataset="shapes-32",
                        dataset_params={}, split="test", suite=suite, seed=0, checks=[],
                        artifacts={}, completed_entries=[], timings={}, **fields)
        s.add(ev)
        s.flush()
        return ev.id


def _get(rt: Runtime, eid: uuid.UUID) -> Evaluation:
    with rt.sessions() as s:
        ev = s.get(Evaluation, eid)
        assert ev is not None
        return ev


def _result_count(rt: Runtime, eid: uuid.UUID) -> int:
    with rt.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(Result)
                            .where(Result.evaluation_id == eid)) or 0)


CALLS: list[str] = []


class Counted(BaseEntry):
    benchmark: Literal["test_counted"]
    tag: str = ""
    crash: bool = False


class Slow(BaseEntry):
    benchmark: Literal["test_slow"]


@pytest.fixture(autouse=True)
def _test_benchmarks(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Two benchmarks only these tests use: a counter and a slow one that reports progress."""

    def counted(model: nn.Module, data: EvalData, entry: Counted,
                ctx: RunContext) -> BenchmarkResult:
        CALLS.append(entry.tag)
        if entry.crash:
            raise RuntimeError("boom")
        params = entry.model_dump(exclude={"benchmark"}, exclude_defaults=True)
        return BenchmarkResult(rows=[MetricRow("counted", "n", float(len(data)), params)])

    def slow(model: nn.Module, data: EvalData, entry: Slow,
             ctx: RunContext) -> BenchmarkResult:
        for i in range(200):
            ctx.progress(i / 200, f"batch {i}")
            time.sleep(0.02)
        return BenchmarkResult(rows=[MetricRow("slow", "done", 1.0)])

    register("test_counted")(counted)
    register("test_slow")(slow)
    accept_test_entries(monkeypatch, Counted, Slow)
    CALLS.clear()
    yield
    _REGISTRY.pop("test_counted")
    _REGISTRY.pop("test_slow")


@pytest.mark.slow
def test_a_job_runs_and_records_everything(rt: Runtime) -> None:
    eid = _job(rt, [{"benchmark": "clean"}, {"benchmark": "test_counted", "tag": "a"}])
    assert evaluation_jobs.run(rt, eid) == "succeeded"
    ev = _get(rt, eid)
    assert (ev.status, ev.attempts, ev.progress_fraction) == ("succeeded", 1, 1.0)
    search = "bf16" if fast_bf16(torch.device("cpu")) else "fp32"
    assert ev.device == f"cpu ({torch.get_num_threads()} threads, {search} search; no sandbox)"
    assert ev.engine_version
    assert ev.engine_version.startswith("0.1.0")
    assert ev.started_at is not None
    assert ev.finished_at is not None
    assert ev.completed_entries == [0, 1]
    assert ev.checks[0] == {"name": "dataset_assets", "passed": True, "entry": None,
                            "detail": "shapes-32 objects: procedural, backgrounds: procedural",
                            "params": {"objects": "procedural", "backgrounds": "procedural"}}
    # The untrained tiny net answers class 3 for every image: flagged by the clean entry.
    assert ev.checks[1]["name"] == "degenerate_predictions"
    assert (ev.checks[1]["passed"], ev.checks[1]["entry"]) == (False, 0)
    assert ev.checks[1]["params"] == {"top_class": 3, "share": 1.0, "label_share": 0.25}
    assert len(ev.checks) == 2
    assert set(ev.timings) == {"0:clean", "1:test_counted"}
    with rt.sessions() as s:
        rows = s.scalars(select(Result).where(Result.evaluation_id == eid)
                         .order_by(Result.entry_index)).all()
        assert [(r.benchmark, r.metric) for r in rows] == [("clean", "accuracy"),
                                                           ("counted", "n")]
        assert rows[1].value == 400.0  # shapes-32 has 400 test images
        assert 0.0 <= rows[0].value <= 1.0
    assert evaluation_jobs.run(rt, eid) == "skipped"  # a duplicate delivery changes nothing
    assert _result_count(rt, eid) == 2


def test_a_restarted_job_resumes_after_the_last_finished_entry(rt: Runtime) -> None:
    eid = _job(rt, [{"benchmark": "test_counted", "tag": "first"},
                    {"benchmark": "test_counted", "tag": "second", "crash": True}])
    # First attempt: entry 0 finishes, entry 1 crashes the "worker" mid-run.
    token = jobs.claim(rt, eid, Evaluation)
    assert token == 1
    work = evaluation_jobs.EvaluationWork.load(rt, eid, token)
    with jobs.Supervisor(rt, work, Evaluation) as sup, pytest.raises(JobFailed, match="boom"):
        execute(rt, sup, work)
    assert CALLS == ["first", "second"]
    assert evaluation_jobs.run(rt, eid) == "skipped"  # heartbeat still fresh: not stealable yet
    with rt.sessions.begin() as s:  # the worker died: its heartbeat goes stale
        s.execute(update(Evaluation).where(Evaluation.id == eid).values(
            heartbeat_at=utcnow() - timedelta(seconds=60),
            suite=[{"benchmark": "test_counted", "tag": "first"},
                   {"benchmark": "test_counted", "tag": "second"}]))
    CALLS.clear()
    assert evaluation_jobs.run(rt, eid) == "succeeded"
    assert CALLS == ["second"]  # entry 0 was not run again
    ev = _get(rt, eid)
    assert ev.attempts == 2
    assert _result_count(rt, eid) == 2  # one row per entry, none written twice


def test_a_superseded_worker_writes_nothing(rt: Runtime) -> None:
    eid = _job(rt, [{"benchmark": "test_counted", "tag": "x"}])
    token_a = jobs.claim(rt, eid, Evaluation)
    assert token_a is not None
    job_a = evaluation_jobs.EvaluationWork.load(rt, eid, token_a)
    with rt.sessions.begin() as s:
        s.execute(update(Evaluation).where(Evaluation.id == eid).values(
            heartbeat_at=utcnow() - timedelta(seconds=60)))
    token_b = jobs.claim(rt, eid, Evaluation)
    assert token_b == token_a + 1
    with pytest.raises(Superseded):
        job_a.handle({"t": "entry", "index": 0, "seconds": 0.1, "checks": [], "artifacts": {},
                      "rows": [MetricRow("x", "y", 1.0).as_dict()]},
                     Scratch(*[rt.settings.data_dir] * 5))
    assert _result_count(rt, eid) == 0


def test_cancel_stops_a_running_job_between_batches(rt: Runtime) -> None:
    eid = _job(rt, [{"benchmark": "test_slow"}])
    outcome: dict[str, str] = {}
    t = threading.Thread(target=lambda: outcome.setdefault("r", evaluation_jobs.run(rt, eid)))
    t.start()
    deadline = time.monotonic() + 20
    while _get(rt, eid).progress_fraction <= 0.05 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _get(rt, eid).status == "running"
    with rt.sessions.begin() as s:
        s.execute(update(Evaluation).where(Evaluation.id == eid).values(cancel_requested=True))
    t.join(timeout=20)
    assert outcome["r"] == "cancelled"
    ev = _get(rt, eid)
    assert ev.status == "cancelled"
    assert ev.progress_fraction < 0.9
    assert _result_count(rt, eid) == 0


def test_a_database_outage_leaves_the_job_for_the_reconciler(rt: Runtime) -> None:
    from sqlalchemy.exc import OperationalError

    eid = _job(rt, [{"benchmark": "test_counted", "tag": "a"}])
    original = evaluation_jobs.EvaluationWork._write_entry

    def outage(*args: Any) -> None:
        raise OperationalError("INSERT", {}, Exception("server closed the connection"))

    evaluation_jobs.EvaluationWork._write_entry = outage  # type: ignore[method-assign]
    try:
        with pytest.raises(OperationalError):
            evaluation_jobs.run(rt, eid)
    finally:
        evaluation_jobs.EvaluationWork._write_entry = original  # type: ignore[method-assign]
    ev = _get(rt, eid)
    assert (ev.status, ev.error, ev.attempts) == ("running", None, 1)
    with rt.sessions.begin() as s:  # its heartbeat goes stale
        s.execute(update(Evaluation).where(Evaluation.id == eid).values(
            heartbeat_at=utcnow() - timedelta(seconds=60)))
    assert evaluation_jobs.run(rt, eid) == "succeeded"
    assert _get(rt, eid).attempts == 2
    assert _result_count(rt, eid) == 1


def test_engine_errors_fail_the_job_with_a_typed_error(rt: Runtime) -> None:
    eid = _job(rt, [{"benchmark": "test_counted", "crash": True}])
    assert evaluation_jobs.run(rt, eid) == "failed"
    assert _get(rt, eid).error == {"type": "model-crashed", "detail": "RuntimeError: boom"}
    bad = _job(rt, [{"benchmark": "clean"}], model_bytes=torchscript_bytes(tiny_net(7)))
    assert evaluation_jobs.run(rt, bad) == "failed"  # 7 classes where the metadata says 4
    err = _get(rt, bad).error
    assert err is not None
    assert err["type"] == "checkpoint-error"
    assert "[3, 4]" in err["detail"]


def test_a_job_whose_workers_keep_dying_fails(rt: Runtime) -> None:
    eid = _job(rt, [{"benchmark": "clean"}], status="running", attempts=3,
               heartbeat_at=utcnow() - timedelta(seconds=60))
    assert evaluation_jobs.run(rt, eid) == "skipped"
    ev = _get(rt, eid)
    assert ev.status == "failed"
    assert ev.error == {"type": "worker-lost", "detail": "the job's worker died 3 times"}


def test_reconciler_resends_lost_jobs_only(rt: Runtime) -> None:
    old = utcnow() - timedelta(hours=1)
    stale = _job(rt, [{"benchmark": "clean"}], status="running", attempts=1, heartbeat_at=old,
                 enqueued_at=old)
    fresh = _job(rt, [{"benchmark": "clean"}], status="running", attempts=1,
                 heartbeat_at=utcnow(), enqueued_at=old)
    lost = _job(rt, [{"benchmark": "clean"}], enqueued_at=old)
    waiting = _job(rt, [{"benchmark": "clean"}], enqueued_at=utcnow())
    sent: list[Any] = []
    resent = reconciler.reconcile_once(rt, lambda name, args: sent.append((name, args)))
    assert sorted(resent) == sorted([str(stale), str(lost)])
    assert {a[0] for _, a in sent} == {str(stale), str(lost)}
    assert str(fresh) not in resent
    assert str(waiting) not in resent
    # Not re-sent again on the next round: enqueued_at moved.
    assert reconciler.reconcile_once(rt, lambda name, args: None) == []
