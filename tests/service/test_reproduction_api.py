"""What the reproduction needs from the API and the worker: class maps (refused without one
when the classes differ), n_examples recorded and applied, method-aware training defaults,
and a sweep suite that measures both axes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select

from contract.suite import BaseEntry
from core.db import make_engine, make_sessionmaker
from core.settings import Settings
from core.tables import Evaluation, Model, Result
from tests.factories import (
    META,
    accept_test_entries,
    auth,
    tiny_net,
    torchscript_bytes,
    upload,
)
from workers import evaluation_jobs
from workers.engine.benchmarks import _REGISTRY, register
from workers.engine.types import BenchmarkResult, EvalData, MetricRow, RunContext
from workers.runtime import Runtime

pytestmark = pytest.mark.slow


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    return sqlite_url


def _model(client: TestClient, key: str, num_classes: int) -> str:
    meta = {**META, "num_classes": num_classes, "class_names": [str(i) for i in
                                                                 range(num_classes)]}
    resp = upload(client, key, torchscript_bytes(tiny_net(num_classes)), meta)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def _evaluate(client: TestClient, key: str, **body: Any) -> Any:
    return client.post("/evaluations", headers=auth(key),
                       json={"dataset": "shapes-32", "suite": [{"benchmark": "clean"}], **body})


def test_a_model_with_other_classes_needs_a_class_map(client: TestClient, key: str) -> None:
    six = _model(client, key, 6)
    resp = _evaluate(client, key, model_id=six)
    assert resp.status_code == 422
    assert resp.json()["field"] == "class_map"
    assert "the model has 6 classes but dataset 'shapes-32' has 4" in resp.json()["detail"]
    for cmap, message in [
        ([0, 1, 2, 3], "class_map has 4 entries; the model has 6 classes"),
        ([0, 1, 2, 4, -1, -1], "must be -1 or a dataset class 0..3"),
        ([0, 1, 1, 0, -1, -1], "maps no model class to dataset class(es) [2, 3]"),
        ("imagenet9", "maps 1000 model classes onto 9 dataset classes; this model has 6"),
        ("cifar100", "unknown class map 'cifar100'"),
    ]:
        resp = _evaluate(client, key, model_id=six, class_map=cmap)
        assert resp.status_code == 422, cmap
        assert message in resp.json()["detail"]
    ok = _evaluate(client, key, model_id=six, class_map=[3, 2, 1, 0, -1, 0], n_examples=50)
    assert ok.status_code == 202, ok.text
    record = ok.json()
    assert (record["class_map"], record["n_examples"]) == ([3, 2, 1, 0, -1, 0], 50)
    four = _model(client, key, 4)
    plain = _evaluate(client, key, model_id=four).json()
    assert (plain["class_map"], plain["n_examples"]) == (None, None)


def test_a_spec_can_name_just_dataset_architecture_method_and_threat(client: TestClient,
                                                                    key: str) -> None:
    expected = {  # method: (optimizer, lr, lr_schedule, threat steps, step size)
        "standard": ("sgd", 0.05, "cosine", 10, 2.5 * 0.03 / 10),
        "pgd": ("sgd", 0.05, "cosine", 7, 2.5 * 0.03 / 7),
        "fgsm_rs": ("sgd", 0.05, "cosine", 1, 1.25 * 0.03),
        "trades": ("sgd", 0.05, "cosine", 10, 2.5 * 0.03 / 10),
    }
    for method, (opt, lr, schedule, steps, step_size) in expected.items():
        resp = client.post("/trainings", headers=auth(key), json={
            "dataset": "shapes-32", "architecture": "small_cnn", "method": method,
            "threat": {"norm": "linf", "eps": 0.03}})
        assert resp.status_code == 202, resp.text
        t = resp.json()
        assert (t["optimizer"], t["lr"], t["lr_schedule"], t["epochs"], t["batch_size"]) == (
            opt, lr, schedule, 10, 128)
        assert t["threat"]["steps"] == steps
        assert t["threat"]["step_size"] == pytest.approx(step_size)
    adam = client.post("/trainings", headers=auth(key), json={
        "dataset": "shapes-32", "architecture": "small_cnn", "method": "pgd",
        "threat": {"norm": "l2", "eps": 0.5, "steps": 3}, "optimizer": "adam",
        "n_examples": 64}).json()
    assert (adam["optimizer"], adam["lr"], adam["threat"]["steps"], adam["n_examples"]) == (
        "adam", 0.001, 3, 64)


def test_a_sweep_measures_both_axes_and_defaults_per_method(client: TestClient,
                                                            key: str) -> None:
    resp = client.post("/sweeps", headers=auth(key), json={
        "dataset": "waterbirds-32", "architecture": "small_cnn",
        "methods": ["standard", "pgd", "fgsm_rs"], "threats": {"l2": [0.25], "linf": [0.01]},
        "epochs": 2, "n_examples": 100})
    assert resp.status_code == 202, resp.text
    sweep = resp.json()
    assert [s["benchmark"] for s in sweep["spec"]["suite"]] == [
        "clean", "adversarial", "adversarial", "backgrounds", "fg_bg_noise", "groups"]
    runs = [client.get(f"/trainings/{t}", headers=auth(key)).json()
            for t in sweep["training_ids"]]
    assert [(r["method"], r["threat"]["steps"], r["n_examples"], r["epochs"]) for r in runs] == [
        ("standard", 10, 100, 2), ("pgd", 7, 100, 2), ("pgd", 7, 100, 2),
        ("fgsm_rs", 1, 100, 2), ("fgsm_rs", 1, 100, 2)]
    assert [row["name"] for row in sweep["table"]] == [
        "small_cnn-standard", "small_cnn-pgd-l2-0.25", "small_cnn-pgd-linf-0.01",
        "small_cnn-fgsm_rs-l2-0.25", "small_cnn-fgsm_rs-linf-0.01"]


@pytest.fixture
def rt(sqlite_url: str, tmp_path: Path) -> Runtime:
    # The job runs the child's code in this process (sandbox off): the benchmark below is
    # registered here, where a jailed child could not see it.
    cfg = Settings(database_url=sqlite_url, data_dir=tmp_path, sandbox="off")
    engine = make_engine(sqlite_url)
    return Runtime(settings=cfg, engine=engine, sessions=make_sessionmaker(engine),
                   device=torch.device("cpu"), name="test-worker")


class Record(BaseEntry):
    benchmark: Literal["test_record"]


@pytest.fixture
def labels_seen(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[int]]]:
    seen: list[list[int]] = []

    def record(model: torch.nn.Module, data: EvalData, entry: Record,
               ctx: RunContext) -> BenchmarkResult:
        seen.append(data.y.tolist())
        with torch.no_grad():
            width = model(data.x[:2]).shape[1]
        return BenchmarkResult(rows=[MetricRow("record", "n", float(len(data)),
                                               {"width": width})])

    register("test_record")(record)
    accept_test_entries(monkeypatch, Record)
    yield seen
    _REGISTRY.pop("test_record")


def test_the_worker_applies_n_examples_and_the_class_map(rt: Runtime,
                                                         labels_seen: list[list[int]]) -> None:
    """A 6-class model on the 4-class shapes-32 through a map: the suite sees 4 logits, and 50
    examples of the 400, the same 50 for the same seed."""
    ids = []
    for seed in (0, 0, 1):
        model_id = uuid.uuid4()
        path = rt.settings.data_dir / "models" / f"{model_id}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(torchscript_bytes(tiny_net(6)))
        with rt.sessions.begin() as s:
            s.add(Model(id=model_id, owner="o", name="six", format="torchscript", num_classes=6,
                        input_shape=[3, 32, 32], model_metadata={**META, "num_classes": 6},
                        sha256="0" * 64, size_bytes=1, storage_path=f"models/{model_id}.pt"))
            s.flush()
            ev = Evaluation(owner="o", model_id=model_id, model_name="six", dataset="shapes-32",
                            dataset_params={}, split="test", suite=[{"benchmark": "test_record"}],
                            seed=seed, checks=[], artifacts={}, completed_entries=[],
                            timings={}, status="queued",
                            options={"n_examples": 50, "class_map": [0, 1, 2, 3, -1, 3]})
            s.add(ev)
            s.flush()
            ids.append(ev.id)
        assert evaluation_jobs.run(rt, ev.id) == "succeeded"
    with rt.sessions() as s:
        rows = s.scalars(select(Result).where(Result.evaluation_id == ids[0])).all()
        assert [(r.value, r.params) for r in rows] == [(50.0, {"width": 4})]
    assert [len(y) for y in labels_seen] == [50, 50, 50]
    assert labels_seen[0] == labels_seen[1]
    assert labels_seen[0] != labels_seen[2]
