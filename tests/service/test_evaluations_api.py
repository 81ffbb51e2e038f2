"""The evaluation API without a worker: validation, idempotency, listing, cancel, tenancy.

Runs against SQLite and against Postgres (a database created for this test run).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.factories import api, auth, new_key, settings, tiny_net, torchscript_bytes, upload

SUITE = [{"benchmark": "clean"},
         {"benchmark": "adversarial", "attack": "pgd", "norm": "linf", "eps": [0.01, 0.03]}]


@pytest.fixture
def alice(client: TestClient, key: str) -> dict[str, Any]:
    model = upload(client, key, torchscript_bytes(tiny_net())).json()
    return {"key": key, "model": model["id"]}


def _create(client: TestClient, key: str, body: dict[str, Any], **headers: str) -> Any:
    return client.post("/evaluations", headers={**auth(key), **headers}, json=body)


def test_a_failed_commit_is_never_answered_202(client: TestClient, alice: dict[str, Any],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The request's transaction commits before the response is sent: a client never holds a
    202 for a job that is not (or never will be) in the database."""
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.orm import Session

    def broken_commit(self: Session) -> None:
        raise OperationalError("COMMIT", {}, Exception("disk I/O error"))

    as_deployed = TestClient(client.app, raise_server_exceptions=False)
    with monkeypatch.context() as m:
        m.setattr(Session, "commit", broken_commit)
        resp = _create(as_deployed, alice["key"], {"model_id": alice["model"],
                                                   "dataset": "shapes-32", "suite": SUITE})
    assert resp.status_code >= 500, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert client.get("/evaluations", headers=auth(alice["key"])).json()["items"] == []


def test_create_is_202_with_location_and_queued(client: TestClient,
                                                alice: dict[str, Any]) -> None:
    resp = _create(client, alice["key"], {"model_id": alice["model"], "dataset": "shapes-32",
                                          "suite": SUITE, "seed": 7})
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert resp.headers["location"] == f"/evaluations/{body['id']}"
    assert body["status"] == "queued"
    assert body["seed"] == 7
    assert body["attempts"] == 0
    assert body["progress"] == {"fraction": 0.0, "stage": "queued",
                                "message": "waiting for a worker"}
    assert body["suite"][1]["eps"] == [0.01, 0.03]
    assert body["results"] == []


def test_idempotency_key_returns_the_same_job(client: TestClient, alice: dict[str, Any]) -> None:
    body = {"model_id": alice["model"], "dataset": "shapes-32", "suite": SUITE}
    first = _create(client, alice["key"], body, **{"Idempotency-Key": "abc"})
    again = _create(client, alice["key"], body, **{"Idempotency-Key": "abc"})
    assert first.status_code == 202
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other = _create(client, alice["key"], {**body, "seed": 3}, **{"Idempotency-Key": "abc"})
    assert other.status_code == 409
    page = client.get("/evaluations", headers=auth(alice["key"])).json()
    assert len(page["items"]) == 1


def test_standard_preset_expands_to_what_the_dataset_supports(
        client: TestClient, alice: dict[str, Any]) -> None:
    resp = _create(client, alice["key"], {"model_id": alice["model"], "dataset": "shapes-32",
                                          "suite": "standard"})
    names = [e["benchmark"] for e in resp.json()["suite"]]
    assert names == ["clean", "adversarial", "fg_bg_noise", "backgrounds", "groups"]
    assert resp.json()["suite"][1]["attack"] == "autoattack"
    assert resp.json()["suite"][1]["eps"] == pytest.approx(8 / 255)


