"""A dataset's ingest is a job: claimed with an attempt that fences its writes, supervised
(progress, cancel, time limit), re-sent by the reconciler, and its dataset's status follows
its outcome. On SQLite and Postgres, but the reconciler's tests (which see every table's lost
jobs) on SQLite only: the Postgres database is shared."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from core.objectstore import file_sha256
from core.tables import Dataset, DatasetIngest, utcnow
from tests.factories import auth, new_key, worker_runtime
from tests.service.ingest_fixtures import png, write_zip
from workers import ingest, jobs, reconciler, work
from workers.runtime import Runtime


@pytest.fixture
def key(db_url: str, owner: str) -> str:
    return new_key(db_url, owner)


@pytest.fixture
def rt(db_url: str, tmp_path: Path) -> Runtime:
    return worker_runtime(db_url, tmp_path, stale_after=1.0, max_attempts=3,
                          cancel_poll_interval=0.05)


@pytest.fixture
def stages(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, str]]:
    """Every progress the ingest tells its supervisor, in order."""
    told: list[tuple[float, str]] = []
    real = jobs.Supervisor.progress

    def spy(self: jobs.Supervisor, fraction: float, stage: str, message: str) -> None:
        told.append((fraction, stage))
        real(self, fraction, stage, message)

    monkeypatch.setattr(jobs.Supervisor, "progress", spy)
    return told


def slow_progress(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Each progress report of the ingest takes ``seconds`` (a slow archive)."""
    real = jobs.Supervisor.progress

    def slow(self: jobs.Supervisor, fraction: float, stage: str, message: str) -> None:
        time.sleep(seconds)
        real(self, fraction, stage, message)

    monkeypatch.setattr(jobs.Supervisor, "progress", slow)


def archive(tmp_path: Path, n: int = 8, broken: bool = False) -> Path:
    rng = np.random.default_rng(0)
    files = {f"c{i % 2}/img{i:02d}.png": png(rng.integers(0, 255, (16, 16, 3), np.uint8))
             for i in range(n)}
    if broken:
        files["c0/broken.png"] = b"not a png"
    return write_zip(tmp_path / f"upload-{uuid.uuid4().hex[:6]}.zip", files)


