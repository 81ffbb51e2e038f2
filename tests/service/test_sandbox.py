"""Hostile models, built here, tried as an attacker would: refused at upload, and with the
upload check bypassed, contained by the engine child's jail. Each attack is also run once
with the sandbox off, to show that the checkpoint really does what it is accused of."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import update
from torch import Tensor, nn

from core.tables import Evaluation, Model
from tests.factories import (
    META,
    api,
    auth,
    closed_after,
    export_bytes,
    new_key,
    tiny_net,
    worker_runtime,
)
from tests.factories import torchscript_bytes as scripted
from workers import evaluation_jobs
from workers.runtime import Runtime
from workers.sandbox.config import JailConfig

pytestmark = pytest.mark.slow

TIME_LIMIT = 20.0  # for the spinning model; the other tests allow for a busy machine


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


@pytest.fixture
def client(rt: Runtime) -> Iterator[TestClient]:
    with api(rt.settings) as c:
        c.key = new_key(rt.settings.database_url, "mallory")
        yield c


# --- hostile checkpoints -------------------------------------------------------------------


class ReadsFile(nn.Module):
    """Reads a file with torch.from_file and raises its bytes as the error message."""

    def __init__(self, path: str, size: int) -> None:
        super().__init__()
        self.path, self.size = path, size
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        data = torch.from_file(self.path, False, self.size, dtype=torch.uint8)
        values: list[int] = data.long().tolist()
        text = ""
        for v in values:
            text += chr(v)
        raise RuntimeError("leak:" + text)


class WritesFile(nn.Module):
    """Writes its input with torch.save wherever it is told to."""

    def __init__(self, paths: list[str]) -> None:
        super().__init__()
        self.paths = paths
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        for path in self.paths:
            torch.save(x, path)
        return self.fc(x.mean((2, 3)))


class Spins(nn.Module):
    """Never returns: one forward pass loops forever."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        y = x
        while bool(y.sum() > -1.0):
            y = y * 1.0
        return self.fc(y.mean((2, 3)))