@pytest.mark.parametrize(("suite", "needle"), [
    ([{"benchmark": "adversarial", "attack": "pgd", "norm": "l3"}], "suite.0.adversarial.norm"),
    ([{"benchmark": "adversarial", "attack": "cw", "norm": "linf"}],
     "attack 'cw' does not support norm 'linf' (supported: l2)"),
    ([{"benchmark": "adversarial", "eps": 8}], "pixel units"),
    ([{"benchmark": "nope"}], "suite.0"),
    ([{"benchmark": "clean", "extra": 1}], "suite.0.clean.extra"),
    ([], "non-empty"),
    ([{"benchmark": "corruptions", "types": ["snow"]}], "unknown corruption types"),
    ([{"benchmark": "corruptions", "severities": [6]}], "suite.0.corruptions.severities"),
    ([{"benchmark": "spurious_shift", "correlation": 1.5}], "suite.0.spurious_shift.correlation"),
    ("weakest", "unknown suite preset"),
])
def test_bad_suites_are_422(client: TestClient, alice: dict[str, Any], suite: Any,
                            needle: str) -> None:
    resp = _create(client, alice["key"], {"model_id": alice["model"], "dataset": "shapes-32",
                                          "suite": suite})
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert needle in resp.text


def test_input_shape_mismatch_is_422(client: TestClient, alice: dict[str, Any]) -> None:
    resp = _create(client, alice["key"], {"model_id": alice["model"], "dataset": "colored-mnist",
                                          "suite": [{"benchmark": "clean"}]})
    assert resp.status_code == 422
    assert "[3, 28, 28]" in resp.json()["detail"]


def test_unknown_dataset_is_404(client: TestClient, alice: dict[str, Any]) -> None:
    resp = _create(client, alice["key"], {"model_id": alice["model"], "dataset": "cifar-10",
                                          "suite": [{"benchmark": "clean"}]})
    assert resp.status_code == 404
    assert "shapes-32" in resp.json()["detail"]


