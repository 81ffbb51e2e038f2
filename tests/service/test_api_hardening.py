"""The API under hostile input and outages: bodies refused before they are read, one answer
for escaped errors (connection kept), 503 while the database is down, NULs and bad cursors
as 4xx naming the field, keys revoked at once, quotas, and operational detail behind a key.
Webhook addresses are in ``test_webhook_addresses.py``, ingest by a worker in
``test_ingest_worker.py``."""

from __future__ import annotations

import base64
import http.client
import json
import os
import select
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest

from core.migrate import upgrade
from core.settings import Settings
from robustscope import cli
from service.app import create_app
from tests.factories import api, auth, new_key, settings, tiny_net, torchscript_bytes, upload
from tests.service.servers import PrivateCluster, rss, serve

pytestmark = pytest.mark.slow

MB = 1 << 20


def _spool_listing() -> set[str]:
    return set(os.listdir(tempfile.gettempdir()))



def _send_chunked(port: int, path: str, headers: dict[str, str], total: int,
                  content_type: str) -> tuple[int, int]:
    """Streams ``total`` bytes as a chunked body until the server answers; returns the status
    and how many body bytes were sent before the answer came."""
    sock = socket.create_connection(("127.0.0.1", port))
    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Transfer-Encoding: chunked",
            f"Content-Type: {content_type}", *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    chunk = b"x" * (64 * 1024)
    sent = 0
    if content_type.startswith("multipart/"):  # a well-formed start: a file part
        part = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n'
                b"Content-Type: application/octet-stream\r\n\r\n")
        sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
    elif content_type.endswith("json"):
        sock.sendall(b'9\r\n{"pad": "\r\n')
    try:
        while sent < total:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    sock.settimeout(10)
    answer = sock.recv(4096).decode("latin-1")
    sock.close()
    return int(answer.split(" ", 2)[1]), sent


def test_bodies_are_refused_before_they_are_read(sqlite_url: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))  # where multipart parts would spool
    key = new_key(sqlite_url, "streamer")
    cfg = settings(sqlite_url, tmp_path, max_checkpoint_bytes=2 * MB, max_dataset_bytes=2 * MB)
    spool_before = _spool_listing()
    with serve(create_app(cfg)) as port:
        rss_before = rss()
        # No key: 401 before one byte of 300 MB is read (the socket buffers a few MB at most).
        for path, ctype in (("/models", "multipart/form-data; boundary=b"),
                            ("/datasets", "multipart/form-data; boundary=b"),
                            ("/trainings", "application/json"),
                            ("/sweeps", "application/json")):
            status, sent = _send_chunked(port, path, {}, 300 * MB, ctype)
            assert status == 401, path
            assert sent < 32 * MB, (path, sent)
        # A key, a chunked body (no Content-Length) past the limit: 413 while it streams.
        for path, ctype, limit in (("/models", "multipart/form-data; boundary=b", 3 * MB),
                                   ("/trainings", "application/json", MB)):
            status, sent = _send_chunked(port, path, auth(key), 300 * MB, ctype)
            assert status == 413, path
            assert sent < limit + 32 * MB, (path, sent)
        # The server shares this process: 1.2 GB offered, not held.
        assert rss() - rss_before < 64 * MB
    assert _spool_listing() - spool_before == set()
    assert not (tmp_path / "tmp").exists() or list((tmp_path / "tmp").iterdir()) == []


def test_a_declared_oversize_body_is_413_and_json_bodies_are_bounded(
        sqlite_url: str, tmp_path: Path) -> None:
    key = new_key(sqlite_url, "big")
    with api(settings(sqlite_url, tmp_path, max_json_bytes=4096)) as client:
        resp = client.post("/trainings", headers=auth(key),
                           content=json.dumps({"pad": "x" * 10_000}),
                           )
        assert resp.status_code == 413
        assert resp.headers["content-type"] == "application/problem+json"
        assert resp.json()["limit"] == 4096


def _boom_app(cfg: Settings) -> Any:
    app = create_app(cfg)

    def boom() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/boom", boom)
    return app


