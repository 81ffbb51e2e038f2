"""Webhooks (signed, sent on a final state), server-sent events, the report, /metrics."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import update
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from core.db import make_engine, make_sessionmaker
from core.keys import webhook_secret
from core.queue import WEBHOOK_TASK
from core.settings import Settings
from core.tables import Evaluation, Result
from core.webhook_policy import standard_secret
from tests.factories import api, auth, new_key, settings, tiny_net, torchscript_bytes, upload
from workers import evaluation_jobs, webhooks
from workers.runtime import Runtime


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    got: list[tuple[dict[str, str], bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append((dict(self.headers), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return None

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", got
    server.shutdown()


@pytest.mark.slow
def test_a_finished_job_sends_a_signed_webhook(sqlite_url: str, tmp_path: Path,
                                               receiver: tuple[str, list[Any]]) -> None:
    url, got = receiver
    key = new_key(sqlite_url, "hooked")
    with api(settings(sqlite_url, tmp_path)) as client:
        model = upload(client, key, torchscript_bytes(tiny_net())).json()
        refused = client.post("/evaluations", headers=auth(key), json={
            "model_id": model["id"], "dataset": "shapes-32", "webhook_url": url,
            "suite": [{"benchmark": "clean"}]})
        assert refused.status_code == 422  # 127.0.0.1, without webhook_allow_private
        assert refused.json()["field"] == "webhook_url"
    with api(settings(sqlite_url, tmp_path, webhook_allow_private=True)) as client:
        ev = client.post("/evaluations", headers=auth(key), json={
            "model_id": model["id"], "dataset": "shapes-32", "webhook_url": url,
            "suite": [{"benchmark": "clean"}]}).json()
    engine = make_engine(sqlite_url)
    rt = Runtime(settings=Settings(database_url=sqlite_url, data_dir=tmp_path,
                                   webhook_allow_private=True), engine=engine,
                 sessions=make_sessionmaker(engine), device=torch.device("cpu"), name="w")
    sent: list[tuple[str, list[str]]] = []
    assert evaluation_jobs.run(rt, uuid.UUID(ev["id"]),
                    send_task=lambda name, args: sent.append((name, args))) == "succeeded"
    assert sent == [(WEBHOOK_TASK, [ev["id"]])]
    assert webhooks.deliver(rt, ev["id"]) == 204
    headers, body = got[0]
    with rt.sessions() as s:
        secret = webhook_secret(s, "hooked")
    assert secret
    # Standard Webhooks: HMAC-SHA256 over "id.timestamp.body", base64, with the owner's
    # secret (no deployment secret is configured here); the receiver's library verifies it.
    lowered = {k.lower(): v for k, v in headers.items()}
    signed = f"{lowered['webhook-id']}.{lowered['webhook-timestamp']}.".encode() + body
    mac = base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()
    assert lowered["webhook-signature"] == f"v1,{mac}"
    assert lowered["webhook-id"] == f"msg_{uuid.UUID(ev['id']).hex}_succeeded"
    Webhook(standard_secret(secret)).verify(body, lowered)  # raises on a bad signature
    with pytest.raises(WebhookVerificationError):
        Webhook(standard_secret("another secret")).verify(body, lowered)
    payload = json.loads(body)
    assert payload["event"] == "evaluation.succeeded"
    assert payload["evaluation"]["id"] == ev["id"]
    assert payload["evaluation"]["results"][0]["metric"] == "accuracy"


@pytest.mark.slow
def test_events_stream_until_a_final_state_and_the_report_and_metrics(
        sqlite_url: str, tmp_path: Path) -> None:
    key = new_key(sqlite_url, "streamer")
    with api(settings(sqlite_url, tmp_path)) as client:
        model = upload(client, key, torchscript_bytes(tiny_net())).json()
        ev = client.post("/evaluations", headers=auth(key), json={
            "model_id": model["id"], "dataset": "shapes-32",
            "suite": [{"benchmark": "clean"}]}).json()
        sessions = client.app.state.sessionmaker  # type: ignore[attr-defined]
        with sessions.begin() as s:
            s.execute(update(Evaluation).where(Evaluation.id == uuid.UUID(ev["id"])).values(
                status="succeeded", progress_fraction=1.0, progress_stage="succeeded"))
            s.add(Result(evaluation_id=uuid.UUID(ev["id"]), entry_index=0, benchmark="clean",
                         metric="accuracy", value=0.75, params={}, params_key="{}"))
        with client.stream("GET", f"/evaluations/{ev['id']}/events", headers=auth(key)) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            text = "".join(r.iter_text())
        events = [dict(line.split(": ", 1) for line in block.split("\n"))
                  for block in text.strip().split("\n\n")]
        assert [(e["event"], e["id"]) for e in events] == [("progress", "1"), ("end", "2")]
        assert json.loads(events[0]["data"])["fraction"] == 1.0
        assert json.loads(events[1]["data"])["results"][0]["value"] == 0.75
        spec = client.get("/openapi.json").json()["paths"]
        for path in ("/evaluations/{evaluation_id}/events", "/trainings/{training_id}/events"):
            assert list(spec[path]["get"]["responses"]["200"]["content"]) == [
                "text/event-stream"]
        report = client.get(f"/evaluations/{ev['id']}/report", headers=auth(key))
        assert "0.7500" in report.text
        assert client.get("/metrics").status_code == 401
        metrics = client.get("/metrics", headers=auth(key)).text
        assert 'robustscope_evaluations{status="succeeded"} 1.0' in metrics


@pytest.mark.slow
def test_per_example_flags_are_served_as_an_artifact(sqlite_url: str, tmp_path: Path) -> None:
    import io

    import numpy as np

    key = new_key(sqlite_url, "flags")
    engine = make_engine(sqlite_url)
    rt = Runtime(settings=Settings(database_url=sqlite_url, data_dir=tmp_path), engine=engine,
                 sessions=make_sessionmaker(engine), device=torch.device("cpu"), name="w")
    with api(settings(sqlite_url, tmp_path)) as client:
        model = upload(client, key, torchscript_bytes(tiny_net())).json()
        ev = client.post("/evaluations", headers=auth(key), json={
            "model_id": model["id"], "dataset": "shapes-32", "suite": [
                {"benchmark": "adversarial", "attack": "pgd", "eps": 0.03, "steps": 3}]}).json()
        assert evaluation_jobs.run(rt, uuid.UUID(ev["id"])) == "succeeded"
        done = client.get(f"/evaluations/{ev['id']}", headers=auth(key)).json()
        [name] = done["artifacts"]
        resp = client.get(f"/evaluations/{ev['id']}/artifacts/{name}", headers=auth(key))
        assert resp.status_code == 200
        flags = np.load(io.BytesIO(resp.content), allow_pickle=False)
        robust = next(r["value"] for r in done["results"] if r["metric"] == "robust_accuracy")
        assert flags["robust"].shape == (400,)
        assert flags["robust"].mean() == pytest.approx(robust)
        missing = client.get(f"/evaluations/{ev['id']}/artifacts/..%2F..%2Frobustscope.db",
                             headers=auth(key))
        assert missing.status_code == 404
        other = new_key(sqlite_url, "other")
        assert client.get(f"/evaluations/{ev['id']}/artifacts/{name}",
                          headers=auth(other)).status_code == 404