def test_list_filters_and_cursor_pagination(client: TestClient, alice: dict[str, Any]) -> None:
    ids = [_create(client, alice["key"], {"model_id": alice["model"], "dataset": "shapes-32",
                                          "suite": [{"benchmark": "clean"}], "seed": i}
                   ).json()["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/evaluations", headers=auth(alice["key"]), params=params).json()
        seen += [e["id"] for e in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    cancelled = client.post(f"/evaluations/{ids[0]}/cancel", headers=auth(alice["key"]))
    assert cancelled.status_code == 202
    assert cancelled.json()["status"] == "cancelled"
    page = client.get("/evaluations", headers=auth(alice["key"]),
                      params={"status": "cancelled"}).json()
    assert [e["id"] for e in page["items"]] == [ids[0]]
    again = client.post(f"/evaluations/{ids[0]}/cancel", headers=auth(alice["key"]))
    assert again.status_code == 409
    bad = client.get("/evaluations", headers=auth(alice["key"]), params={"cursor": "zzz"})
    assert bad.status_code == 422


def test_other_owners_see_nothing(client: TestClient, alice: dict[str, Any],
                                  db_url: str) -> None:
    ev = _create(client, alice["key"], {"model_id": alice["model"], "dataset": "shapes-32",
                                        "suite": [{"benchmark": "clean"}]}).json()
    bob = auth(new_key(db_url, f"bob-{uuid.uuid4().hex[:8]}"))
    assert client.get(f"/models/{alice['model']}", headers=bob).status_code == 404
    assert client.delete(f"/models/{alice['model']}", headers=bob).status_code == 404
    assert client.get("/models", headers=bob).json()["items"] == []
    assert client.get(f"/evaluations/{ev['id']}", headers=bob).status_code == 404
    assert client.post(f"/evaluations/{ev['id']}/cancel", headers=bob).status_code == 404
    assert client.get(f"/evaluations/{ev['id']}/report", headers=bob).status_code == 404
    assert client.get("/evaluations", headers=bob).json()["items"] == []
    resp = client.post("/evaluations", headers=bob, json={
        "model_id": alice["model"], "dataset": "shapes-32", "suite": [{"benchmark": "clean"}]})
    assert resp.status_code == 404
    # Alice still sees hers, and cannot delete a model with a queued job.
    assert client.get(f"/evaluations/{ev['id']}", headers=auth(alice["key"])).status_code == 200
    assert client.delete(f"/models/{alice['model']}",
                         headers=auth(alice["key"])).status_code == 409


def test_one_call_multipart_registers_model_and_job(client: TestClient, db_url: str) -> None:
    import json

    key = new_key(db_url, f"carol-{uuid.uuid4().hex[:8]}")
    spec = {"model": {"name": "one-call", "num_classes": 4, "input_shape": [3, 32, 32]},
            "dataset": "shapes-32", "suite": [{"benchmark": "clean"}]}
    resp = client.post("/evaluations", headers=auth(key),
                       files={"checkpoint": ("m.pt", torchscript_bytes(tiny_net()))},
                       data={"spec": json.dumps(spec)})
    assert resp.status_code == 202, resp.text
    assert resp.json()["model_name"] == "one-call"
    bad = client.post("/evaluations", headers=auth(key),
                      files={"checkpoint": ("m.pt", torchscript_bytes(tiny_net()))},
                      data={"spec": json.dumps({**spec, "suite": "nope"})})
    assert bad.status_code == 422
    models = client.get("/models", headers=auth(key)).json()["items"]
    assert [m["name"] for m in models] == ["one-call"]  # the refused call left no model


def test_datasets_lists_builtins(client: TestClient, alice: dict[str, Any]) -> None:
    items = client.get("/datasets", headers=auth(alice["key"])).json()["items"]
    shapes = next(d for d in items if d["name"] == "shapes-32")
    assert shapes["builtin"] is True
    assert shapes["input_shape"] == [3, 32, 32]
    assert shapes["has_masks"]
    assert shapes["has_groups"]
    assert set(shapes) >= {"id", "name", "builtin", "num_classes", "input_shape",
                           "num_examples", "splits", "has_masks", "has_groups", "created_at"}


def test_ready_reports_a_broker_that_is_down(sqlite_url: str, tmp_path: Path) -> None:
    cfg = settings(sqlite_url, tmp_path, broker_url="redis://127.0.0.1:1/0")
    with api(cfg) as c:
        resp = c.get("/ready")
        assert resp.status_code == 503
        assert resp.json()["checks"]["database"] == "ok"
        assert resp.json()["checks"]["broker"].startswith("unavailable")
        assert c.get("/health").status_code == 200


def test_ready_reports_a_database_that_is_down(tmp_path: Path) -> None:
    cfg = settings("postgresql+psycopg://postgres@127.0.0.1:1/none", tmp_path)
    with api(cfg) as c:
        resp = c.get("/ready")
        assert resp.status_code == 503
        assert "database" in resp.json()["detail"]
        assert resp.headers["content-type"].startswith("application/problem+json")


def test_polling_answers_the_orm_record_with_an_etag_and_304_while_unchanged(
        client: TestClient, alice: dict[str, Any], db_url: str) -> None:
    """``GET /evaluations/{id}`` reads with Core on its own path: the same record as the ORM's
    (results, error, checks, options included), an ETag, 304 for a current If-None-Match,
    and a new tag once the job changes; a revoked key is 401 at once."""
    from sqlalchemy import update

    from core.db import make_engine, make_sessionmaker, transaction
    from core.keys import revoke
    from core.tables import Evaluation, Result
    from service.evaluations import service

    ev = _create(client, alice["key"], {"model_id": alice["model"], "dataset": "shapes-32",
                                        "suite": SUITE, "n_examples": 7}).json()
    headers = auth(alice["key"])
    first = client.get(f"/evaluations/{ev['id']}", headers=headers)
    assert first.status_code == 200
    tag = first.headers["etag"]
    assert first.json() == ev | {"progress": first.json()["progress"]}
    again = client.get(f"/evaluations/{ev['id']}", headers={**headers, "If-None-Match": tag})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == tag
    other = client.get(f"/evaluations/{ev['id']}", headers={**headers, "If-None-Match": '"x"'})
    assert other.status_code == 200
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    eid = uuid.UUID(ev["id"])
    with transaction(sessions) as s:
        s.execute(update(Evaluation).where(Evaluation.id == eid).values(
            status="failed", error={"type": "oom", "detail": "out of memory"},
            checks=[{"name": "degenerate", "passed": True}], timings={"0:clean": 1.5},
            artifacts={"flags.npy": "x/flags.npy"}, progress_fraction=0.5))
        for i, (metric, value) in enumerate((("accuracy", 0.875), ("robust_accuracy", 0.1))):
            s.add(Result(evaluation_id=eid, entry_index=i, benchmark="clean", metric=metric,
                         value=value, params={"eps": 0.03 * i}, params_key=str(i)))
    changed = client.get(f"/evaluations/{ev['id']}", headers={**headers, "If-None-Match": tag})
    assert changed.status_code == 200
    assert changed.headers["etag"] != tag
    with sessions() as s:
        row = s.get(Evaluation, eid)
        assert row is not None
        orm = service.to_out(service.get(s, row.owner, eid))
    assert changed.json() == orm.model_dump(mode="json")
    assert [r["value"] for r in changed.json()["results"]] == [0.875, 0.1]
    with transaction(sessions) as s:
        revoke(s, alice["key"].split("_")[1])
    engine.dispose()
    assert client.get(f"/evaluations/{ev['id']}", headers=headers).status_code == 401
    assert client.get(f"/evaluations/{ev['id']}").status_code == 401


def test_the_polling_path_answers_every_form_of_the_id_alike(
        client: TestClient, alice: dict[str, Any]) -> None:
    """The guard serves ``GET /evaluations/{id}`` itself for the canonical forms of the id;
    the framework's route answers the rest. Both give the same record, tag and errors."""
    from service.http.polling import hot_route

    ev = _create(client, alice["key"], {"model_id": alice["model"], "dataset": "shapes-32",
                                        "suite": SUITE}).json()
    hyphenated, upper, plain = ev["id"], ev["id"].upper(), uuid.UUID(ev["id"]).hex
    braces = "{" + ev["id"] + "}"  # a form the framework's UUID parser takes
    for path, hot in ((hyphenated, True), (upper, True), (plain, True), (braces, False)):
        assert (hot_route({"method": "GET", "path": f"/evaluations/{path}", "app": client.app})
                is not None) is hot
    answers = [client.get(f"/evaluations/{form}", headers=auth(alice["key"]))
               for form in (hyphenated, upper, plain, braces)]
    assert {a.status_code for a in answers} == {200}
    assert len({a.content for a in answers}) == 1
    assert len({a.headers["etag"] for a in answers}) == 1
    assert answers[0].headers["content-type"] == "application/json"
    for scope in ({"method": "POST", "path": f"/evaluations/{hyphenated}"},
                  {"method": "GET", "path": f"/evaluations/{hyphenated}/"},
                  {"method": "GET", "path": f"/evaluations/{hyphenated}/events"},
                  {"method": "GET", "path": "/evaluations/not-an-id"},
                  {"method": "GET", "path": f"/models/{hyphenated}"}):
        assert hot_route({**scope, "app": client.app}) is None
    missing = client.get(f"/evaluations/{uuid.uuid4()}", headers=auth(alice["key"]))
    anonymous = client.get(f"/evaluations/{hyphenated}")
    wrong_key = client.get(f"/evaluations/{hyphenated}", headers=auth("rs_nokey_" + "x" * 20))
    for resp, status in ((missing, 404), (anonymous, 401), (wrong_key, 401)):
        assert resp.status_code == status
        assert resp.headers["content-type"] == "application/problem+json"
        assert resp.json()["status"] == status
    assert client.get("/evaluations/not-an-id", headers=auth(alice["key"])).status_code == 422
