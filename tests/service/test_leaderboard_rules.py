"""The leaderboard's ranking rules on real measurements: a model that answers one class for
every input, beside a working one, both measured by the engine in this process and stored as
the worker stores an evaluation (results per suite entry, checks with their entry).

- the one-class model's robust accuracy (its clean accuracy: no attack can move a constant
  answer) is above the working model's at a large eps, yet it ranks below it, flagged, with
  the failed check and its suite entry;
- one ranking compares one threat: each evaluation measured two eps, and each ranking holds
  one row per evaluation, at the eps asked for; without a threat, the dataset's standard one
  (AutoAttack, l_inf 8/255), which neither measured: an empty ranking that lists the threats
  there are;
- RFS ranks one row per evaluation, by its mean over sigmas.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from core.db import make_engine, make_sessionmaker
from core.tables import Evaluation, Result
from tests.factories import api, auth, new_key, settings
from workers.engine import benchmarks
from workers.engine.data.builtin import load_builtin
from workers.engine.data.subset import seeded_subset
from workers.engine.models import Normalized
from workers.engine.types import EvalData, RunContext

pytestmark = pytest.mark.slow  # trains a small model

DATASET = "waterbirds-32"
EPS = (8 / 255, 32 / 255)
SUITE = [{"benchmark": "clean"},
         {"benchmark": "adversarial", "attack": "apgd-ce", "norm": "linf", "eps": list(EPS),
          "steps": 10},
         {"benchmark": "fg_bg_noise", "sigmas": [0.25, 0.5], "trials": 1}]


def _working() -> nn.Module:
    """A small CNN trained three epochs on the validation split: it works (its accuracy is
    well above the share of any class, its predictions follow the labels)."""
    torch.manual_seed(0)
    train = load_builtin(DATASET, "val")
    net = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(), nn.MaxPool2d(4),
                        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
                        nn.Flatten(), nn.Linear(16, 2))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(3):
        order = torch.randperm(len(train))
        for i in range(0, len(train), 64):
            batch = order[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(net(train.x[batch]), train.y[batch]).backward()
            opt.step()
    return net.eval()


class OneClass(nn.Module):
    """Answers class 0 for every input (what a collapsed training leaves)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([4.0, 0.0]).expand(x.shape[0], 2) + 0 * x.flatten(1)[:, :1]


def _one_class() -> nn.Module:
    return OneClass().eval()


def _measure(net: nn.Module, data: EvalData) -> tuple[list[dict[str, Any]],
                                                      list[dict[str, Any]]]:
    """(results with their entry's index, checks with their entry), as a job stores them."""
    model = Normalized(net, None, None, 3).eval()
    rows, checks = [], []
    for index, entry in enumerate(SUITE):
        result = benchmarks.run(model, data, benchmarks.parse(entry), RunContext(seed=0))
        rows += [{**r.as_dict(), "entry": index} for r in result.rows]
        checks += [{**c.as_dict(), "entry": index} for c in result.checks]
    return rows, checks


def _store(url: str, owner: str, name: str, rows: list[dict[str, Any]],
           checks: list[dict[str, Any]], n: int) -> str:
    sessions = make_sessionmaker(make_engine(url))
    with sessions.begin() as s:
        ev = Evaluation(owner=owner, model_name=name, dataset=DATASET, suite=SUITE, seed=0,
                        status="succeeded", public=True, progress_fraction=1.0, checks=checks,
                        options={"n_examples": n})
        ev.results = [Result(entry_index=r["entry"], benchmark=r["benchmark"],
                             metric=r["metric"], value=r["value"], params=r["params"],
                             params_key=json.dumps(r["params"], sort_keys=True))
                      for r in rows]
        s.add(ev)
        s.flush()
        return str(ev.id)


@pytest.fixture(scope="module")
def measured() -> dict[str, Any]:
    data = seeded_subset(load_builtin(DATASET, "test"), 64, 0)
    return {"n": len(data), "class0": float((data.y == 0).float().mean()),
            "one_class": _measure(_one_class(), data), "working": _measure(_working(), data)}


