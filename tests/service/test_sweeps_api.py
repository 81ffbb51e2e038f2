"""Sweeps: the grid becomes trainings with the default two-axis suite; the table is read back
from their evaluations' results; cancel; validation; tenancy."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from core.db import make_engine, make_sessionmaker
from core.tables import Evaluation, Result, Training
from tests.factories import auth, check_unknown_dataset_refused, new_key

SWEEP: dict[str, Any] = {
    "dataset": "shapes-32", "architecture": "small_cnn", "methods": ["standard", "pgd", "trades"],
    "threats": {"linf": [0.0314, 0.0157], "l2": [0.5]}, "steps": 5, "epochs": 3,
    "batch_size": 64, "lr": 0.05, "seed": 2,
}


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    return sqlite_url


def _create(client: TestClient, key: str, body: dict[str, Any]) -> Any:
    return client.post("/sweeps", headers=auth(key), json=body)


def test_a_sweep_queues_one_training_per_grid_point(client: TestClient, key: str) -> None:
    resp = _create(client, key, SWEEP)
    assert resp.status_code == 202, resp.text
    sweep = resp.json()
    assert resp.headers["location"] == f"/sweeps/{sweep['id']}"
    assert sweep["status"] == "queued"
    assert [(r["method"], r["norm"], r["eps"]) for r in sweep["table"]] == [
        ("standard", None, None),
        ("pgd", "linf", 0.0314), ("pgd", "linf", 0.0157), ("pgd", "l2", 0.5),
        ("trades", "linf", 0.0314), ("trades", "linf", 0.0157), ("trades", "l2", 0.5)]
    assert all(r["training_status"] == "queued" and r["clean_accuracy"] is None
               for r in sweep["table"])
    suite = [{"benchmark": "clean"},
             {"benchmark": "adversarial", "attack": "apgd-ce", "norm": "linf",
              "eps": [0.0157, 0.0314]},
             {"benchmark": "adversarial", "attack": "apgd-ce", "norm": "l2", "eps": [0.5]},
             {"benchmark": "backgrounds"}, {"benchmark": "fg_bg_noise"},
             {"benchmark": "groups"}]
    assert sweep["spec"]["suite"] == suite
    listed = client.get("/trainings", headers=auth(key)).json()["items"]
    assert sorted(t["id"] for t in listed) == sorted(sweep["training_ids"])
    first = client.get(f"/trainings/{sweep['training_ids'][1]}", headers=auth(key)).json()
    assert (first["name"], first["seed"], first["epochs"]) == ("small_cnn-pgd-linf-0.0314", 2, 3)
    assert first["threat"] == {"norm": "linf", "eps": 0.0314, "steps": 5,
                               "step_size": 2.5 * 0.0314 / 5}
    assert [e["benchmark"] for e in first["evaluate"]] == [e["benchmark"] for e in suite]
    again = client.get(f"/sweeps/{sweep['id']}", headers=auth(key)).json()
    assert again == sweep


@pytest.mark.parametrize(("change", "needle"), [
    ({"methods": []}, "methods"),
    ({"methods": ["pgd", "pgd"]}, "must not repeat"),
    ({"threats": {}}, "need threats"),
    ({"threats": {"linf": [0.01 * i for i in range(1, 9)], "l2": [0.1 * i for i in range(1, 9)],
                  "l1": [1.0 * i for i in range(1, 9)]}}, "at most 32"),
    ({"threats": {"l5": [0.1]}}, "threats.l5"),
    ({"suite": [{"benchmark": "groups", "x": 1}]}, "suite"),
])
def test_bad_sweeps_are_422_and_create_nothing(client: TestClient, key: str,
                                               change: dict[str, Any], needle: str) -> None:
    resp = _create(client, key, {**SWEEP, **change})
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert needle in resp.text
    assert client.get("/trainings", headers=auth(key)).json()["items"] == []


def test_an_unknown_dataset_is_a_404_and_creates_nothing(client: TestClient, key: str) -> None:
    check_unknown_dataset_refused(client, key, "/sweeps", SWEEP)


def test_the_table_reads_the_evaluations_and_cancel_stops_the_rest(
        client: TestClient, key: str, owner: str, sqlite_url: str) -> None:
    sweep = _create(client, key, {**SWEEP, "methods": ["standard", "pgd"],
                                  "threats": {"linf": [0.0314]}}).json()
    standard_id, pgd_id = (uuid.UUID(i) for i in sweep["training_ids"])
    engine = make_engine(sqlite_url)
    with make_sessionmaker(engine).begin() as s:  # what the workers leave behind
        ev = Evaluation(owner=owner, model_name="m", dataset="shapes-32", suite=[], seed=2,
                        status="succeeded", progress_fraction=1.0, results=[
            Result(entry_index=0, benchmark="clean", metric="accuracy", value=0.9,
                   params={}, params_key="{}", n=200),
            Result(entry_index=1, benchmark="adversarial", metric="robust_accuracy", value=0.1,
                   params={"attack": "apgd-ce", "norm": "linf", "eps": 0.0314},
                   params_key="a", n=200),
            Result(entry_index=1, benchmark="adversarial", metric="zero_gradient_fraction",
                   value=0.25, params={"attack": "apgd-ce", "norm": "linf", "loss": "ce"},
                   params_key="z"),
            Result(entry_index=2, benchmark="backgrounds", metric="accuracy", value=0.4,
                   params={"variant": "mixed_rand"}, params_key="b"),
            Result(entry_index=2, benchmark="backgrounds", metric="bg_gap", value=0.3,
                   params={}, params_key="c"),
            Result(entry_index=3, benchmark="fg_bg_noise", metric="rfs", value=0.7,
                   params={"sigma": 0.25, "trials": 3}, params_key="d"),
            Result(entry_index=3, benchmark="fg_bg_noise", metric="rfs", value=0.6,
                   params={"sigma": "mean", "trials": 3}, params_key="e")])
        s.add(ev)
        s.flush()
        s.execute(update(Training).where(Training.id == standard_id).values(
            status="succeeded", progress_fraction=1.0, evaluation_id=ev.id))
        s.execute(update(Training).where(Training.id == pgd_id).values(
            status="running", progress_fraction=0.5))
    engine.dispose()
    got = client.get(f"/sweeps/{sweep['id']}", headers=auth(key)).json()
    assert got["status"] == "running"
    assert got["progress"]["fraction"] == pytest.approx((1.0 + 0.25) / 2)
    assert got["progress"]["message"] == "1 of 2 trainings and 1 evaluations succeeded"
    row = got["table"][0]
    assert {k: row[k] for k in ("clean_accuracy", "robust_accuracy", "bg_gap",
                                "mixed_rand_accuracy", "rfs", "evaluation_status",
                                "zero_gradient_fraction")} == {
        "clean_accuracy": 0.9, "robust_accuracy": {"linf:0.0314": 0.1}, "bg_gap": 0.3,
        "mixed_rand_accuracy": 0.4, "rfs": 0.6, "evaluation_status": "succeeded",
        "zero_gradient_fraction": {"linf": 0.25}}
    # Intervals for the accuracies stored with their count (180 and 20 of 200), by hand:
    # Wilson (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n).
    assert row["intervals"] == {"clean_accuracy": pytest.approx([0.8506, 0.9343], abs=1e-4),
                                "robust_accuracy:linf:0.0314": pytest.approx([0.0657, 0.1494],
                                                                             abs=1e-4)}
    page = client.get(f"/sweeps/{sweep['id']}/report", headers=auth(key)).text
    assert "<th>no gradient l_inf</th>" in page
    assert "0.250" in page
    assert got["table"][1]["training_status"] == "running"
    cancelled = client.post(f"/sweeps/{sweep['id']}/cancel", headers=auth(key))
    assert cancelled.status_code == 202
    assert cancelled.json()["status"] == "running"  # the running training stops cooperatively
    pgd = client.get(f"/trainings/{pgd_id}", headers=auth(key)).json()
    assert pgd["progress"]["message"].startswith("cancellation requested")
    bob = auth(new_key(sqlite_url, "bob"))
    assert client.get(f"/sweeps/{sweep['id']}", headers=bob).status_code == 404
    assert client.post(f"/sweeps/{sweep['id']}/cancel", headers=bob).status_code == 404


def test_cancelling_a_queued_sweep_cancels_every_training(client: TestClient,
                                                          key: str) -> None:
    sweep = _create(client, key, SWEEP).json()
    done = client.post(f"/sweeps/{sweep['id']}/cancel", headers=auth(key)).json()
    assert done["status"] == "cancelled"
    assert {r["training_status"] for r in done["table"]} == {"cancelled"}
    assert client.post(f"/sweeps/{sweep['id']}/cancel", headers=auth(key)).status_code == 409


def test_sweeps_are_listed_newest_first_per_owner(client: TestClient, key: str,
                                                  sqlite_url: str) -> None:
    small = {**SWEEP, "methods": ["standard"]}
    first = _create(client, key, small).json()
    second = _create(client, key, {**small, "seed": 3}).json()
    page = client.get("/sweeps", headers=auth(key), params={"limit": 1}).json()
    assert [s["id"] for s in page["items"]] == [second["id"]]
    assert page["items"][0] == client.get(f"/sweeps/{second['id']}", headers=auth(key)).json()
    rest = client.get("/sweeps", headers=auth(key),
                      params={"limit": 1, "cursor": page["next_cursor"]}).json()
    assert [s["id"] for s in rest["items"]] == [first["id"]]
    assert rest["next_cursor"] is None
    assert client.get("/sweeps", headers=auth(new_key(sqlite_url, "bob"))).json() == {
        "items": [], "next_cursor": None}
    bad = client.get("/sweeps", headers=auth(key), params={"cursor": "nonsense"})
    assert bad.status_code == 422
    assert client.get("/sweeps").status_code == 401


def test_a_retried_sweep_with_its_idempotency_key_queues_nothing_twice(
        client: TestClient, key: str) -> None:
    headers = {**auth(key), "Idempotency-Key": "sweep-1"}
    first = client.post("/sweeps", headers=headers, json=SWEEP)
    assert first.status_code == 202, first.text
    again = client.post("/sweeps", headers=headers, json=SWEEP)
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert len(client.get("/trainings", params={"limit": 100},
                          headers=auth(key)).json()["items"]) == 7
    other = client.post("/sweeps", headers=headers, json={**SWEEP, "seed": 3})
    assert other.status_code == 409
    assert other.json()["type"].endswith("conflict")
    # another owner's identical key is theirs alone
    bob = new_key(client.app.state.settings.database_url, "bob")  # type: ignore[attr-defined]
    assert client.post("/sweeps", headers={**auth(bob), "Idempotency-Key": "sweep-1"},
                       json=SWEEP).status_code == 202
