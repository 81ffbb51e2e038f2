"""Intervals on accuracies and the paired comparison with a baseline, end to end without a
broker: jobs submitted through the API, run by the worker's job code in this process (no
jail), read back through the API. Expected values are computed here from the models'
own predictions on the same examples."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from scipy.stats import binomtest
from sqlalchemy import update
from torch import nn

from contract.stats import Paired, wilson
from core.tables import Evaluation
from tests.factories import api, auth, new_key, settings, torchscript_bytes, upload, worker_runtime
from workers import evaluation_jobs
from workers.engine.benchmarks.clean import predict
from workers.engine.data import load_builtin
from workers.engine.data.subset import seeded_subset
from workers.engine.types import RunContext

DATASET, N = "waterbirds-32", 120
META = {"num_classes": 2, "input_shape": [3, 32, 32]}
SUITE = [{"benchmark": "clean"}, {"benchmark": "groups"}, {"benchmark": "backgrounds"}]


@pytest.fixture
def env(sqlite_url: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    cfg = settings(sqlite_url, tmp_path / "data")
    rt = worker_runtime(sqlite_url, tmp_path / "data", sandbox="off")
    with api(cfg) as client:
        yield {"client": client, "rt": rt, "key": new_key(sqlite_url, "alice"),
               "url": sqlite_url}
    rt.engine.dispose()


def colour_net(channel: int) -> nn.Module:
    """Calls class 1 when the image's mean in ``channel`` is above its mean over the channels:
    two such nets on different channels disagree on some of the examples."""
    net = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    with torch.no_grad():
        w = -torch.ones(3) / 3
        w[channel] += 1
        net[2].weight.copy_(torch.stack([-w, w]) * 50)
        net[2].bias.zero_()
    return net.eval()


def _model(env: dict[str, Any], channel: int, key: str | None = None) -> str:
    meta = {**META, "name": f"net-{channel}"}
    resp = upload(env["client"], key or env["key"], torchscript_bytes(colour_net(channel)),
                  meta)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def _evaluate(env: dict[str, Any], model_id: str, run: bool = True, key: str | None = None,
              **extra: Any) -> str:
    """Submit an evaluation; run it in this process, or only mark it succeeded (no results)."""
    body = {"model_id": model_id, "dataset": DATASET, "suite": SUITE, "n_examples": N,
            "seed": 0, **extra}
    resp = env["client"].post("/evaluations", headers=auth(key or env["key"]), json=body)
    assert resp.status_code == 202, resp.text
    eid = str(resp.json()["id"])
    if run:
        assert evaluation_jobs.run(env["rt"], uuid.UUID(eid)) is not None
        record = env["client"].get(f"/evaluations/{eid}", headers=auth(env["key"])).json()
        assert record["status"] == "succeeded", record["error"]
    return eid


def _succeeded(env: dict[str, Any], eid: str) -> None:
    with env["rt"].sessions.begin() as s:
        s.execute(update(Evaluation).where(Evaluation.id == uuid.UUID(eid))
                  .values(status="succeeded"))


def _correct(channel: int) -> torch.Tensor:
    """The model's clean outcomes on the job's examples, computed here."""
    data = seeded_subset(load_builtin(DATASET, "test"), N, 0)
    return predict(colour_net(channel), data.x, RunContext()) == data.y


def _row(rows: list[dict[str, Any]], benchmark: str, metric: str) -> dict[str, Any]:
    [row] = [r for r in rows if r["benchmark"] == benchmark and r["metric"] == metric]
    return row


@pytest.mark.slow  # two jobs run here, about 10 s
def test_accuracies_carry_their_count_and_interval_and_compare_example_by_example(
        env: dict[str, Any]) -> None:
    client, headers = env["client"], auth(env["key"])
    base_id = _evaluate(env, _model(env, 1))
    new_id = _evaluate(env, _model(env, 2))
    new_ok, base_ok = _correct(2), _correct(1)
    assert 0 < int(new_ok.sum()) < N

    record = client.get(f"/evaluations/{new_id}", headers=headers).json()
    clean = _row(record["results"], "clean", "accuracy")
    k = int(new_ok.sum())
    assert (clean["n"], clean["value"]) == (N, pytest.approx(k / N))
    assert clean["interval"] == pytest.approx(list(wilson(k, N)), abs=1e-12)
    shares = [r for r in record["results"] if r["n"] is not None]
    assert {(r["benchmark"], r["metric"]) for r in shares} == {
        ("clean", "accuracy"), ("groups", "average_accuracy"), ("groups", "accuracy"),
        ("groups", "worst_group_accuracy"), ("backgrounds", "accuracy")}
    for r in shares:  # every accuracy's interval holds its value
        low, high = r["interval"]
        assert low <= r["value"] <= high
    for r in record["results"]:
        if r["benchmark"] == "groups" and r["metric"] == "accuracy":
            assert r["n"] == r["params"]["n"]
    assert _row(record["results"], "backgrounds", "bg_gap")["interval"] is None

    resp = client.get(f"/evaluations/{new_id}/compare", params={"baseline": base_id},
                      headers=headers)
    assert resp.status_code == 200, resp.text
    comp = resp.json()
    assert (comp["evaluation_id"], comp["baseline_id"], comp["n_examples"]) == (new_id, base_id, N)
    assert comp["only_in_evaluation"] == []
    assert comp["only_in_baseline"] == []
    clean_cmp = _row(comp["metrics"], "clean", "accuracy")
    only_new = int((new_ok & ~base_ok).sum())
    only_base = int((base_ok & ~new_ok).sum())
    assert only_new + only_base > 0  # two different random nets disagree somewhere
    paired = Paired(int((new_ok & base_ok).sum()), only_new, only_base,
                    int((~new_ok & ~base_ok).sum()))
    assert clean_cmp["paired"] is True
    assert (clean_cmp["only_evaluation"], clean_cmp["only_baseline"]) == (only_new, only_base)
    assert clean_cmp["difference"] == pytest.approx((only_new - only_base) / N, abs=1e-6)
    assert clean_cmp["p_value"] == pytest.approx(
        binomtest(only_new, only_new + only_base, 0.5).pvalue, rel=1e-9)
    assert clean_cmp["interval"] == pytest.approx(list(paired.interval()), abs=1e-12)
    assert clean_cmp["value_interval"] == pytest.approx(list(wilson(k, N)), abs=1e-12)
    assert clean_cmp["better"] == "higher"
    gap = _row(comp["metrics"], "backgrounds", "bg_gap")
    assert (gap["paired"], gap["p_value"], gap["better"]) == (False, None, "lower")

    same = client.get(f"/evaluations/{new_id}/compare", params={"baseline": new_id},
                      headers=headers).json()
    for m in same["metrics"]:
        assert m["difference"] == 0.0
        if m["paired"]:
            assert m["p_value"] == 1.0
            assert m["only_evaluation"] == m["only_baseline"] == 0


def test_only_evaluations_of_the_same_examples_compare(env: dict[str, Any]) -> None:
    client, headers = env["client"], auth(env["key"])
    model = _model(env, 1)
    base_id = _evaluate(env, model, run=False)
    _succeeded(env, base_id)
    pending = _evaluate(env, model, run=False)
    resp = client.get(f"/evaluations/{pending}/compare", params={"baseline": base_id},
                      headers=headers)
    assert resp.status_code == 409
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert (resp.json()["reason"], resp.json()["field"]) == ("not-finished", "evaluation")

    other = _evaluate(env, model, run=False, seed=3, n_examples=60)
    _succeeded(env, other)
    resp = client.get(f"/evaluations/{other}/compare", params={"baseline": base_id},
                      headers=headers)
    assert resp.status_code == 409
    body = resp.json()
    assert (body["type"].rsplit("/", 1)[1], body["reason"]) == ("conflict", "not-comparable")
    assert body["differences"] == [
        {"field": "seed", "evaluation": 3, "baseline": 0},
        {"field": "n_examples", "evaluation": 60, "baseline": N}]

    resp = client.get(f"/evaluations/{base_id}/compare", params={"baseline": "latest"},
                      headers=headers)
    assert resp.status_code == 422
    assert resp.json()["field"] == "query.baseline"


def test_a_tenant_cannot_compare_with_another_tenants_evaluation(env: dict[str, Any]) -> None:
    client = env["client"]
    mine = _evaluate(env, _model(env, 1), run=False)
    bob = new_key(env["url"], "bob")
    theirs = _evaluate(env, _model(env, 1, bob), run=False, key=bob)
    for eid in (mine, theirs):
        _succeeded(env, eid)
    for evaluation, baseline, key in ((mine, theirs, env["key"]), (theirs, mine, env["key"]),
                                      (mine, theirs, bob)):
        resp = client.get(f"/evaluations/{evaluation}/compare", params={"baseline": baseline},
                          headers=auth(key))
        assert resp.status_code == 404, resp.text
        assert resp.json()["type"].endswith("/not-found")
