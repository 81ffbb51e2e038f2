"""The whole flow on real servers: the API, Postgres, Redis and `robustscope worker` processes.

A tiny CNN is trained here on the built-in ``shapes-32`` train split; the service must report
exactly what the engine computes in-process for the same model, data and seed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from fastapi.testclient import TestClient
from torch import nn

from tests.factories import (
    api,
    auth,
    comparable,
    engine_rows,
    new_key,
    served,
    settings,
    torchscript_bytes,
)
from tests.service.servers import stop_processes
from workers.engine.data import load_builtin

pytestmark = [pytest.mark.services, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
META = {"name": "shapes-cnn", "num_classes": 4, "input_shape": [3, 32, 32],
        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
SUITE = [{"benchmark": "clean"},
         {"benchmark": "adversarial", "attack": "pgd", "norm": "linf", "eps": [2 / 255, 8 / 255],
          "steps": 10},
         {"benchmark": "adversarial", "attack": "pgd", "norm": "l2", "eps": [0.25], "steps": 10}]


def trained_shapes_cnn(seed: int = 0, epochs: int = 3) -> nn.Module:
    """A small CNN that learns shapes-32 in a few seconds on a CPU."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                        nn.Flatten(), nn.Linear(512, 4))
    train = load_builtin("shapes-32", "train")
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(train))
        for i in range(0, len(train), 64):
            idx = perm[i:i + 64]
            x = (train.x[idx] - 0.5) / 0.25
            loss = nn.functional.cross_entropy(net(x), train.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


BATCH = 100
"""The workers' batch size: attacks draw their random starts per block of this many examples."""


@pytest.fixture
def pg_url(own_pg_url: str) -> str:
    """This file's worker processes run the reconciler: each test has a database of its own."""
    return own_pg_url


@pytest.fixture(scope="module")
def net() -> nn.Module:
    return trained_shapes_cnn()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own on the session's Redis; only its keys are removed after."""
    prefix = f"robustscope-test-{uuid.uuid4().hex[:12]}:"
    client = redis.Redis.from_url(redis_url)
    yield prefix
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)


Worker = Callable[[], subprocess.Popen[bytes]]


@pytest.fixture
def stack(pg_url: str, redis_url: str, redis_prefix: str,
          tmp_path: Path) -> Iterator[tuple[TestClient, Worker]]:
    env = {**os.environ, "ROBUSTSCOPE_DATABASE_URL": pg_url, "ROBUSTSCOPE_BROKER_URL": redis_url,
           "ROBUSTSCOPE_BROKER_KEY_PREFIX": redis_prefix,
           "ROBUSTSCOPE_DATA_DIR": str(tmp_path), "ROBUSTSCOPE_HEARTBEAT_INTERVAL": "0.5",
           "ROBUSTSCOPE_STALE_AFTER": "4", "ROBUSTSCOPE_RECONCILE_INTERVAL": "1",
           "ROBUSTSCOPE_BATCH_SIZE": str(BATCH), "ROBUSTSCOPE_PRECISION": "fp32",
           "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen[bytes]] = []

    def start_worker() -> subprocess.Popen[bytes]:
        log = (tmp_path / f"worker-{len(procs)}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "robustscope.cli", "worker"], cwd=ROOT,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    with api(settings(pg_url, tmp_path, broker_url=redis_url,
                      broker_key_prefix=redis_prefix)) as client:
        yield client, start_worker
    stop_processes(procs)


