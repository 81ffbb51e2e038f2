"""The model runs alone: an uploaded TorchScript / torch.export model is served by a jailed
process of its own, and the evaluator (attacks, metrics, report channel) only asks it for
logits and VJPs (docs/SECURITY.md). Each hostile model is built here."""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from core.tables import Evaluation, Model, Result
from tests.factories import META, closed_after, export_bytes, tiny_net, worker_runtime
from tests.factories import torchscript_bytes as scripted
from workers import evaluation_jobs
from workers.engine.models import ModelSpec, load
from workers.runtime import Runtime
from workers.sandbox import child
from workers.sandbox.model_server import Server
from workers.sandbox.protocol import EntryDone, EvaluateJob, ModelLink, Report
from workers.sandbox.remote import read_frame, shared_memory, write_frame

# Each test starts model-server processes (torch imported in each): the slow tier.
pytestmark = pytest.mark.slow

SUITE: list[dict[str, Any]] = [{"benchmark": "clean"},
         {"benchmark": "adversarial", "attack": "apgd-ce", "norm": "linf", "eps": [4 / 255],
          "steps": 5}]


def _runtime(sqlite_url: str, data_dir: Path, **change: Any) -> Runtime:
    runtime: Runtime = worker_runtime(sqlite_url, data_dir, sandbox_memory_limit=8 << 30,
                                      **change)
    return runtime


@pytest.fixture
def rt(sqlite_url: str, tmp_path: Path) -> Iterator[Runtime]:
    yield from closed_after(_runtime(sqlite_url, tmp_path / "data"))


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


# --- hostile models, in the real jail ------------------------------------------------------


class ForgesItsReport(nn.Module):
    """Writes a forged finished entry and ``done`` as JSON lines into file descriptor ``fd``
    (where the engine child reports) and then raises, on every input."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        entry = ('{"t": "entry", "index": 0, "seconds": 0.1, "rows": [{"benchmark": "clean", '
                 '"metric": "accuracy", "value": 1.0, "params": {}}], "checks": [], '
                 '"artifacts": {}}')
        torch.save("\n" + entry + "\n" + '{"t": "done"}' + "\n", "/proc/self/fd/" + str(self.fd))
        raise RuntimeError("no logits for anyone")


class NotFinite(nn.Module):
    """Fine on the load check's probe of 3 inputs, NaN logits on any other batch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        out = self.fc(x.mean((2, 3)))
        if x.shape[0] != 3:
            out = out * float("nan")
        return out


