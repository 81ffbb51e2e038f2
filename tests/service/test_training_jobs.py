"""Training jobs through the worker path, in-process on SQLite: a job submitted over HTTP
trains, registers its model, queues the evaluation, and that evaluation runs; a worker killed
mid-training is resumed after its last finished epoch; cancel; typed failures; reconciler."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from sqlalchemy import event, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from core.db import make_engine, make_sessionmaker
from core.errors import NotFound
from core.queue import EVALUATE_TASK, TRAIN_TASK
from core.tables import Training, utcnow
from tests.engine.attack_helpers import one_thread  # noqa: F401  (an autouse fixture)
from tests.factories import api, auth, new_key, settings, upload_dataset
from tests.service.ingest_fixtures import png, solid, write_zip
from workers import evaluation_jobs, jobs, reconciler, training_jobs
from workers.engine.data import load_builtin
from workers.engine.models import ModelSpec, load
from workers.engine.threats import Norm
from workers.engine.training import Method, ThreatSpec, TrainSpec, train
from workers.runtime import Runtime

pytestmark = pytest.mark.slow

SPEC: dict[str, Any] = {
    "dataset": "shapes-32", "architecture": "small_cnn", "method": "fgsm_rs",
    "threat": {"norm": "linf", "eps": 8 / 255}, "epochs": 2, "batch_size": 16, "lr": 0.01,
    "seed": 3, "train_examples": 48, "eval_examples": 24,
}


@pytest.fixture
def rt(sqlite_url: str, tmp_path: Path) -> Runtime:
    cfg = settings(sqlite_url, tmp_path, heartbeat_interval=0.2, stale_after=1.0,
                   max_attempts=3)
    engine = make_engine(sqlite_url)
    return Runtime(settings=cfg, engine=engine, sessions=make_sessionmaker(engine),
                   device=torch.device("cpu"), name="test-worker")


@pytest.fixture
def client(rt: Runtime) -> Iterator[TestClient]:
    with api(rt.settings) as c:
        yield c


@pytest.fixture
def key(rt: Runtime) -> str:
    return new_key(rt.settings.database_url, "alice")


def _submit(client: TestClient, key: str, **change: Any) -> str:
    resp = client.post("/trainings", headers=auth(key), json={**SPEC, **change})
    assert resp.status_code == 202, resp.text
    tid: str = resp.json()["id"]
    return tid


def _get(client: TestClient, key: str, tid: str) -> dict[str, Any]:
    body: dict[str, Any] = client.get(f"/trainings/{tid}", headers=auth(key)).json()
    return body


def reference_state() -> dict[str, torch.Tensor]:
    """What the engine trains in-process for SPEC: the job must register exactly this."""
    spec = TrainSpec("small_cnn", Method.FGSM_RS, ThreatSpec(Norm.LINF, 8 / 255, 1,
                                                             1.25 * 8 / 255),
                     epochs=2, batch_size=16, lr=0.01, seed=3)
    data = load_builtin("shapes-32", "train").subset(torch.arange(48))
    held_out = load_builtin("shapes-32", "val").subset(torch.arange(24))
    return train(spec, data, held_out).state


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_training_registers_its_model_and_queues_its_evaluation(
        rt: Runtime, client: TestClient, key: str) -> None:
    tid = _submit(client, key, evaluate=[{"benchmark": "clean"}])
    sent: list[tuple[str, list[Any]]] = []
    outcome = training_jobs.run(rt, uuid.UUID(tid),
                                send_task=lambda name, args: sent.append((name, args)))
    assert outcome == "succeeded"
    done = _get(client, key, tid)
    assert (done["status"], done["attempts"], done["error"]) == ("succeeded", 1, None)
    assert done["progress"] == {"fraction": 1.0, "stage": "succeeded", "message": "done"}
    assert done["device"] == f"cpu ({torch.get_num_threads()} threads, fp32; sandbox)"
    assert done["engine_version"].startswith("0.1.0")
    assert done["started_at"] <= done["finished_at"]
    assert [h["epoch"] for h in done["history"]] == [1, 2]
    assert set(done["history"][0]) == {"epoch", "loss", "train_accuracy", "clean_accuracy",
                                       "robust_accuracy", "lr", "seconds"}
    for h in done["history"]:  # 24 held-out examples: accuracies are multiples of 1/24
        assert round(h["clean_accuracy"] * 24, 6).is_integer()
        assert h["robust_accuracy"] <= h["clean_accuracy"]
    # The model is the owner's, listed like an upload, and holds exactly the engine's weights.
    model = client.get(f"/models/{done['model_id']}", headers=auth(key)).json()
    assert (model["name"], model["format"], model["architecture"]) == (
        "small_cnn-fgsm_rs-linf-0.03137", "safetensors", "small_cnn")
    assert (model["num_classes"], model["input_shape"]) == (4, [3, 32, 32])
    assert model["class_names"] == ["circle", "square", "triangle", "cross"]
    listed = client.get("/models", headers=auth(key)).json()["items"]
    assert [m["id"] for m in listed] == [model["id"]]
    path = rt.settings.data_dir / "models" / f"{model['id']}.safetensors"
    assert _same(load_file(str(path)), reference_state())
    assert not (rt.settings.data_dir / "state" / "trainings" / tid).exists()
    # Its evaluation was queued (and sent) after the commit, and runs on the trained model.
    ev = client.get(f"/evaluations/{done['evaluation_id']}", headers=auth(key)).json()
    assert (ev["status"], ev["model_id"], ev["dataset"], ev["seed"]) == (
        "queued", model["id"], "shapes-32", 3)
    assert ev["suite"] == [{"benchmark": "clean"}]
    assert ev["public"] is False
    assert sent == [(EVALUATE_TASK, [done["evaluation_id"]])]
    assert evaluation_jobs.run(rt, uuid.UUID(done["evaluation_id"])) == "succeeded"
    ev = client.get(f"/evaluations/{done['evaluation_id']}", headers=auth(key)).json()
    net = load(path, ModelSpec.from_metadata("safetensors", model))
    test = load_builtin("shapes-32", "test")
    with torch.no_grad():
        expected = float((net(test.x).argmax(1) == test.y).float().mean())
    assert [(r["metric"], r["value"]) for r in ev["results"]] == [("accuracy", expected)]
    # A second delivery of the same training changes nothing.
    assert training_jobs.run(rt, uuid.UUID(tid)) == "skipped"
    assert len(client.get("/models", headers=auth(key)).json()["items"]) == 1


def test_a_training_whose_evaluation_cannot_be_queued_fails_and_keeps_no_file(
        rt: Runtime, client: TestClient, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model is registered and its evaluation queued in one transaction: when the
    evaluation is refused (its dataset gone meanwhile), the training fails with a typed error
    and the rollback takes the stored checkpoint with the model row."""
    tid = _submit(client, key, evaluate=[{"benchmark": "clean"}])

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise NotFound("no dataset 'shapes-32'", field="dataset")

    monkeypatch.setattr(training_jobs.evaluations, "create", refused)
    assert training_jobs.run(rt, uuid.UUID(tid)) == "failed"
    done = _get(client, key, tid)
    assert (done["status"], done["model_id"], done["evaluation_id"]) == ("failed", None, None)
    assert done["error"] == {"type": "training-error", "detail": "its evaluation could not be "
                                                                "queued: no dataset 'shapes-32'"}
    assert client.get("/models", headers=auth(key)).json()["items"] == []
    stored = rt.settings.data_dir / "models"
    assert not stored.exists() or sorted(stored.iterdir()) == []
    assert not list((rt.settings.data_dir / "tmp").glob("training-*"))