def _poll(client: TestClient, key: str, eid: str, until: Callable[[dict[str, Any]], bool],
          timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen: list[tuple[str, float]] = []
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/evaluations/{eid}", headers=auth(key)).json()
        seen.append((body["status"], body["progress"]["fraction"]))
        if until(body):
            body["_seen"] = seen
            return body
        time.sleep(0.2)
    raise AssertionError(f"timed out; states seen: {seen[-5:]}")


def _submit(client: TestClient, key: str, net: nn.Module, suite: list[dict[str, Any]]) -> str:
    model = client.post("/models", headers=auth(key),
                        files={"file": ("m.pt", torchscript_bytes(net))},
                        data={"metadata": json.dumps(META)})
    assert model.status_code == 201, model.text
    resp = client.post("/evaluations", headers=auth(key), json={
        "model_id": model.json()["id"], "dataset": "shapes-32", "suite": suite, "seed": 3})
    assert resp.status_code == 202, resp.text
    eid: str = resp.json()["id"]
    return eid


def test_upload_evaluate_poll_on_postgres_and_redis(stack: tuple[TestClient, Worker],
                                                    pg_url: str, net: nn.Module) -> None:
    client, start_worker = stack
    key = new_key(pg_url, f"flow-{uuid.uuid4().hex[:6]}")
    eid = _submit(client, key, net, SUITE)
    start_worker()
    done = _poll(client, key, eid, lambda b: b["status"] in ("succeeded", "failed"))
    assert done["status"] == "succeeded", done["error"]
    states = [s for s, _ in done["_seen"]]
    assert states[0] == "queued"
    assert "running" in states
    fractions = [f for s, f in done["_seen"] if s == "running"]
    assert fractions == sorted(fractions)
    assert done["attempts"] == 1
    assert done["device"].startswith("cpu")
    assert done["engine_version"].startswith("0.1.0")
    assert done["started_at"] <= done["finished_at"]
    got = comparable(served(done["results"]))
    test_split = load_builtin("shapes-32", "test")
    assert got == engine_rows(net, test_split, SUITE, 3, META["mean"], META["std"],
                              batch_size=BATCH)
    acc = {(r["metric"], r["params"].get("norm"), r["params"].get("eps")): r["value"]
           for r in got}
    assert acc[("accuracy", None, None)] > 0.4  # well above chance (0.25): it learned something
    assert acc[("robust_accuracy", "linf", 8 / 255)] < acc[("accuracy", None, None)]
    # The leaderboard ranks it; another owner does not see a private evaluation.
    board = client.get("/leaderboard", headers=auth(key), params={
        "dataset": "shapes-32", "benchmark": "adversarial", "metric": "robust_accuracy",
        "attack": "pgd", "threat": f"linf:{8 / 255}"}).json()
    assert [r["evaluation_id"] for r in board["rows"]] == [eid]
    other = new_key(pg_url, f"other-{uuid.uuid4().hex[:6]}")
    assert client.get("/leaderboard", headers=auth(other), params={
        "dataset": "shapes-32", "benchmark": "adversarial",
        "metric": "robust_accuracy"}).json()["rows"] == []
    report = client.get(f"/evaluations/{eid}/report", headers=auth(key))
    assert report.status_code == 200
    assert "<svg" in report.text


def test_worker_killed_mid_job_is_resumed_by_another(stack: tuple[TestClient, Worker],
                                                     pg_url: str, net: nn.Module,
                                                     tmp_path: Path) -> None:
    client, start_worker = stack
    key = new_key(pg_url, f"kill-{uuid.uuid4().hex[:6]}")
    slow = [{"benchmark": "clean"},
            {"benchmark": "adversarial", "attack": "pgd", "norm": "linf",
             "eps": [1 / 255, 2 / 255, 4 / 255, 8 / 255], "steps": 20, "restarts": 1}]
    eid = _submit(client, key, net, slow)
    first = start_worker()
    # Kill the worker once the first eps is finished and saved, while the second is running.
    state = tmp_path / "state" / eid / "entry-1"
    deadline = time.monotonic() + 300
    while not list(state.rglob("stage*.npz")) and time.monotonic() < deadline:
        time.sleep(0.1)
    [saved] = list(state.rglob("stage*.npz"))
    saved_at = saved.stat().st_mtime_ns
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    mid = client.get(f"/evaluations/{eid}", headers=auth(key)).json()
    assert mid["status"] == "running"
    assert mid["attempts"] == 1
    assert [r["benchmark"] for r in mid["results"]] == ["clean"]
    start_worker()
    done = _poll(client, key, eid, lambda b: b["status"] in ("succeeded", "failed"), 600)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    keys = [(r["benchmark"], r["metric"], json.dumps(r["params"], sort_keys=True))
            for r in done["results"]]
    assert len(keys) == len(set(keys))  # one set of results
    assert sum(1 for k in keys if k[1] == "robust_accuracy") == 4
    assert sum(1 for k in keys if k[0] == "clean") == 1
    assert saved.stat().st_mtime_ns == saved_at  # the finished stage was resumed, not redone
    got = comparable(served(done["results"]))
    assert got == engine_rows(net, load_builtin("shapes-32", "test"), slow, 3, META["mean"],
                             META["std"], batch_size=BATCH)  # the uninterrupted answer


def test_a_training_trains_registers_and_evaluates_on_real_servers(
        stack: tuple[TestClient, Worker], pg_url: str) -> None:
    client, start_worker = stack
    key = new_key(pg_url, f"train-{uuid.uuid4().hex[:6]}")
    resp = client.post("/trainings", headers=auth(key), json={
        "dataset": "shapes-32", "architecture": "small_cnn", "method": "pgd",
        "threat": {"norm": "l2", "eps": 0.25, "steps": 2}, "epochs": 2, "batch_size": 16,
        "lr": 0.01, "seed": 1, "train_examples": 32, "eval_examples": 16,
        "evaluate": [{"benchmark": "clean"}]})
    assert resp.status_code == 202, resp.text
    tid = resp.json()["id"]
    start_worker()
    deadline = time.monotonic() + 300
    done: dict[str, Any] = {}
    while time.monotonic() < deadline:
        done = client.get(f"/trainings/{tid}", headers=auth(key)).json()
        if done["status"] not in ("queued", "running"):
            break
        time.sleep(0.3)
    assert done["status"] == "succeeded", done
    assert [h["epoch"] for h in done["history"]] == [1, 2]
    models = client.get("/models", headers=auth(key)).json()["items"]
    assert [m["id"] for m in models] == [done["model_id"]]
    ev = _poll(client, key, done["evaluation_id"],
               lambda b: b["status"] in ("succeeded", "failed"))
    assert ev["status"] == "succeeded", ev["error"]
    assert [r["metric"] for r in ev["results"]] == ["accuracy"]