class WrongWidth(nn.Module):
    """Right on the load check's probe of 3 inputs, one logit too many on any other batch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 5)

    def forward(self, x: Tensor) -> Tensor:
        out = self.fc(x.mean((2, 3)))
        return out[:, :4] if x.shape[0] == 3 else out


def test_a_model_that_forges_its_report_and_raises_never_succeeds(rt: Runtime) -> None:
    """The attack of issue 20: lines written into the engine child's report pipe. The model
    now runs in a process that has no such pipe; whatever it writes reaches no report."""
    warmup = _job(rt, scripted(tiny_net()))
    assert evaluation_jobs.run(rt, warmup) == "succeeded"  # and the next child waits, warm
    warm = rt.jail()._warm
    assert warm is not None
    report_fd = int(list(warm.proc.args)[-1])  # type: ignore[arg-type]  # its report pipe
    eid = _job(rt, scripted(ForgesItsReport(report_fd)))
    assert evaluation_jobs.run(rt, eid) == "failed"
    status, error, results = _outcome(rt, eid)
    assert status == "failed"
    assert error is not None
    assert error["type"] in ("checkpoint-error", "sandbox-error")  # as its fd falls
    assert results == {}


@pytest.mark.parametrize(("hostile", "detail"), [
    (NotFinite, "the model returned logits that are not finite"),
    (WrongWidth, "the model returned [48, 5] for 48 inputs, not logits of shape [48, 4]")])
def test_a_model_whose_answers_are_not_logits_fails_and_records_nothing(
        rt: Runtime, hostile: type[nn.Module], detail: str) -> None:
    eid = _job(rt, scripted(hostile()), suite=SUITE)
    assert evaluation_jobs.run(rt, eid) == "failed"
    status, error, results = _outcome(rt, eid)
    assert (status, error) == ("failed", {"type": "model-crashed", "detail": detail})
    assert results == {}


def test_a_torch_export_model_runs_in_the_server_with_the_unsplit_results(
        rt: Runtime, unjailed: Runtime) -> None:
    model = export_bytes(tiny_net())
    split, here = (_job(rt, model, "torch_export", SUITE),
                   _job(unjailed, model, "torch_export", SUITE))
    assert evaluation_jobs.run(rt, split) == "succeeded"
    assert evaluation_jobs.run(unjailed, here) == "succeeded"
    assert _outcome(rt, split)[2] == _outcome(unjailed, here)[2]


# --- a hostile model process, given to the real evaluator ----------------------------------


class HostileServer(Server):
    """A model server that answers honestly until request ``at``, and then misbehaves."""

    def __init__(self, mode: str, at: int, model: nn.Module, mm: mmap.mmap,
                 request_fd: int, reply_fd: int) -> None:
        super().__init__(model, 4, torch.device("cpu"), mm, request_fd, reply_fd)
        self.mode, self.at = mode, at
        self.release = threading.Event()

    def serve(self) -> None:
        write_frame(self.reply_fd, {"seq": 0, "ok": True})
        n = 0
        while (request := read_frame(self.request_fd, None)) is not None:
            n += 1
            seq = request["seq"]
            answer = self.forward(request) if request["op"] == "forward" else self.vjp(request)
            if n < self.at:
                write_frame(self.reply_fd, {**answer, "seq": seq})
                continue
            if self.mode == "nan":  # an answer that claims success over NaN values
                np.frombuffer(self.mm, np.float32, 4)[:] = np.nan
                write_frame(self.reply_fd, {**answer, "seq": seq})
            elif self.mode == "huge":  # a frame far over the bound
                os.write(self.reply_fd, struct.pack(">I", 1 << 31) + b"{" * 1000)
            elif self.mode == "nested":  # JSON nested past the parser's recursion limit
                body = b"[" * 60000
                os.write(self.reply_fd, struct.pack(">I", len(body)) + body)
            elif self.mode == "garbage":
                os.write(self.reply_fd, struct.pack(">I", 12) + os.urandom(12))
            elif self.mode == "unasked":  # an answer to another request
                write_frame(self.reply_fd, {**answer, "seq": seq + 1})
            elif self.mode == "lies":  # an error type of its own choosing
                write_frame(self.reply_fd, {"seq": seq, "ok": False,
                                            "error": {"type": "succeeded", "detail": "1.0"}})
            elif self.mode == "hangs":
                self.release.wait(60)
            elif self.mode == "dies":
                pass
            return  # one misbehaviour, then the process is gone (its ends are closed)


def _evaluate_against(server: str, at: int, tmp_path: Path,
                      ) -> tuple[BaseException | None, list[Report], float]:
    """The real evaluator (``child.run_job``) with a hostile model process on its channel."""
    path = tmp_path / "model.pt"
    path.write_bytes(scripted(tiny_net()))
    model = load(path, ModelSpec.from_metadata("torchscript", META))
    shm = shared_memory(1 << 20)
    request_r, request_w = os.pipe()
    reply_r, reply_w = os.pipe()
    hostile = HostileServer(server, at, model, mmap.mmap(shm, 1 << 20), request_r, reply_w)

    def run_server() -> None:
        try:
            hostile.serve()
        except OSError:  # the evaluator is gone
            pass
        finally:
            os.close(request_r)
            os.close(reply_w)

    thread = threading.Thread(target=run_server, daemon=True)
    thread.start()
    job = EvaluateJob(
        kind="evaluate", suite=SUITE, completed=[], seed=0, batch_size=16, amp=False,
        model_path="/nowhere", model_format="torchscript", model_metadata=META,
        dataset="shapes-32", dataset_path=None, dataset_params={}, split="test", n_examples=16,
        class_map=None, state_dir=str(tmp_path / "state"),
        artifact_dir=str(tmp_path / "artifacts"), threads=torch.get_num_threads(), device="cpu",
        model_server=ModelLink(request=request_w, reply=reply_r, shm=shm, shm_size=1 << 20,
                               timeout=3.0))
    sent: list[Report] = []
    start = time.monotonic()
    raised: BaseException | None = None
    try:
        child.run_job(job, sent.append)
    except Exception as exc:
        raised = exc
    hostile.release.set()
    thread.join(10)
    return raised, sent, time.monotonic() - start


@pytest.mark.parametrize(("mode", "error"), [
    ("nan", "sandbox-error"), ("huge", "sandbox-error"), ("nested", "sandbox-error"),
    ("garbage", "sandbox-error"),
    ("unasked", "sandbox-error"), ("lies", "sandbox-error"), ("hangs", "time-limit"),
    ("dies", "model-crashed")])
@pytest.mark.parametrize("at", [1, 7], ids=["first-answer", "inside-the-attack"])
def test_a_hostile_model_process_fails_the_job_and_is_never_believed(
        tmp_path: Path, mode: str, error: str, at: int) -> None:
    """At the clean pass's first forward, or at request 7, inside the attack search (the
    engine's probe catches the model's own errors there: a violation must still fail the
    job)."""
    raised, sent, seconds = _evaluate_against(mode, at, tmp_path)
    assert raised is not None
    assert child.classify(raised)["type"] == error
    entries = [m for m in sent if isinstance(m, EntryDone)]
    assert entries == [] if at == 1 else [m.index for m in entries] == [0]  # clean only
    assert seconds < 60


def test_an_honest_model_process_gives_the_in_process_results(tmp_path: Path) -> None:
    """The same harness with a server that never misbehaves: what the tests above withhold."""
    raised, sent, _ = _evaluate_against("honest", 10**9, tmp_path)
    assert raised is None
    assert [m.index for m in sent if isinstance(m, EntryDone)] == [0, 1]