def test_a_training_whose_success_cannot_commit_keeps_no_file(
        rt: Runtime, client: TestClient, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model is registered and the job marked succeeded in one transaction: when that
    transaction cannot commit (the database went away after the checkpoint was stored), the
    rollback takes the stored checkpoint too, and the job stays running for the reconciler
    to resume."""
    register = training_jobs.models.register

    def registered_then_lost(s: Session, *args: Any, **kwargs: Any) -> Any:
        row = register(s, *args, **kwargs)
        assert (rt.settings.data_dir / row.storage_path).is_file()

        def lost(_session: Session) -> None:
            raise OperationalError("COMMIT", {}, Exception("server closed the connection"))

        event.listen(s, "before_commit", lost, once=True)
        return row

    tid = _submit(client, key, evaluate=[{"benchmark": "clean"}])
    monkeypatch.setattr(training_jobs.models, "register", registered_then_lost)
    with pytest.raises(OperationalError, match="server closed the connection"):
        training_jobs.run(rt, uuid.UUID(tid))
    done = _get(client, key, tid)
    assert (done["status"], done["model_id"], done["evaluation_id"]) == ("running", None, None)
    assert client.get("/models", headers=auth(key)).json()["items"] == []
    assert client.get("/evaluations", headers=auth(key)).json()["items"] == []
    stored = rt.settings.data_dir / "models"
    assert not stored.exists() or sorted(stored.iterdir()) == []
    assert not list((rt.settings.data_dir / "tmp").glob("training-*"))


class Killed(BaseException):
    """The worker process dying: nothing in the job code catches it."""


def _on_progress(monkeypatch: pytest.MonkeyPatch, hook: Callable[[str], None]) -> None:
    """Call ``hook`` with each training progress message the supervisor receives from the
    engine child, before the supervisor records it."""
    real = jobs.Supervisor.progress

    def progress(self: jobs.Supervisor, fraction: float, stage: str, message: str) -> None:
        if stage == "training":
            hook(message)
        real(self, fraction, stage, message)

    monkeypatch.setattr(jobs.Supervisor, "progress", progress)


def _dying_in_epoch_two(monkeypatch: pytest.MonkeyPatch) -> None:
    def hook(message: str) -> None:
        if message.startswith("epoch 2/2, batch 2/"):
            raise Killed  # the supervisor dies; its child dies with it

    _on_progress(monkeypatch, hook)


def test_a_killed_worker_is_resumed_after_the_last_finished_epoch(
        rt: Runtime, client: TestClient, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tid = _submit(client, key)
    with monkeypatch.context() as m:
        _dying_in_epoch_two(m)
        with pytest.raises(Killed):
            training_jobs.run(rt, uuid.UUID(tid))
    mid = _get(client, key, tid)
    assert (mid["status"], mid["attempts"], mid["model_id"]) == ("running", 1, None)
    assert [h["epoch"] for h in mid["history"]] == [1]
    assert (rt.settings.data_dir / "state" / "trainings" / tid / "checkpoint.safetensors"
            ).is_file()
    assert training_jobs.run(rt, uuid.UUID(tid)) == "skipped"  # heartbeat still fresh
    with rt.sessions.begin() as s:  # the dead worker's heartbeat goes stale
        s.execute(update(Training).where(Training.id == uuid.UUID(tid)).values(
            heartbeat_at=utcnow() - timedelta(seconds=60)))
    messages: list[str] = []
    _on_progress(monkeypatch, messages.append)
    assert training_jobs.run(rt, uuid.UUID(tid)) == "succeeded"
    assert messages[0].startswith("epoch 2/2, batch 1/")  # epoch 1 was restored, not re-run
    done = _get(client, key, tid)
    assert done["attempts"] == 2
    assert done["history"][0] == mid["history"][0]
    path = rt.settings.data_dir / "models" / f"{done['model_id']}.safetensors"
    assert _same(load_file(str(path)), reference_state())  # as if never interrupted


def test_cancel_stops_a_running_training(rt: Runtime, client: TestClient, key: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    tid = _submit(client, key, epochs=50)

    def hook(message: str) -> None:
        if message.startswith("epoch 2/"):
            with rt.sessions.begin() as s:  # what POST /cancel does to a running job
                s.execute(update(Training).where(Training.id == uuid.UUID(tid))
                          .values(cancel_requested=True))

    _on_progress(monkeypatch, hook)
    start = time.monotonic()
    assert training_jobs.run(rt, uuid.UUID(tid)) == "cancelled"
    assert time.monotonic() - start < 60
    done = _get(client, key, tid)
    assert (done["status"], done["model_id"], done["progress"]["message"]) == (
        "cancelled", None, "cancelled by the user")
    assert 1 <= len(done["history"]) <= 3  # of 50 epochs: the child was killed
    assert client.get("/models", headers=auth(key)).json()["items"] == []


def test_an_architecture_that_cannot_take_the_inputs_fails_the_job(
        rt: Runtime, client: TestClient, key: str) -> None:
    tid = _submit(client, key, architecture="vit_b_16")  # needs 224x224 inputs
    assert training_jobs.run(rt, uuid.UUID(tid)) == "failed"
    err = _get(client, key, tid)["error"]
    assert err["type"] == "training-error"
    assert err["detail"].startswith("vit_b_16 cannot take inputs of shape [3, 32, 32]")


def test_reconciler_resends_lost_trainings(rt: Runtime, client: TestClient, key: str) -> None:
    lost, waiting = _submit(client, key), _submit(client, key, seed=4)
    old = utcnow() - timedelta(hours=1)
    with rt.sessions.begin() as s:
        s.execute(update(Training).where(Training.id == uuid.UUID(lost))
                  .values(enqueued_at=old))
    sent: list[Any] = []
    assert reconciler.reconcile_once(rt, lambda name, args: sent.append((name, args))) == [lost]
    assert sent == [(TRAIN_TASK, [lost])]
    assert waiting not in str(sent)


def test_a_sweep_runs_end_to_end_into_its_trade_off_table(
        rt: Runtime, client: TestClient, key: str) -> None:
    resp = client.post("/sweeps", headers=auth(key), json={
        "dataset": "shapes-32", "architecture": "small_cnn", "methods": ["standard", "fgsm_rs"],
        "threats": {"linf": [8 / 255]}, "epochs": 1, "batch_size": 16, "lr": 0.01,
        "train_examples": 32, "eval_examples": 8, "public": True,
        "suite": [{"benchmark": "clean"},
                  {"benchmark": "adversarial", "attack": "fgsm", "norm": "linf",
                   "eps": 8 / 255},
                  {"benchmark": "backgrounds"}]})
    assert resp.status_code == 202, resp.text
    sweep = resp.json()
    sent: list[tuple[str, list[Any]]] = []
    for tid in sweep["training_ids"]:
        assert training_jobs.run(rt, uuid.UUID(tid),
                                 send_task=lambda n, args: sent.append((n, args))) == "succeeded"
    assert [name for name, _ in sent] == [EVALUATE_TASK, EVALUATE_TASK]
    for _, (eid,) in sent:
        assert evaluation_jobs.run(rt, uuid.UUID(eid)) == "succeeded"
    done = client.get(f"/sweeps/{sweep['id']}", headers=auth(key)).json()
    assert done["status"] == "succeeded"
    assert done["progress"]["fraction"] == 1.0
    for row in done["table"]:
        ev = client.get(f"/evaluations/{row['evaluation_id']}", headers=auth(key)).json()
        values = {(r["benchmark"], r["metric"], r["params"].get("variant")): r["value"]
                  for r in ev["results"]}
        assert row["clean_accuracy"] == values[("clean", "accuracy", None)]
        assert row["robust_accuracy"] == {
            "linf:0.03137": values[("adversarial", "robust_accuracy", None)]}
        assert row["bg_gap"] == values[("backgrounds", "bg_gap", None)]
        assert row["mixed_rand_accuracy"] == values[("backgrounds", "accuracy", "mixed_rand")]
        assert row["rfs"] is None  # fg_bg_noise was not in this suite
        assert ev["public"] is True  # a public sweep's evaluations are public
    # Its page, and its models' reports, open to anyone.
    html = {"Accept": "text/html"}
    assert client.get(f"/sweeps/{sweep['id']}/report", headers=html).status_code == 200
    for row in done["table"]:
        assert client.get(f"/evaluations/{row['evaluation_id']}/report",
                          headers=html).status_code == 200


def test_a_training_on_an_uploaded_dataset(rt: Runtime, client: TestClient, key: str,
                                           tmp_path: Path) -> None:
    """A manifest upload with train and test splits (no val): test is the held-out split."""
    colours = [(220, 30, 30), (30, 30, 220)]
    files, lines = {}, ["path,label,split"]
    for i in range(24):
        label, split = i % 2, "train" if i < 16 else "test"
        files[f"img/{i}.png"] = png(solid(colours[label]))
        lines.append(f"img/{i}.png,{label},{split}")
    files["manifest.csv"] = ("\n".join(lines) + "\n").encode()
    archive = write_zip(tmp_path / "two.zip", files)
    up = upload_dataset(client, key, rt, archive, "two-colours")
    assert up.json()["status"] == "ready", up.text
    tid = _submit(client, key, dataset="two-colours", method="trades", epochs=1, batch_size=8,
                  train_examples=None, eval_examples=8)
    assert _get(client, key, tid)["held_out_split"] == "test"
    assert training_jobs.run(rt, uuid.UUID(tid)) == "succeeded"
    done = _get(client, key, tid)
    assert done["dataset"] == up.json()["id"]
    model = client.get(f"/models/{done['model_id']}", headers=auth(key)).json()
    assert (model["input_shape"], model["num_classes"]) == ([3, 8, 8], 2)
    assert [h["epoch"] for h in done["history"]] == [1]