def test_an_unexpected_error_is_one_500_and_keeps_the_connection(
        sqlite_url: str, tmp_path: Path) -> None:
    with serve(_boom_app(settings(sqlite_url, tmp_path))) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for _ in range(2):
            conn.request("GET", "/boom")
            resp = conn.getresponse()
            body = json.loads(resp.read())
            assert resp.status == 500
            assert resp.getheader("content-type") == "application/problem+json"
            assert body["type"].endswith("internal-error")
            assert resp.getheader("connection") != "close"
        sock = conn.sock
        conn.request("GET", "/health")
        assert conn.getresponse().read() == b'{"status":"ok"}'
        assert conn.sock is sock  # the same TCP connection throughout


@pytest.mark.services  # a private cluster of its own, stopped and restarted
def test_a_stopped_database_gives_503_and_keeps_the_connection(tmp_path: Path) -> None:
    cluster = PrivateCluster()
    try:
        cluster.start()
        upgrade(cluster.url)
        key = new_key(cluster.url, "outage")
        cfg = settings(cluster.url, tmp_path)
        with serve(create_app(cfg)) as port:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
            headers = auth(key) | {"Content-Type": "application/json"}
            conn.request("GET", f"/evaluations/{uuid.uuid4()}", headers=headers)
            first = conn.getresponse()
            assert first.status == 404
            first.read()
            sock = conn.sock
            cluster.stop()
            for method, path, body in (
                    ("GET", f"/evaluations/{uuid.uuid4()}", None),
                    ("POST", "/evaluations", json.dumps({"model_id": str(uuid.uuid4()),
                                                         "dataset": "shapes-32",
                                                         "suite": "standard"})),
                    ("GET", "/evaluations", None),
                    ("GET", "/ready", None)):
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                problem = json.loads(resp.read())
                assert resp.status == 503, (path, problem)
                assert resp.getheader("retry-after") == "5"
                assert resp.getheader("content-type") == "application/problem+json"
                assert "127.0.0.1" not in json.dumps(problem)  # no driver text for anyone
                assert conn.sock is sock
            cluster.start()
            conn.request("GET", f"/evaluations/{uuid.uuid4()}", headers=headers)
            recovered = conn.getresponse()
            recovered.read()
            assert recovered.status == 404  # recovered, same connection
            assert conn.sock is sock
            cluster.stop()  # a restart between two polls: the kept connections are dead
            cluster.start()
            conn.request("GET", f"/evaluations/{uuid.uuid4()}", headers=headers)
            assert conn.getresponse().status == 404  # the poll opened a new one
    finally:
        cluster.remove()


