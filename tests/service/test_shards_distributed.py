"""Beyond one host: PostgreSQL, Redis, an S3-compatible store, the API and two `robustscope
worker` processes, each with a folder of its own (no shared filesystem). An uploaded dataset
is ingested by a worker; an evaluation with two shards runs on both workers and reports
results identical to the same evaluation as one job; a worker killed mid-shard loses nothing:
its shard resumes on the other worker from the state in the store, with identical results."""

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

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from tests.factories import api, auth, comparable, new_key, settings, torchscript_bytes
from tests.service.ingest_fixtures import png, write_zip
from tests.service.servers import stop_processes
from tests.service.test_flow import trained_shapes_cnn
from workers.engine.data import load_builtin

pytestmark = [pytest.mark.services, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
META = {"name": "shapes-cnn", "num_classes": 4, "input_shape": [3, 32, 32],
        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
BATCH = 32
N = 128  # four blocks of BATCH: two shards of two blocks
SUITE = [{"benchmark": "clean"},
         {"benchmark": "adversarial", "attack": "fast", "norm": "linf",
          "eps": [1 / 255, 2 / 255, 4 / 255, 8 / 255], "steps": 20},
         {"benchmark": "adversarial", "attack": "pgd", "norm": "l2", "eps": [0.1, 0.25],
          "steps": 20, "restarts": 2}]

Start = Callable[[str], subprocess.Popen[bytes]]


@pytest.fixture
def pg_url(own_pg_url: str) -> str:
    """This file's worker processes run the reconciler: each test has a database of its own."""
    return own_pg_url


@pytest.fixture
def cluster(pg_url: str, redis_url: str, s3_url: str,
            tmp_path: Path) -> Iterator[tuple[TestClient, Start]]:
    prefix = f"robustscope-test-{uuid.uuid4().hex[:12]}:"
    common = {"ROBUSTSCOPE_DATABASE_URL": pg_url, "ROBUSTSCOPE_BROKER_URL": redis_url,
              "ROBUSTSCOPE_BROKER_KEY_PREFIX": prefix, "ROBUSTSCOPE_STORAGE_URL": s3_url,
              "ROBUSTSCOPE_HEARTBEAT_INTERVAL": "0.5", "ROBUSTSCOPE_STALE_AFTER": "4",
              "ROBUSTSCOPE_RECONCILE_INTERVAL": "1", "ROBUSTSCOPE_BATCH_SIZE": str(BATCH),
              "ROBUSTSCOPE_PRECISION": "fp32", "ROBUSTSCOPE_THREADS": "1",
              "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str) -> subprocess.Popen[bytes]:
        folder = tmp_path / name  # the worker's own folder: its cache, scratch, temporaries
        folder.mkdir()
        env = {**os.environ, **common, "ROBUSTSCOPE_DATA_DIR": str(folder)}
        log = (tmp_path / f"{name}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "robustscope.cli", "worker", "--name", name],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    (tmp_path / "api").mkdir()
    cfg = settings(pg_url, tmp_path / "api", broker_url=redis_url, broker_key_prefix=prefix,
                   storage_url=s3_url, batch_size=BATCH)
    try:
        with api(cfg) as client:
            yield client, start
    finally:
        stop_processes(procs)
        keys = list(redis.Redis.from_url(redis_url).scan_iter(match=f"{prefix}*"))
        if keys:
            redis.Redis.from_url(redis_url).delete(*keys)


def _wait(client: TestClient, key: str, path: str, until: Callable[[dict[str, Any]], bool],
          timeout: float = 900) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = client.get(path, headers=auth(key)).json()
        if until(body):
            return body
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting on {path}: {json.dumps(body)[:1500]}")


def _final(body: dict[str, Any]) -> bool:
    return body["status"] in ("succeeded", "failed", "cancelled")


def _dataset(client: TestClient, key: str, tmp_path: Path) -> str:
    """128 images of shapes-32's test split as an uploaded manifest archive."""
    data = load_builtin("shapes-32", "test")
    files = {"manifest.csv": b"path,label\n" + b"".join(
        f"img/{i}.png,{int(data.y[i])}\n".encode() for i in range(N))}
    for i in range(N):
        pixels = (data.x[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        files[f"img/{i}.png"] = png(pixels)
    archive = write_zip(tmp_path / "shapes.zip", files)
    with archive.open("rb") as f:
        resp = client.post("/datasets", headers=auth(key), files={"file": ("shapes.zip", f)})
    assert resp.status_code == 202, resp.text
    ready = _wait(client, key, f"/datasets/{resp.json()['id']}",
                  lambda b: b["status"] != "ingesting", timeout=300)
    assert ready["status"] == "ready", ready
    assert ready["num_examples"] == N
    return str(ready["id"])


def _evaluate(client: TestClient, key: str, model_id: str, dataset: str, shards: int) -> str:
    resp = client.post("/evaluations", headers=auth(key), json={
        "model_id": model_id, "dataset": dataset, "suite": SUITE, "seed": 11,
        "shards": shards})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    def rows(body: dict[str, Any]) -> list[Any]:
        return comparable([{k: r[k] for k in ("benchmark", "metric", "value", "params")}
                           for r in body["results"]])

    assert rows(a) == rows(b)
    assert len(rows(a)) == 19  # clean; fast: 2 + 3 per eps (4); pgd: 2 + 1 per eps (2)
    assert a["checks"] == b["checks"]
    assert sorted(a["artifacts"]) == sorted(b["artifacts"])


def test_two_workers_in_their_own_folders_shard_one_evaluation(
        cluster: tuple[TestClient, Start], pg_url: str, tmp_path: Path) -> None:
    client, start = cluster
    key = new_key(pg_url, f"shards-{uuid.uuid4().hex[:6]}")
    first, second = start("w1"), start("w2")
    dataset = _dataset(client, key, tmp_path)
    model = client.post("/models", headers=auth(key),
                        files={"file": ("m.pt", torchscript_bytes(trained_shapes_cnn()))},
                        data={"metadata": json.dumps(META)})
    assert model.status_code == 201, model.text
    model_id = model.json()["id"]

    one = _wait(client, key, f"/evaluations/{_evaluate(client, key, model_id, dataset, 1)}",
                _final)
    assert one["status"] == "succeeded", one["error"]
    assert one["shards"] == []

    eid = _evaluate(client, key, model_id, dataset, 2)
    two = _wait(client, key, f"/evaluations/{eid}", _final)
    assert two["status"] == "succeeded", two["error"]
    assert [(s["index"], s["start"], s["stop"], s["status"], s["attempts"])
            for s in two["shards"]] == [(0, 0, 64, "succeeded", 1), (1, 64, 128, "succeeded", 1)]
    host_workers = {s["worker"].split("@")[0] for s in two["shards"]}
    assert host_workers == {"w1", "w2"}  # one shard on each worker
    _same(two, one)

    # Kill the worker of a shard mid-run: the shard resumes on the other worker.
    eid = _evaluate(client, key, model_id, dataset, 2)
    running = _wait(client, key, f"/evaluations/{eid}", lambda b: any(
        s["status"] == "running" and s["fraction"] >= 0.45 for s in b["shards"]), timeout=600)
    victim = next(s for s in running["shards"]
                  if s["status"] == "running" and s["fraction"] >= 0.45)
    name = victim["worker"].split("@")[0]
    proc = {"w1": first, "w2": second}[name]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    survivor = "w2" if name == "w1" else "w1"
    done = _wait(client, key, f"/evaluations/{eid}", _final)
    assert done["status"] == "succeeded", done["error"]
    lost = done["shards"][victim["index"]]
    assert lost["status"] == "succeeded"
    assert lost["attempts"] == 2
    assert lost["worker"].split("@")[0] == survivor
    assert done["worker"].split("@")[0] == survivor  # the merge ran there too
    _same(done, one)
    # Nothing was shared: each worker's folder holds its cache and temporary files only.
    for folder in ("w1", "w2", "api"):
        top = {p.relative_to(tmp_path / folder).parts[0]
               for p in (tmp_path / folder).rglob("*") if p.is_file()}
        assert not top & {"models", "datasets", "artifacts"}, (folder, top)