def upload(client: TestClient, key: str, path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        resp = client.post("/datasets", headers=auth(key), files={"file": (path.name, f)})
    assert resp.status_code == 202, resp.text
    body: dict[str, Any] = resp.json()
    return body


def record(client: TestClient, key: str, dataset_id: str) -> dict[str, Any]:
    resp = client.get(f"/datasets/{dataset_id}", headers=auth(key))
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def job(rt: Runtime, iid: uuid.UUID) -> DatasetIngest:
    with rt.sessions() as s:
        row = s.get(DatasetIngest, iid)
        assert row is not None
        s.expunge(row)
        return row


def leftovers(data_dir: Path) -> list[str]:
    """The ingest's temporary files still in the data folder's ``tmp``."""
    tmp = data_dir / "tmp"
    return sorted(p.name for p in tmp.glob("*ingest-*")) if tmp.exists() else []


def run_in_thread(rt: Runtime, iid: uuid.UUID) -> tuple[threading.Thread, dict[str, str]]:
    outcome: dict[str, str] = {}
    t = threading.Thread(target=lambda: outcome.setdefault("r", ingest.run(rt, iid)))
    t.start()
    return t, outcome


def wait_for(what: str, cond: Any, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_an_ingest_is_a_job_queued_running_then_succeeded(
        client: TestClient, key: str, rt: Runtime, tmp_path: Path,
        stages: list[tuple[float, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    made = upload(client, key, archive(tmp_path, n=12))
    queued = made["ingest"]
    assert (made["status"], queued["status"], queued["attempts"]) == ("ingesting", "queued", 0)
    assert queued["progress"] == {"fraction": 0.0, "stage": "queued",
                                  "message": "waiting for a worker"}
    assert (queued["started_at"], queued["finished_at"], queued["error"]) == (None, None, None)
    iid = uuid.UUID(queued["id"])
    slow_progress(monkeypatch, 0.08)  # long enough for the supervisor to write progress
    seen: list[tuple[str, str, float, int]] = []
    t, outcome = run_in_thread(rt, iid)
    while t.is_alive():
        row = job(rt, iid)
        seen.append((row.status, row.progress_stage, row.progress_fraction, row.attempts))
        time.sleep(0.05)
    t.join()
    assert outcome["r"] == "succeeded"
    running = [s for s in seen if s[0] == "running"]
    assert running
    assert all(s[3] == 1 for s in running)
    assert "decoding" in {s[1] for s in running}  # progress reached the database mid-run
    fractions = [f for f, _ in stages]
    assert fractions == sorted(fractions)
    assert fractions[-1] >= 0.9
    told = [stage for _, stage in stages]
    assert {"reading", "decoding", "writing", "storing"} <= set(told)
    assert told.index("decoding") < told.index("storing")
    done = record(client, key, made["id"])
    assert (done["status"], done["num_examples"], done["error"]) == ("ready", 12, None)
    ing = done["ingest"]
    assert (ing["status"], ing["attempts"], ing["error"]) == ("succeeded", 1, None)
    assert ing["progress"] == {"fraction": 1.0, "stage": "succeeded", "message": "done"}
    assert ing["started_at"] is not None
    assert ing["finished_at"] is not None
    assert done["finished_at"] is not None
    assert not (tmp_path / "datasets" / f"{made['id']}.upload").exists()
    assert leftovers(tmp_path) == []
    listed = client.get("/datasets", headers=auth(key)).json()["items"]
    assert [d["ingest"] for d in listed if d["builtin"]] == [None] * sum(
        d["builtin"] for d in listed)
    assert [d["ingest"]["status"] for d in listed if not d["builtin"]] == ["succeeded"]


def test_a_second_delivery_after_success_does_nothing(
        client: TestClient, key: str, rt: Runtime, tmp_path: Path) -> None:
    made = upload(client, key, archive(tmp_path))
    iid = uuid.UUID(made["ingest"]["id"])
    assert ingest.run(rt, iid) == "succeeded"
    before = record(client, key, made["id"])
    assert ingest.run(rt, iid) == "skipped"
    assert record(client, key, made["id"]) == before
    assert before["ingest"]["attempts"] == 1


def test_a_failed_decode_fails_the_ingest_and_the_dataset(
        client: TestClient, key: str, rt: Runtime, tmp_path: Path) -> None:
    made = upload(client, key, archive(tmp_path, broken=True))
    assert ingest.run(rt, uuid.UUID(made["ingest"]["id"])) == "failed"
    failed = record(client, key, made["id"])
    assert failed["status"] == "failed"
    error = failed["error"]
    assert error["type"].endswith("/dataset-image-undecodable")
    assert (error["status"], error["errors"][0]["path"]) == (422, "c0/broken.png")
    assert failed["ingest"]["status"] == "failed"
    assert failed["ingest"]["error"] == error  # one problem body, the same in both
    assert failed["ingest"]["attempts"] == 1
    assert failed["finished_at"] is not None
    assert not (tmp_path / "datasets" / f"{made['id']}.upload").exists()
    assert leftovers(tmp_path) == []
    ev = client.post("/evaluations", headers=auth(key), json={
        "model_id": str(uuid.uuid4()), "dataset": made["id"],
        "suite": [{"benchmark": "clean"}]})
    assert ev.status_code in (404, 409)


def test_a_stale_ingest_is_taken_over_and_the_first_attempt_is_fenced(
        client: TestClient, key: str, rt: Runtime, tmp_path: Path) -> None:
    made = upload(client, key, archive(tmp_path))
    iid = uuid.UUID(made["ingest"]["id"])
    first = jobs.claim(rt, iid, DatasetIngest)
    assert first == 1
    zombie = ingest.IngestWork.load(rt, iid, first)
    with rt.sessions.begin() as s:  # the first worker died: its heartbeat goes stale
        s.execute(update(DatasetIngest).where(DatasetIngest.id == iid).values(
            heartbeat_at=utcnow() - timedelta(seconds=60)))
    assert ingest.run(rt, iid) == "succeeded"  # the redelivery, as attempt 2
    done = record(client, key, made["id"])
    assert (done["status"], done["ingest"]["attempts"]) == ("ready", 2)
    npz = tmp_path / "datasets" / f"{made['id']}.npz"
    stored = file_sha256(npz)
    assert stored == done_info(rt, made["id"])["content_sha256"]

    # The first attempt comes back: its archive is gone with the success, and nothing it
    # writes lands (the supervisor's writes, the outcome, the dataset, the stored file).
    sup = jobs.Supervisor(rt, zombie, DatasetIngest)
    sup._write((0.5, "decoding", "zombie"))
    assert sup.superseded.is_set()
    with pytest.raises(work.Superseded):
        zombie._check_owned()
    with pytest.raises(work.Superseded):
        zombie._record({"num_examples": 0})
    jobs._finish(rt, DatasetIngest, iid, first, "failed", {"type": "x", "detail": "zombie"})
    assert record(client, key, made["id"]) == done
    assert file_sha256(npz) == stored


def done_info(rt: Runtime, dataset_id: str) -> dict[str, Any]:
    with rt.sessions() as s:
        ds = s.get(Dataset, uuid.UUID(dataset_id))
        assert ds is not None
        return dict(ds.info)


def test_deleting_a_dataset_mid_ingest_stops_it(
        client: TestClient, key: str, rt: Runtime, tmp_path: Path,
        stages: list[tuple[float, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    made = upload(client, key, archive(tmp_path, n=40))
    iid = uuid.UUID(made["ingest"]["id"])
    slow_progress(monkeypatch, 0.1)  # about 5 s if it ran to the end
    t, outcome = run_in_thread(rt, iid)
    wait_for("the decode", lambda: any(stage == "decoding" for _, stage in stages))
    assert client.delete(f"/datasets/{made['id']}", headers=auth(key)).status_code == 204
    t.join(timeout=20)
    assert not t.is_alive()
    assert outcome["r"] == "superseded"  # its job went with the dataset: nothing written
    assert "storing" not in {stage for _, stage in stages}
    assert max(f for f, _ in stages) < 0.8
    assert client.get(f"/datasets/{made['id']}", headers=auth(key)).status_code == 404
    with rt.sessions() as s:
        assert s.get(DatasetIngest, iid) is None
    assert not list((tmp_path / "datasets").glob(f"{made['id']}*"))
    assert leftovers(tmp_path) == []


def test_cancel_stops_a_running_ingest_and_fails_its_dataset(
        client: TestClient, key: str, rt: Runtime, tmp_path: Path,
        stages: list[tuple[float, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    made = upload(client, key, archive(tmp_path, n=40))
    iid = uuid.UUID(made["ingest"]["id"])
    slow_progress(monkeypatch, 0.1)
    t, outcome = run_in_thread(rt, iid)
    wait_for("the decode", lambda: any(stage == "decoding" for _, stage in stages))
    with rt.sessions.begin() as s:
        s.execute(update(DatasetIngest).where(DatasetIngest.id == iid)
                  .values(cancel_requested=True))
    t.join(timeout=20)
    assert outcome["r"] == "cancelled"
    gone = record(client, key, made["id"])
    assert (gone["status"], gone["ingest"]["status"]) == ("failed", "cancelled")
    assert gone["error"]["type"].endswith("/dataset-ingest-cancelled")
    assert "storing" not in {stage for _, stage in stages}
    assert not (tmp_path / "datasets" / f"{made['id']}.npz").exists()
    assert leftovers(tmp_path) == []


def test_an_ingest_past_its_time_limit_fails(
        db_url: str, client: TestClient, key: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    rt = worker_runtime(db_url, tmp_path, job_time_limit=0.5)
    made = upload(client, key, archive(tmp_path, n=40))
    slow_progress(monkeypatch, 0.1)
    assert ingest.run(rt, uuid.UUID(made["ingest"]["id"])) == "failed"
    failed = record(client, key, made["id"])
    assert failed["status"] == "failed"
    assert failed["error"]["type"] == "time-limit"
    assert failed["ingest"]["error"] == failed["error"]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_reconciler_resends_a_lost_ingest_then_fails_it_worker_lost(
        client: TestClient, key: str, rt: Runtime, tmp_path: Path) -> None:
    sent: list[tuple[str, list[str]]] = []

    def send(name: str, args: list[str]) -> None:
        sent.append((name, args))

    lost = upload(client, key, archive(tmp_path))
    dying = upload(client, key, archive(tmp_path))
    lost_id, dying_id = uuid.UUID(lost["ingest"]["id"]), uuid.UUID(dying["ingest"]["id"])
    assert reconciler.reconcile_once(rt, send) == []  # queued, and sent just now
    old = utcnow() - timedelta(seconds=60)
    with rt.sessions.begin() as s:  # both workers died mid-ingest; one of them a third time
        s.execute(update(DatasetIngest).where(DatasetIngest.id == lost_id).values(
            status="running", attempts=1, heartbeat_at=old, enqueued_at=old))
        s.execute(update(DatasetIngest).where(DatasetIngest.id == dying_id).values(
            status="running", attempts=3, heartbeat_at=old, enqueued_at=old))
    assert sorted(reconciler.reconcile_once(rt, send)) == sorted([str(lost_id), str(dying_id)])
    assert sorted(sent) == sorted([("robustscope.ingest", [str(lost_id)]),
                                   ("robustscope.ingest", [str(dying_id)])])
    assert ingest.run(rt, lost_id) == "succeeded"
    again = record(client, key, lost["id"])
    assert (again["status"], again["ingest"]["attempts"]) == ("ready", 2)
    assert ingest.run(rt, dying_id) == "skipped"
    dead = record(client, key, dying["id"])
    error = {"type": "worker-lost", "detail": "the job's worker died 3 times"}
    assert (dead["status"], dead["error"]) == ("failed", error)
    assert (dead["ingest"]["status"], dead["ingest"]["error"]) == ("failed", error)
    assert reconciler.reconcile_once(rt, send) == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_queued_ingest_the_broker_lost_is_resent(
        db_url: str, client: TestClient, key: str, tmp_path: Path) -> None:
    made = upload(client, key, archive(tmp_path))
    sent: list[tuple[str, list[str]]] = []
    fresh = worker_runtime(db_url, tmp_path)
    assert reconciler.reconcile_once(fresh, lambda name, args: sent.append((name, args))) == []
    late = worker_runtime(db_url, tmp_path, requeue_queued_after=0)
    iid = made["ingest"]["id"]
    assert reconciler.reconcile_once(late, lambda name, args: sent.append((name, args))) == [
        iid]
    assert sent == [("robustscope.ingest", [iid])]
    assert ingest.run(late, uuid.UUID(iid)) == "succeeded"
    assert reconciler.reconcile_once(late, lambda name, args: sent.append((name, args))) == []