def _cursor(created: str) -> str:
    raw = json.dumps([created, str(uuid.uuid4())]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_nul_characters_and_bad_cursors_are_4xx_naming_the_field(
        backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url")
    key = new_key(url, f"nul-{uuid.uuid4().hex[:6]}")
    with api(settings(url, tmp_path)) as client:
        h = auth(key)
        model = upload(client, key, torchscript_bytes(tiny_net())).json()
        cases = [
            client.get("/evaluations", headers=h, params={"dataset": "a\x00b"}),
            client.get("/leaderboard", headers=h, params={"dataset": "a\x00b"}),
            upload(client, key, torchscript_bytes(tiny_net()),
                   {"name": "m\x00", "num_classes": 4, "input_shape": [3, 32, 32]}),
            client.post("/datasets", headers=h, files={"file": ("d.zip", b"PK")},
                        data={"name": "d\x00"}),
            client.post("/evaluations", headers=h, json={
                "model_id": model["id"], "dataset": "shapes\x00", "suite": "standard"}),
            client.post("/evaluations", headers=h, json={
                "model_id": model["id"], "dataset": "shapes-32", "suite": "standard",
                "webhook_url": "http://example.com/\x00"}),
        ]
        fields = ["dataset", "dataset", "metadata.name", "name", "dataset", "webhook_url"]
        for resp, field in zip(cases, fields, strict=True):
            assert resp.status_code == 422, resp.text
            assert resp.json()["field"] == field
            assert "NUL" in resp.json()["detail"]
            # One renderer: the guard's refusals name the fields as the handlers' do.
            assert resp.json()["errors"][0]["field"] == field
        for created in ("9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00", "nonsense"):
            resp = client.get("/evaluations", headers=h, params={"cursor": _cursor(created)})
            assert resp.status_code == 422, resp.text
            assert resp.json()["field"] == "cursor"
    # Nothing of the refused uploads is left on disk: one model file, no archives.
    assert len(list((tmp_path / "models").iterdir())) == 1
    assert not (tmp_path / "datasets").exists() or list((tmp_path / "datasets").iterdir()) == []


def test_keys_are_listed_created_and_revoked_at_once(sqlite_url: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    first = new_key(sqlite_url, "keyed")
    with api(settings(sqlite_url, tmp_path)) as client:
        made = client.post("/keys", headers=auth(first), json={"name": "ci"})
        assert made.status_code == 201, made.text
        second = made.json()["key"]
        listed = client.get("/keys", headers=auth(second)).json()["items"]
        assert [k["name"] for k in listed] == [None, "ci"]
        assert all("key" not in k and "key_hash" not in k for k in listed)
        assert client.delete(f"/keys/{made.json()['prefix']}",
                             headers=auth(first)).status_code == 204
        assert client.get("/models", headers=auth(second)).status_code == 401
        assert client.get("/models", headers=auth(first)).status_code == 200
        other = new_key(sqlite_url, "someone-else")
        assert client.delete(f"/keys/{first.split('_')[1]}",
                             headers=auth(other)).status_code == 404
        # The command line, another process's view: revoked there, refused here at once.
        monkeypatch.setenv("ROBUSTSCOPE_DATABASE_URL", sqlite_url)
        monkeypatch.setenv("ROBUSTSCOPE_DATA_DIR", str(tmp_path))
        from core.settings import get_settings
        get_settings.cache_clear()
        try:
            assert cli.main(["apikey", "list", "keyed"]) == 0
            out = capsys.readouterr().out.splitlines()
            assert [line.split("\t")[2].split(" ")[0] for line in out] == ["active", "revoked"]
            assert cli.main(["apikey", "revoke", first]) == 0
        finally:
            get_settings.cache_clear()
        assert client.get("/models", headers=auth(first)).status_code == 401


def test_quotas_are_429_with_retry_after(sqlite_url: str, tmp_path: Path) -> None:
    key = new_key(sqlite_url, "quota")
    net = torchscript_bytes(tiny_net())
    cfg = settings(sqlite_url, tmp_path, quota_active_jobs=2,
                   quota_stored_bytes=2 * len(net) + 10)
    with api(cfg) as client:
        model = upload(client, key, net).json()
        assert upload(client, key, net).status_code == 201
        full = upload(client, key, net)
        assert full.status_code == 429
        assert full.headers["retry-after"] == "30"
        assert full.json()["quota"] == "stored_bytes"
        body = {"model_id": model["id"], "dataset": "shapes-32", "suite": "standard"}
        for _ in range(2):
            assert client.post("/evaluations", headers=auth(key), json=body).status_code == 202
        over = client.post("/evaluations", headers=auth(key), json=body)
        assert over.status_code == 429
        assert over.json()["quota"] == "active_jobs"
        listed = client.get("/evaluations", headers=auth(key)).json()["items"]
        assert len(listed) == 2  # the refused one was rolled back
    assert len(list((tmp_path / "models").iterdir())) == 2


def test_metrics_and_ready_detail_need_a_key(sqlite_url: str, tmp_path: Path) -> None:
    key = new_key(sqlite_url, "ops")
    with api(settings(sqlite_url, tmp_path, broker_url="redis://127.0.0.1:1/0")) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=auth(key)).status_code == 200
        anonymous = client.get("/ready")
        assert anonymous.status_code == 503
        assert anonymous.json()["checks"] == {"database": "ok", "broker": "unavailable"}
        detailed = client.get("/ready", headers=auth(key)).json()["checks"]
        assert detailed["broker"].startswith("unavailable: ")
        assert len(detailed["broker"]) > len("unavailable: ")
    with api(settings(sqlite_url, tmp_path, metrics_public=True)) as client:
        assert client.get("/metrics").status_code == 200