@pytest.fixture
def client(sqlite_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with api(settings(sqlite_url, tmp_path)) as c:
        yield c


def _value(rows: list[dict[str, Any]], metric: str, **params: Any) -> float:
    (value,) = [r["value"] for r in rows if r["metric"] == metric
                and all(r["params"].get(k) == v for k, v in params.items())]
    return float(value)


def test_a_one_class_model_ranks_below_a_working_one_flagged(
        client: TestClient, sqlite_url: str, measured: dict[str, Any]) -> None:
    one_rows, one_checks = measured["one_class"]
    work_rows, work_checks = measured["working"]
    # The trap: at 32/255 the constant model keeps its clean accuracy (the share of class 0),
    # the working model loses more than that.
    one_value = _value(one_rows, "robust_accuracy", eps=EPS[1])
    work_value = _value(work_rows, "robust_accuracy", eps=EPS[1])
    assert one_value == pytest.approx(measured["class0"], abs=1e-6)
    assert _value(one_rows, "clean_accuracy") == pytest.approx(one_value, abs=1e-6)
    assert work_value < one_value
    assert _value(work_rows, "clean_accuracy") > one_value  # it does work
    assert [(c["entry"], c["passed"]) for c in work_checks
            if c["name"] == "degenerate_predictions"] == [(0, True), (1, True)]

    one = _store(sqlite_url, "carol", "one-class", one_rows, one_checks, measured["n"])
    work = _store(sqlite_url, "dave", "working", work_rows, work_checks, measured["n"])
    key = new_key(sqlite_url, "erin")  # sees both: they are public

    board = client.get("/leaderboard", headers=auth(key), params={
        "dataset": DATASET, "metric": "robust_accuracy", "attack": "apgd-ce",
        "threat": f"linf:{EPS[1]}"}).json()
    assert board["threat"] == f"linf:{EPS[1]:.6g}"
    assert board["attack"] == "apgd-ce"
    assert [(r["evaluation_id"], r["rank"], r["value"], r["flagged"]) for r in board["rows"]] == [
        (work, 1, work_value, False), (one, 2, one_value, True)]
    failed = board["rows"][1]["failed_checks"]
    assert [(c["name"], c["entry"]) for c in failed] == [  # the clean and the attack entries
        ("degenerate_predictions", 0), ("nonzero_gradients", 1), ("degenerate_predictions", 1)]
    assert all(c["detail"].startswith("class 0 is predicted for 100.0% of 64 inputs")
               for c in failed if c["name"] == "degenerate_predictions")
    assert board["rows"][0]["failed_checks"] == []

    # One threat per ranking: the 8/255 ranking holds one row per evaluation too.
    low = client.get("/leaderboard", params={
        "dataset": DATASET, "metric": "robust_accuracy", "attack": "apgd-ce",
        "threat": f"linf:{EPS[0]}"}).json()
    assert [r["evaluation_id"] for r in low["rows"]] == [work, one]
    assert {r["params"]["eps"] for r in low["rows"]} == {EPS[0]}

    # Without a threat: the dataset's standard one, which neither evaluation measured.
    standard = client.get("/leaderboard", params={
        "dataset": DATASET, "metric": "robust_accuracy"}).json()
    assert (standard["threat"], standard["attack"], standard["rows"]) == (
        f"linf:{8 / 255:.6g}", "autoattack", [])
    assert [(t["attack"], t["norm"], t["evaluations"]) for t in standard["threats"]] == [
        ("apgd-ce", "linf", 2), ("apgd-ce", "linf", 2)]
    assert [t["eps"] for t in standard["threats"]] == pytest.approx(list(EPS))

    # RFS: one row per evaluation, its mean over sigmas; the flagged one last.
    rfs = client.get("/leaderboard", params={
        "dataset": DATASET, "metric": "rfs", "benchmark": "fg_bg_noise"}).json()
    assert [(r["evaluation_id"], r["params"]["sigma"], r["value"]) for r in rfs["rows"]] == [
        (work, "mean", _value(work_rows, "rfs", sigma="mean")),
        (one, "mean", _value(one_rows, "rfs", sigma="mean"))]
    assert rfs["threat"] is None