class Hungry(nn.Module):
    """Reserves 8 GiB in one forward pass (more than the cap the tests set)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        big = torch.empty([2147483648], dtype=torch.float32)  # 2**31
        return self.fc(x.mean((2, 3))) + float(big.numel()) * 0.0


class _Payload:
    """Unpickling this creates ``path``: what a hostile opaque constant does."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def opaque_pt2(marker: Path) -> bytes:
    """A valid torch.export archive plus a constant named ``opaque_obj_0``, which
    torch.export.load reads with plain ``pickle.loads``."""
    raw = zipfile.ZipFile(io.BytesIO(export_bytes(tiny_net())))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        config = ""
        for item in raw.infolist():
            data = raw.read(item.filename)
            if item.filename.endswith("constants/model_constants_config.json"):
                config = item.filename
                data = json.dumps({"config": {"evil": {
                    "path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                    "tensor_meta": None}}}).encode()
            zf.writestr(item, data)
        assert config
        zf.writestr(config.rsplit("/", 1)[0] + "/opaque_obj_0", pickle.dumps(_Payload(marker)))
    return out.getvalue()


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
                        dataset_params={}, split="test",
                        suite=suite or [{"benchmark": "clean"}], seed=0, checks=[],
                        artifacts={}, completed_entries=[], timings={}, status="queued")
        s.add(ev)
        s.flush()
        return ev.id


def _get(rt: Runtime, eid: uuid.UUID) -> Evaluation:
    with rt.sessions() as s:
        ev = s.get(Evaluation, eid)
        assert ev is not None
        return ev


def _refused(client: TestClient, data: bytes, reason: str) -> dict[str, Any]:
    resp = client.post("/models", headers=auth(client.key),
                       files={"file": ("model.bin", data)}, data={"metadata": json.dumps(META)})
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = resp.json()
    assert body["reason"] == reason
    return body


# --- the attacks ---------------------------------------------------------------------------


def test_an_opaque_pt2_constant_is_refused_and_never_unpickled_in_the_child(
        rt: Runtime, unjailed: Runtime, client: TestClient, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    body = _refused(client, opaque_pt2(marker), "export-payload-refused")
    assert body["entries"] == ["archive/data/constants/opaque_obj_0"]
    assert not marker.exists()
    eid = _job(rt, opaque_pt2(marker), "torch_export")
    assert evaluation_jobs.run(rt, eid) == "failed"
    assert not marker.exists()
    assert _get(rt, eid).error["type"] == "checkpoint-error"  # type: ignore[index]
    # The engine reads the archive's configs with torch's own reader before torch.export.load
    # and refuses the opaque constant there, in the worker's own process too.
    job = _job(unjailed, opaque_pt2(marker), "torch_export")
    assert evaluation_jobs.run(unjailed, job) == "failed"
    assert not marker.exists()
    assert "opaque_obj_0" in _get(unjailed, job).error["detail"]  # type: ignore[index]


def test_a_torchscript_model_that_reads_a_secret_cannot_leak_it(
        rt: Runtime, unjailed: Runtime, client: TestClient, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-" + uuid.uuid4().hex)
    model = scripted(ReadsFile(str(secret), len(secret.read_text())))
    body = _refused(client, model, "torchscript-operator-refused")
    assert body["operators"] == ["torch.from_file"]
    eid = _job(rt, model)
    assert evaluation_jobs.run(rt, eid) == "failed"
    resp = client.get(f"/evaluations/{eid}", headers=auth(client.key))
    assert resp.status_code == 200
    assert resp.json()["error"]["type"] == "checkpoint-error"
    assert secret.read_text() not in resp.text
    assert str(tmp_path) not in resp.text  # no internal paths either
    # The engine's operator check refuses it before its first forward pass, in the worker's
    # own process too: the error names the operator and holds no byte of the secret.
    refused = _job(unjailed, model)
    assert evaluation_jobs.run(unjailed, refused) == "failed"
    error = json.dumps(_get(unjailed, refused).error)
    assert "aten::from_file" in error
    assert secret.read_text() not in error


def test_a_torchscript_model_that_writes_a_file_is_refused_before_it_runs(
        rt: Runtime, unjailed: Runtime, client: TestClient, tmp_path: Path) -> None:
    """One write to /tmp and one over another owner's checkpoint: neither happens."""
    loose = Path(f"/tmp/robustscope-test-{uuid.uuid4().hex}.pt")
    theirs = rt.settings.data_dir / "models" / "someone-elses.pt"
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"their checkpoint")
    model = scripted(WritesFile([str(loose), str(theirs)]))
    assert _refused(client, model, "torchscript-operator-refused")["operators"] == [
        "torch.save"]
    try:
        # refused by the engine's operator check before its first forward pass, jailed or not
        for runtime in (rt, unjailed):
            eid = _job(runtime, model)
            assert evaluation_jobs.run(runtime, eid) == "failed"
            assert "aten::save" in _get(runtime, eid).error["detail"]  # type: ignore[index]
            assert not loose.exists()
            assert theirs.read_bytes() == b"their checkpoint"
    finally:
        loose.unlink(missing_ok=True)


def test_a_spinning_model_fails_with_time_limit_and_the_worker_goes_on(
        sqlite_url: str, tmp_path: Path) -> None:
    rt = _runtime(sqlite_url, tmp_path / "data", job_time_limit=TIME_LIMIT)
    first, spinning, fine = (_job(rt, scripted(tiny_net())), _job(rt, scripted(Spins())),
                             _job(rt, scripted(tiny_net())))
    assert evaluation_jobs.run(rt, first) == "succeeded"  # and the next job's child is started
    start = time.monotonic()
    assert evaluation_jobs.run(rt, spinning) == "failed"
    assert time.monotonic() - start < TIME_LIMIT + 5
    ev = _get(rt, spinning)
    assert ev.error == {"type": "time-limit",
                        "detail": f"the job ran past its time limit of {TIME_LIMIT:g} s"}
    assert (ev.status, ev.attempts) == ("failed", 1)  # final: the reconciler leaves it
    assert evaluation_jobs.run(rt, fine) == "succeeded"
    assert evaluation_jobs.run(rt, spinning) == "skipped"
    rt.jail().close()


def test_a_cancel_stops_a_model_whose_forward_pass_never_returns(rt: Runtime) -> None:
    eid = _job(rt, scripted(Spins()))
    outcome: dict[str, str] = {}
    t = threading.Thread(target=lambda: outcome.setdefault("r", evaluation_jobs.run(rt, eid)))
    t.start()
    deadline = time.monotonic() + 120
    while _get(rt, eid).progress_stage != "loading" and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # inside the endless forward pass
    with rt.sessions.begin() as s:
        s.execute(update(Evaluation).where(Evaluation.id == eid).values(cancel_requested=True))
    t.join(timeout=60)  # the forward pass never returns: only the kill ends the job
    assert not t.is_alive(), "the cancelled job's spinning model was not stopped"
    assert outcome["r"] == "cancelled"
    assert _get(rt, eid).status == "cancelled"


def test_a_model_that_allocates_past_the_cap_fails_out_of_memory(rt: Runtime) -> None:
    hungry, fine = _job(rt, scripted(Hungry())), _job(rt, scripted(tiny_net()))
    assert evaluation_jobs.run(rt, hungry) == "failed"
    assert _get(rt, hungry).error == {
        "type": "out-of-memory",
        "detail": "the model ran out of memory (its process has a memory cap)"}
    assert evaluation_jobs.run(rt, fine) == "succeeded"


def test_the_jail_holds_no_secret_no_network_and_no_other_files(
        rt: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Looked at from inside: the environment, the network, the data directory."""
    monkeypatch.setenv("ROBUSTSCOPE_BOOTSTRAP_KEY", "bootstrap-secret")
    monkeypatch.setenv("ROBUSTSCOPE_DATABASE_URL", "postgresql://u:pw@127.0.0.1/db")
    other = rt.settings.data_dir / "models" / "someone-elses.pt"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"theirs")
    slot = tmp_path / "slot"
    (slot / "in").mkdir(parents=True)
    (slot / "scratch").mkdir()
    probe = (
        "import json, os, socket\n"
        "out = {'env': dict(os.environ)}\n"
        f"for name, path in [('other', {str(other)!r}), ('passwd', '/etc/passwd')]:\n"
        "    try:\n"
        "        open(path, 'rb').read(); out[name] = 'read'\n"
        "    except OSError as e:\n"
        "        out[name] = type(e).__name__\n"
        "try:\n"
        "    socket.create_connection(('127.0.0.1', 5432), timeout=2); out['net'] = 'open'\n"
        "except OSError as e:\n"
        "    out['net'] = type(e).__name__\n"
        "open('/scratch/ok', 'w').write('x')\n"
        "try:\n"
        "    open('/job/x', 'w'); out['job'] = 'writable'\n"
        "except OSError as e:\n"
        "    out['job'] = type(e).__name__\n"
        "out['uid'] = os.getuid()\n"
        "print(json.dumps(out))\n")
    argv = JailConfig(slot_root=tmp_path).argv(slot, 1)
    argv = argv[:argv.index("--") + 1] + [sys.executable, "-c", probe]
    res = subprocess.run(argv, capture_output=True, timeout=60, env=dict(os.environ),
                         check=True)
    seen = json.loads(res.stdout)
    assert not [k for k in seen["env"] if k.startswith("ROBUSTSCOPE_")]
    assert "bootstrap-secret" not in res.stdout.decode()
    assert set(seen["env"]) <= {"PATH", "HOME", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE",
                                "PYTHONNOUSERSITE", "MALLOC_ARENA_MAX", "OMP_WAIT_POLICY",
                                "PWD",
                                "LC_CTYPE"}  # Python's own locale coercion
    assert seen["env"]["OMP_WAIT_POLICY"] == "PASSIVE"  # child and server take turns
    assert (seen["other"], seen["passwd"]) == ("FileNotFoundError", "FileNotFoundError")
    assert seen["net"] != "open"
    assert seen["job"] == "OSError"
    assert seen["uid"] == 65534
    assert (slot / "scratch" / "ok").read_text() == "x"
