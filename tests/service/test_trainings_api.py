"""The training API without a worker: validation, defaults, idempotency, listing, cancel,
tenancy. Runs against SQLite and against Postgres (a database created for this test run)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from core.tables import Training
from tests.factories import auth, check_unknown_dataset_refused, new_key

SPEC: dict[str, Any] = {
    "dataset": "shapes-32", "architecture": "small_cnn", "method": "pgd",
    "threat": {"norm": "linf", "eps": 8 / 255, "steps": 7}, "epochs": 2, "batch_size": 64,
    "lr": 0.1, "seed": 5,
}


def _create(client: TestClient, key: str, body: dict[str, Any], **headers: str) -> Any:
    return client.post("/trainings", headers={**auth(key), **headers}, json=body)


def test_create_is_202_with_location_and_the_filled_in_spec(client: TestClient,
                                                             key: str) -> None:
    resp = _create(client, key, {**SPEC, "evaluate": [{"benchmark": "clean"}]})
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert resp.headers["location"] == f"/trainings/{body['id']}"
    assert body["status"] == "queued"
    assert body["progress"] == {"fraction": 0.0, "stage": "queued",
                                "message": "waiting for a worker"}
    assert body["threat"] == {"norm": "linf", "eps": 8 / 255, "steps": 7,
                              "step_size": 2.5 * (8 / 255) / 7}
    assert (body["epochs"], body["batch_size"], body["lr"], body["seed"]) == (2, 64, 0.1, 5)
    assert (body["optimizer"], body["lr_schedule"], body["beta"]) == ("sgd", "cosine", None)
    assert body["held_out_split"] == "val"
    assert body["name"] == "small_cnn-pgd-linf-0.03137"
    assert body["evaluate"] == [{"benchmark": "clean"}]
    assert body["history"] == []
    assert (body["model_id"], body["evaluation_id"], body["error"]) == (None, None, None)
    assert body["attempts"] == 0
    got = client.get(f"/trainings/{body['id']}", headers=auth(key))
    assert got.status_code == 200
    assert got.json() == body


def test_method_defaults(client: TestClient, key: str) -> None:
    fgsm = _create(client, key, {**SPEC, "method": "fgsm_rs",
                                 "threat": {"norm": "l2", "eps": 0.5}}).json()
    assert fgsm["threat"] == {"norm": "l2", "eps": 0.5, "steps": 1, "step_size": 0.625}
    trades = _create(client, key, {**SPEC, "method": "trades", "beta": 3.0,
                                   "threat": {"norm": "l1", "eps": 12.0}}).json()
    assert trades["threat"] == {"norm": "l1", "eps": 12.0, "steps": 10, "step_size": 3.0}
    assert trades["beta"] == 3.0
    # standard training needs no threat: robust accuracy is measured at the dataset's default
    standard = _create(client, key, {k: v for k, v in SPEC.items() if k != "threat"}
                       | {"method": "standard", "name": "baseline"}).json()
    assert standard["threat"] == {"norm": "linf", "eps": 8 / 255, "steps": 10,
                                  "step_size": 2.5 * (8 / 255) / 10}
    assert standard["name"] == "baseline"


@pytest.mark.parametrize(("change", "field"), [
    ({"method": "madry"}, "method"),
    ({"threat": None}, "threat"),
    ({"threat": {"norm": "l3", "eps": 0.1}}, "threat.norm"),
    ({"threat": {"norm": "linf", "eps": 0}}, "threat.eps"),
    ({"threat": {"norm": "linf", "eps": 0.03, "steps": 0}}, "threat.steps"),
    ({"method": "fgsm_rs", "threat": {"norm": "linf", "eps": 0.03, "steps": 5}}, "steps"),
    ({"beta": 2.0}, "beta"),
    ({"epochs": 0}, "epochs"),
    ({"batch_size": 1}, "batch_size"),
    ({"lr": -1}, "lr"),
    ({"seed": -1}, "seed"),
    ({"surprise": 1}, "surprise"),
    ({"architecture": "resnet9000"}, "architecture"),
    ({"dataset_params": {"colour": 1}}, "dataset_params"),
    ({"evaluate": [{"benchmark": "nonsense"}]}, "suite"),
    ({"evaluate": "everything"}, "suite"),
])
def test_bad_specs_are_422_problems(client: TestClient, key: str, change: dict[str, Any],
                                    field: str) -> None:
    resp = _create(client, key, {**SPEC, **change})
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    problem = resp.json()
    assert problem["status"] == 422
    assert field in resp.text
    assert client.get("/trainings", headers=auth(key)).json()["items"] == []


def test_an_unknown_dataset_is_a_404_naming_the_field(client: TestClient, key: str) -> None:
    check_unknown_dataset_refused(client, key, "/trainings", SPEC)


def test_missing_required_fields_are_named(client: TestClient, key: str) -> None:
    resp = _create(client, key, {"dataset": "shapes-32", "method": "standard"})
    assert resp.status_code == 422
    fields = {e["field"] for e in resp.json()["errors"]}
    assert fields == {"architecture"}  # epochs, batch_size and lr have method defaults


def test_a_threat_is_required_for_adversarial_methods(client: TestClient, key: str) -> None:
    resp = _create(client, key, {k: v for k, v in SPEC.items() if k != "threat"})
    assert resp.status_code == 422
    assert "method 'pgd' needs a threat" in resp.json()["detail"]


def test_idempotency_key_returns_the_same_job(client: TestClient, key: str) -> None:
    first = _create(client, key, SPEC, **{"Idempotency-Key": "t-1"})
    again = _create(client, key, SPEC, **{"Idempotency-Key": "t-1"})
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == f"/trainings/{first.json()['id']}"
    other = _create(client, key, {**SPEC, "seed": 6}, **{"Idempotency-Key": "t-1"})
    assert other.status_code == 409
    assert other.json()["reason"] == "idempotency-key-reused"
    assert len(client.get("/trainings", headers=auth(key)).json()["items"]) == 1


def test_list_cancel_and_cursor(client: TestClient, key: str) -> None:
    ids = [_create(client, key, {**SPEC, "seed": s}).json()["id"] for s in range(3)]
    page = client.get("/trainings", headers=auth(key), params={"limit": 2}).json()
    assert [t["id"] for t in page["items"]] == ids[::-1][:2]
    rest = client.get("/trainings", headers=auth(key),
                      params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert [t["id"] for t in rest["items"]] == [ids[0]]
    assert rest["next_cursor"] is None
    cancelled = client.post(f"/trainings/{ids[1]}/cancel", headers=auth(key))
    assert cancelled.status_code == 202
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None
    again = client.post(f"/trainings/{ids[1]}/cancel", headers=auth(key))
    assert again.status_code == 409
    only = client.get("/trainings", headers=auth(key), params={"status": "cancelled"}).json()
    assert [t["id"] for t in only["items"]] == [ids[1]]
    assert client.get("/trainings", headers=auth(key),
                      params={"cursor": "nonsense"}).status_code == 422


def test_other_owners_see_nothing(client: TestClient, key: str, db_url: str) -> None:
    tid = _create(client, key, SPEC).json()["id"]
    bob = auth(new_key(db_url, f"bob-{uuid.uuid4().hex[:8]}"))
    assert client.get(f"/trainings/{tid}", headers=bob).status_code == 404
    assert client.get(f"/trainings/{tid}/events", headers=bob).status_code == 404
    assert client.post(f"/trainings/{tid}/cancel", headers=bob).status_code == 404
    assert client.get("/trainings", headers=bob).json()["items"] == []
    assert client.get(f"/trainings/{uuid.uuid4()}", headers=auth(key)).status_code == 404
    assert client.get(f"/trainings/{tid}").status_code == 401
    # bob's cancel did nothing
    assert client.get(f"/trainings/{tid}", headers=auth(key)).json()["status"] == "queued"


def _events(client: TestClient, key: str, tid: str) -> list[tuple[str, Any]]:
    with client.stream("GET", f"/trainings/{tid}/events", headers=auth(key)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    blocks = [b.split("\n") for b in text.strip().split("\n\n")]
    return [(b[0].removeprefix("event: "), json.loads(b[1].removeprefix("data: ")))
            for b in blocks]


@pytest.mark.slow
def test_events_follow_a_training_to_its_end(client: TestClient, key: str) -> None:
    tid = _create(client, key, SPEC).json()["id"]
    sessions = client.app.state.sessionmaker  # type: ignore[attr-defined]

    def set_state(**values: Any) -> None:
        with sessions.begin() as s:
            s.execute(update(Training).where(Training.id == uuid.UUID(tid)).values(**values))

    set_state(status="running", progress_fraction=0.5, progress_stage="epoch 1/2",
              progress_message="loss 1.23")
    finisher = threading.Timer(1.2, set_state, kwargs={
        "status": "succeeded", "progress_fraction": 1.0, "progress_stage": "succeeded",
        "progress_message": "done"})
    finisher.start()
    try:
        events = _events(client, key, tid)
    finally:
        finisher.join()
    assert events[0] == ("progress", {"status": "running", "fraction": 0.5,
                                      "stage": "epoch 1/2", "message": "loss 1.23"})
    assert events[-2] == ("progress", {"status": "succeeded", "fraction": 1.0,
                                       "stage": "succeeded", "message": "done"})
    assert [name for name, _ in events] == ["progress", "progress", "end"]
    end = events[-1][1]
    assert (end["id"], end["status"], end["epochs"]) == (tid, "succeeded", 2)


def test_events_of_a_cancelled_training_end_at_once(client: TestClient, key: str) -> None:
    tid = _create(client, key, SPEC).json()["id"]
    assert client.post(f"/trainings/{tid}/cancel", headers=auth(key)).status_code == 202
    t0 = time.monotonic()
    events = _events(client, key, tid)
    assert time.monotonic() - t0 < 5.0
    assert [name for name, _ in events] == ["progress", "end"]
    assert events[0][1]["status"] == "cancelled"
    assert events[1][1]["status"] == "cancelled"


def test_polling_a_training_is_tagged_and_conditional(client: TestClient, key: str,
                                                      db_url: str) -> None:
    """``GET /trainings/{id}`` is served on the polling path (:mod:`service.http.polling`): the
    same record as the list (read by the ORM), an ``ETag``, 304 while the job is unchanged,
    and the same answer from the framework's route for the forms of the id the guard does
    not take. On PostgreSQL the path reads through psycopg's asyncio connections."""
    from service.http.polling import PostgresRecords, ThreadedRecords, hot_route

    reader = client.app.state.records  # type: ignore[attr-defined]
    assert isinstance(reader, PostgresRecords if db_url.startswith("postgresql")
                      else ThreadedRecords)

    tid = _create(client, key, SPEC).json()["id"]
    app = client.app
    assert hot_route({"method": "GET", "path": f"/trainings/{tid}", "app": app}) is not None
    assert hot_route({"method": "GET", "path": f"/trainings/{tid}/events", "app": app}) is None
    assert hot_route({"method": "POST", "path": f"/trainings/{tid}/cancel", "app": app}) is None
    first = client.get(f"/trainings/{tid}", headers=auth(key))
    assert first.status_code == 200
    assert first.headers["content-type"] == "application/json"
    listed = client.get("/trainings", headers=auth(key)).json()["items"]
    assert first.json() == listed[0]
    tag = first.headers["etag"]
    braces = client.get("/trainings/{" + tid + "}", headers=auth(key))
    assert (braces.status_code, braces.content, braces.headers["etag"]) == (
        200, first.content, tag)
    same = client.get(f"/trainings/{tid}", headers={**auth(key), "If-None-Match": tag})
    assert (same.status_code, same.content, same.headers["etag"]) == (304, b"", tag)
    sessions = client.app.state.sessionmaker  # type: ignore[attr-defined]
    with sessions.begin() as s:
        s.execute(update(Training).where(Training.id == uuid.UUID(tid))
                  .values(status="running", progress_fraction=0.5, progress_stage="epoch 1"))
    changed = client.get(f"/trainings/{tid}", headers={**auth(key), "If-None-Match": tag})
    assert changed.status_code == 200
    assert changed.headers["etag"] != tag
    assert changed.json()["progress"]["fraction"] == 0.5
    assert changed.json() == client.get("/trainings", headers=auth(key)).json()["items"][0]
    problem = client.get(f"/trainings/{tid}", headers=auth("rs_nokey_" + "x" * 20))
    assert problem.status_code == 401
    assert problem.headers["content-type"] == "application/problem+json"
