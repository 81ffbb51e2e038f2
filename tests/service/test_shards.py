"""Sharded evaluations in-process: the API makes the shard jobs, each runs its slice, the
evaluation merges them into results identical to the same evaluation run as one job;
failure, cancel and the record's shard list. The multi-process run (PostgreSQL, Redis, an
S3-compatible store, two workers in their own folders, one killed) is
tests/service/test_shards_distributed.py."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from core.queue import EVALUATE_TASK
from core.tables import EvaluationShard
from service.evaluations.service import shard_bounds
from tests.factories import (
    api,
    auth,
    comparable,
    new_key,
    settings,
    tiny_net,
    torchscript_bytes,
    upload,
    worker_runtime,
)

SUITE = [{"benchmark": "clean"},
         {"benchmark": "adversarial", "attack": "fast", "norm": "linf",
          "eps": [2 / 255, 8 / 255], "steps": 4},
         {"benchmark": "adversarial", "attack": "pgd", "norm": "l2", "eps": [0.25], "steps": 4,
          "restarts": 2}]


def test_shards_are_runs_of_whole_blocks() -> None:
    assert shard_bounds(400, 100, 2) == [(0, 200), (200, 400)]
    assert shard_bounds(350, 100, 2) == [(0, 200), (200, 350)]
    assert shard_bounds(350, 100, 4) == [(0, 100), (100, 200), (200, 300), (300, 350)]
    assert shard_bounds(1000, 64, 3) == [(0, 320), (320, 640), (640, 1000)]


class Sent(list[tuple[str, list[Any]]]):
    def __call__(self, name: str, args: list[Any]) -> None:
        self.append((name, list(args)))


def _submit(client: TestClient, key: str, model_id: str, **fields: Any) -> dict[str, Any]:
    resp = client.post("/evaluations", headers=auth(key), json={
        "model_id": model_id, "dataset": "shapes-32", "suite": SUITE, "seed": 7,
        "n_examples": 300, **fields})
    assert resp.status_code == 202, resp.text
    body: dict[str, Any] = resp.json()
    return body


def _rows(body: dict[str, Any]) -> list[dict[str, Any]]:
    return comparable([{k: r[k] for k in ("benchmark", "metric", "value", "params")}
                       for r in body["results"]])


def _runtime(sqlite_url: str, tmp_path: Path, name: str = "test-worker") -> Any:
    """A worker in this process: the engine here (no jail), batches of 64 like the API's, and
    the search in fp32 (``auto`` times a probe, which a loaded machine can answer either
    way from one run to the next)."""
    rt = worker_runtime(sqlite_url, tmp_path, sandbox="off", batch_size=64, precision="fp32")
    rt.name = name
    return rt


@pytest.mark.slow
def test_a_sharded_evaluation_merges_into_the_one_job_results(sqlite_url: str,
                                                               tmp_path: Path) -> None:
    from workers import evaluation_jobs, shard_jobs

    key = new_key(sqlite_url, "shards")
    rt = _runtime(sqlite_url, tmp_path)
    sent = Sent()
    with api(settings(sqlite_url, tmp_path, batch_size=64)) as client:
        model = upload(client, key, torchscript_bytes(tiny_net(seed=3))).json()
        one = _submit(client, key, model["id"], shards=1)
        assert one["shards"] == []
        assert evaluation_jobs.run(rt, uuid.UUID(one["id"])) == "succeeded"
        sharded = _submit(client, key, model["id"], shards=2)
        eid = uuid.UUID(sharded["id"])
        assert [(s["index"], s["start"], s["stop"], s["status"]) for s in sharded["shards"]] == [
            (0, 0, 128, "queued"), (1, 128, 300, "queued")]
        with rt.sessions() as s:
            shard_ids = list(s.scalars(select(EvaluationShard.id).where(
                EvaluationShard.evaluation_id == eid).order_by(EvaluationShard.index)))
        for k, sid in enumerate(shard_ids):
            worker = _runtime(sqlite_url, tmp_path, f"worker-{k}")
            assert shard_jobs.run(worker, sid, send_task=sent) == "succeeded"
            mid = client.get(f"/evaluations/{eid}", headers=auth(key)).json()
            assert mid["status"] == "running"
            assert mid["results"] == []
        assert sent == [(EVALUATE_TASK, [str(eid)])]  # the last shard sent the merge
        assert mid["progress"]["stage"] == "merging"
        assert mid["progress"]["fraction"] == pytest.approx(0.9)
        assert evaluation_jobs.run(rt, eid) == "succeeded"
        done = client.get(f"/evaluations/{eid}", headers=auth(key)).json()
        whole = client.get(f"/evaluations/{one['id']}", headers=auth(key)).json()
    assert done["status"] == "succeeded"
    assert [(s["index"], s["worker"], s["status"], s["attempts"]) for s in done["shards"]] == [
        (0, "worker-0", "succeeded", 1), (1, "worker-1", "succeeded", 1)]
    assert _rows(done) == _rows(whole)
    assert len(_rows(done)) > 10
    assert done["checks"] == whole["checks"]
    assert sorted(done["artifacts"]) == sorted(whole["artifacts"])


@pytest.mark.slow
def test_a_failed_shard_fails_the_evaluation_and_cancels_the_rest(sqlite_url: str,
                                                                   tmp_path: Path) -> None:
    from workers import shard_jobs

    key = new_key(sqlite_url, "shard-fail")
    rt, sent = _runtime(sqlite_url, tmp_path), Sent()
    with api(settings(sqlite_url, tmp_path, batch_size=64)) as client:
        model = upload(client, key, torchscript_bytes(tiny_net())).json()
        eid = uuid.UUID(_submit(client, key, model["id"], shards=3)["id"])
        with rt.sessions.begin() as s:
            shards = list(s.scalars(select(EvaluationShard).where(
                EvaluationShard.evaluation_id == eid).order_by(EvaluationShard.index)))
            ids = [sh.id for sh in shards]
            s.execute(update(EvaluationShard).where(EvaluationShard.id == ids[1]).values(
                status="failed", error={"type": "model-crashed", "detail": "boom"}))
        # The first shard runs; its end settles the evaluation: failed, the others cancelled.
        shard_jobs.run(rt, ids[0], send_task=sent)
        done = client.get(f"/evaluations/{eid}", headers=auth(key)).json()
    assert done["status"] == "failed"
    assert done["error"] == {"type": "model-crashed", "detail": "shard 1 (64-192): boom"}
    assert [s["status"] for s in done["shards"]] == ["succeeded", "failed", "cancelled"]
    assert sent == []


def test_cancel_reaches_every_shard_and_a_suite_without_work_for_shards_is_refused(
        sqlite_url: str, tmp_path: Path) -> None:
    key = new_key(sqlite_url, "shard-cancel")
    with api(settings(sqlite_url, tmp_path, batch_size=64)) as client:
        model = upload(client, key, torchscript_bytes(tiny_net())).json()
        ev = _submit(client, key, model["id"], shards=2)
        resp = client.post(f"/evaluations/{ev['id']}/cancel", headers=auth(key))
        assert resp.status_code == 202
        body = client.get(f"/evaluations/{ev['id']}", headers=auth(key)).json()
        assert body["status"] == "cancelled"
        assert [s["status"] for s in body["shards"]] == ["cancelled", "cancelled"]
        clean_only = client.post("/evaluations", headers=auth(key), json={
            "model_id": model["id"], "dataset": "shapes-32", "suite": [{"benchmark": "clean"}],
            "shards": 2})
        assert clean_only.status_code == 422
        assert clean_only.json()["field"] == "shards"
        too_many = client.post(
            "/evaluations", headers=auth(key), json={
                "model_id": model["id"], "dataset": "shapes-32", "suite": SUITE,
                "n_examples": 100, "shards": 3})
        assert too_many.status_code == 422
        assert "at most 2 shards for 100 examples" in too_many.json()["detail"]
        # Without workers seen, the default is one job.
        assert _submit(client, key, model["id"])["shards"] == []
