"""GET /leaderboard: ranked on SQLite and Postgres at one threat (the dataset's standard one
unless asked), limited, tenant-scoped (public rows for anyone, the caller's own beside them),
and a misspelt name is a 422 that says what exists. The ranking rules on real measurements
are in test_leaderboard_rules.py."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.db import make_engine, make_sessionmaker
from core.tables import Evaluation, Result
from tests.factories import auth, new_key

Row = tuple[str, float, dict[str, Any]]


def _evaluation(db_url: str, owner: str, public: bool, rows: list[Row], dataset: str) -> str:
    sessions = make_sessionmaker(make_engine(db_url))
    with sessions.begin() as s:
        ev = Evaluation(owner=owner, model_name=f"m-{owner}", dataset=dataset, suite=[], seed=0,
                        status="succeeded", public=public, progress_fraction=1.0)
        ev.results = [Result(entry_index=0, benchmark="adversarial", metric=metric, value=value,
                             params=params, params_key=json.dumps(params, sort_keys=True))
                      for metric, value, params in rows]
        s.add(ev)
        s.flush()
        return str(ev.id)


def test_ranked_filtered_limited_and_scoped(client: TestClient, db_url: str) -> None:
    dataset = f"board-{uuid.uuid4().hex[:6]}"
    alice, bob = f"alice-{uuid.uuid4().hex[:6]}", f"bob-{uuid.uuid4().hex[:6]}"
    aa = {"attack": "autoattack"}
    linf8, linf4, l2 = ({**aa, "norm": "linf", "eps": 0.0314},
                        {**aa, "norm": "linf", "eps": 0.0157}, {**aa, "norm": "l2", "eps": 0.5})
    pgd8 = {"attack": "pgd", "norm": "linf", "eps": 0.0314}
    a1 = _evaluation(db_url, alice, False, [("robust_accuracy", 0.4, linf8),
                                            ("robust_accuracy", 0.9, l2)], dataset)
    a2 = _evaluation(db_url, alice, False, [("robust_accuracy", 0.6, linf8),
                                            ("robust_accuracy", 0.7, linf4),
                                            ("robust_accuracy", 0.65, pgd8)], dataset)
    b1 = _evaluation(db_url, bob, True, [("robust_accuracy", 0.5, linf8)], dataset)
    b2 = _evaluation(db_url, bob, False, [("robust_accuracy", 0.95, linf8)], dataset)
    assert b2 not in {r["evaluation_id"] for r in client.get("/leaderboard", params={
        "dataset": dataset, "metric": "robust_accuracy"}).json()["rows"]}
    key = new_key(db_url, alice)

    def board(**params: Any) -> Any:
        return client.get("/leaderboard", headers=auth(key), params={
            "dataset": dataset, "metric": "robust_accuracy", **params})

    rows = board(threat="linf:0.0314").json()["rows"]
    assert [(r["evaluation_id"], r["value"], r["rank"]) for r in rows] == [
        (a2, 0.6, 1), (b1, 0.5, 2), (a1, 0.4, 3)]  # bob's private 0.95 is not alice's to see
    # Without a threat: the dataset's standard one (AutoAttack, l_inf 8/255 = 0.031373).
    assert [r["evaluation_id"] for r in board().json()["rows"]] == [a2, b1, a1]
    assert [r["value"] for r in board(threat="linf").json()["rows"]] == [0.6, 0.5, 0.4]
    assert [r["value"] for r in board(threat="linf:0.0157").json()["rows"]] == [0.7]
    assert [r["value"] for r in board(threat="linf:0.0314", attack="pgd").json()["rows"]] == [
        0.65]
    assert [r["value"] for r in board(limit=2).json()["rows"]] == [0.6, 0.5]
    assert [r["value"] for r in board(threat="l2:0.5").json()["rows"]] == [0.9]
    # Anyone reads the public rows; nobody else's private ones.
    anonymous = client.get("/leaderboard", params={"dataset": dataset,
                                                   "metric": "robust_accuracy"}).json()
    assert [(r["evaluation_id"], r["rank"]) for r in anonymous["rows"]] == [(b1, 1)]


@pytest.mark.parametrize(("params", "field", "needle"), [
    ({"metric": "robust_acuracy"}, "metric", "no metric 'robust_acuracy'"),
    ({"benchmark": "adversarail"}, "benchmark", "known: adversarial"),
    ({"threat": "l5"}, "threat", "linf"),
    ({"threat": "linf:big"}, "threat", "NORM:EPS"),
    ({"threat": "linf:-1"}, "threat", "positive"),
])
def test_a_misspelt_name_is_a_422_naming_what_exists(client: TestClient, db_url: str,
                                                     params: dict[str, str], field: str,
                                                     needle: str) -> None:
    key = new_key(db_url, f"c-{uuid.uuid4().hex[:6]}")
    resp = client.get("/leaderboard", headers=auth(key), params={
        "dataset": "shapes-32", "metric": "robust_accuracy", **params})
    assert resp.status_code == 422
    assert resp.json()["type"].endswith("/invalid")
    assert resp.json()["field"] == field
    assert needle in resp.json()["detail"]
