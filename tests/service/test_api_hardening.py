"""The API under hostile input and outages: bodies refused before they are read, one answer
for escaped errors (connection kept), 503 while the database is down, NULs and bad cursors
as 4xx naming the field, webhooks refused for internal addresses, keys revoked at once,
quotas, and operational detail behind a key."""

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

import httpx
import numpy as np
import pytest
import torch
from sqlalchemy import update

from service import cli, webhook_policy
from service.app import create_app
from service.datasets import ingest_decode
from service.datasets.ingest import IngestLimits, ingest
from service.datasets.ingest_errors import DatasetIngestError
from service.db import make_engine, make_sessionmaker, transaction
from service.migrate import upgrade
from service.settings import Settings
from service.tables import Evaluation
from tests.factories import api, auth, new_key, settings, tiny_net, torchscript_bytes, upload
from tests.service.ingest_fixtures import png, write_zip
from tests.service.servers import PrivateCluster, pg_bin, serve
from workers import webhooks
from workers.runtime import Runtime

MB = 1 << 20


def _spool_listing() -> set[str]:
    return set(os.listdir(tempfile.gettempdir()))


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


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
        rss_before = _rss()
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
        assert _rss() - rss_before < 64 * MB
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


@pytest.mark.skipif(pg_bin() is None, reason="needs the PostgreSQL server binaries")
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
        for created in ("9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00", "nonsense"):
            resp = client.get("/evaluations", headers=h, params={"cursor": _cursor(created)})
            assert resp.status_code == 422, resp.text
            assert resp.json()["field"] == "cursor"
    # Nothing of the refused uploads is left on disk: one model file, no archives.
    assert len(list((tmp_path / "models").iterdir())) == 1
    assert not (tmp_path / "datasets").exists() or list((tmp_path / "datasets").iterdir()) == []


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/x", "http://localhost/x",
                                 "http://169.254.169.254/latest/meta-data",
                                 "http://10.1.2.3/hook", "http://[::1]/x",
                                 "http://192.168.0.10/x", "ftp://example.com/x"])
def test_webhooks_to_internal_addresses_are_refused(sqlite_url: str, tmp_path: Path,
                                                    url: str) -> None:
    key = new_key(sqlite_url, "ssrf")
    with api(settings(sqlite_url, tmp_path)) as client:
        model = upload(client, key, torchscript_bytes(tiny_net())).json()
        resp = client.post("/evaluations", headers=auth(key), json={
            "model_id": model["id"], "dataset": "shapes-32", "suite": "standard",
            "webhook_url": url})
        assert resp.status_code == 422, resp.text
        body = resp.json()
        named = body.get("field") or body["errors"][0]["field"]
        assert named == "webhook_url"


def _finished_with_webhook(sqlite_url: str, tmp_path: Path, owner: str,
                           url: str) -> tuple[Runtime, dict[str, Any]]:
    """An evaluation submitted with ``url`` as its webhook (private addresses allowed at
    submission), marked succeeded, and a worker runtime to deliver its webhook with."""
    key = new_key(sqlite_url, owner)
    with api(settings(sqlite_url, tmp_path, webhook_allow_private=True)) as client:
        model = upload(client, key, torchscript_bytes(tiny_net())).json()
        ev: dict[str, Any] = client.post("/evaluations", headers=auth(key), json={
            "model_id": model["id"], "dataset": "shapes-32", "suite": "standard",
            "webhook_url": url}).json()
    engine = make_engine(sqlite_url)
    with transaction(make_sessionmaker(engine)) as s:
        s.execute(update(Evaluation).where(Evaluation.id == uuid.UUID(ev["id"]))
                  .values(status="succeeded"))
    rt = Runtime(settings=Settings(database_url=sqlite_url, data_dir=tmp_path), engine=engine,
                 sessions=make_sessionmaker(engine), device=torch.device("cpu"), name="w")
    return rt, ev


def test_a_webhook_url_is_checked_again_at_delivery(sqlite_url: str, tmp_path: Path) -> None:
    rt, ev = _finished_with_webhook(sqlite_url, tmp_path, "rebind", "http://127.0.0.1:9/hook")
    # Port 9 on loopback would refuse the connection (an httpx error, retried); the policy
    # refuses the URL first, so nothing is sent and nothing is retried.
    assert webhooks.deliver(rt, ev["id"]) is None


class _RebindingResolver:
    """A DNS answer that changes under the caller: a public address to the first lookup of
    ``name``, loopback to every later one (DNS rebinding). Other names resolve as usual."""

    def __init__(self, name: str, public: str = "93.184.216.34") -> None:
        self.name, self.public, self.lookups = name, public, 0
        self.real = socket.getaddrinfo

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != self.name:
            return self.real(host, port, *args, **kwargs)
        self.lookups += 1
        address = self.public if self.lookups == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port)))]


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_webhook_connects_to_the_address_it_vetted(sqlite_url: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     scheme: str) -> None:
    """A name that answers a public address to the check and 127.0.0.1 to the connection
    (DNS rebinding) is resolved once at delivery: the POST goes to the vetted address, with
    the URL's Host header and TLS server name, and never to loopback."""
    url = f"{scheme}://rebind.test:8443/hook"
    rt, ev = _finished_with_webhook(sqlite_url, tmp_path, "rebinder", url)
    resolver = _RebindingResolver("rebind.test")
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    sent: list[httpx.Request] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(204)

    pinned = webhooks.post_pinned
    monkeypatch.setattr(webhooks, "post_pinned", lambda *a, **k: pinned(
        *a, **k, transport=httpx.MockTransport(receiver)))
    assert webhooks.deliver(rt, ev["id"]) == 204
    assert resolver.lookups == 1  # the check's lookup is the only one
    [request] = sent
    assert request.url.host == "93.184.216.34"
    assert request.url.port == 8443
    assert request.url.path == "/hook"
    assert request.headers["host"] == "rebind.test:8443"
    assert request.headers["webhook-signature"].startswith("v1,")
    if scheme == "https":
        assert request.extensions["sni_hostname"] == "rebind.test"
    else:
        assert "sni_hostname" not in request.extensions


def test_a_rebinding_name_never_reaches_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end over real sockets: a receiver listens on 127.0.0.1; the name answers a
    public address to the check and 127.0.0.1 afterwards. The delivery connects to the vetted
    public address (refused or unreachable here: a retryable error), and loopback hears
    nothing. Before delivery pinned the address, the second lookup reached the receiver."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    resolver = _RebindingResolver("rebind.test", public="192.88.99.1")  # global, 6to4 relay
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    url = f"http://rebind.test:{port}/hook"
    reason, addresses = webhook_policy.vet(url, allow_private=False)
    assert reason is None
    assert addresses == ["192.88.99.1"]
    try:
        with pytest.raises(httpx.TransportError):
            webhooks.post_pinned(url, addresses, b"{}", {"content-type": "application/json"},
                                 timeout=0.5)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing connected to loopback
    finally:
        listener.close()
    assert resolver.lookups == 1
    # A later check sees the loopback answer and refuses the URL outright.
    assert "127.0.0.1" in (webhook_policy.refuse_reason(url, allow_private=False) or "")


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
        from service.settings import get_settings
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


def test_the_decoded_budget_is_charged_from_headers_before_decoding(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """400 images of 1024x1024 (a small zip: they are flat) against a 64 MB budget: refused
    after about 21 images' headers (3 MB each), never decoding the rest."""
    image = png(np.full((1024, 1024, 3), 7, np.uint8))
    files = {f"c{i % 2}/img{i:03d}.png": image for i in range(400)}
    archive = write_zip(tmp_path / "big.zip", files)
    decoded = []
    real = ingest_decode.decode_image

    def counting(data: bytes, max_side: int) -> Any:
        decoded.append(1)
        return real(data, max_side)

    monkeypatch.setattr("service.datasets.ingest.decode_image", counting)
    with pytest.raises(DatasetIngestError) as err:
        ingest(archive, tmp_path / "out.npz", name="big",
               limits=IngestLimits(max_decoded_bytes=64 * MB, decode_threads=1))
    assert err.value.status == 413
    assert len(decoded) <= 22
    assert not (tmp_path / "out.npz").exists()


def test_a_dataset_upload_is_ingested_by_a_worker_not_the_api(
        sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr("service.datasets.service.ingest",
                        lambda *a, **k: calls.append("ingest"))
    key = new_key(sqlite_url, "lazy")
    archive = write_zip(tmp_path / "a.zip", {"manifest.csv": b"path,label\nx.png,0\n",
                                              "x.png": png(np.zeros((8, 8, 3), np.uint8))})
    with api(settings(sqlite_url, tmp_path)) as client, archive.open("rb") as f:
        resp = client.post("/datasets", headers=auth(key), files={"file": ("a.zip", f)})
        assert resp.status_code == 202
        assert resp.headers["location"] == f"/datasets/{resp.json()['id']}"
        assert resp.json()["status"] == "ingesting"
        assert resp.json()["num_examples"] is None
        assert client.get(f"/datasets/{resp.json()['id']}",
                          headers=auth(key)).json()["status"] == "ingesting"
    assert calls == []
    assert (tmp_path / "datasets" / f"{resp.json()['id']}.upload").exists()




_INGEST = """
import sys, uuid
from pathlib import Path
from service.datasets.ingest import IngestLimits
from service.datasets.service import run_ingest
from service.db import make_engine, make_sessionmaker
url, dataset_id, data_dir = sys.argv[1:4]
status = run_ingest(make_sessionmaker(make_engine(url)), uuid.UUID(dataset_id), Path(data_dir),
                    IngestLimits(decode_threads=1))
print(status)
"""


def test_polling_stays_fast_and_the_api_small_while_a_worker_ingests(
        sqlite_url: str, tmp_path: Path) -> None:
    import statistics
    import subprocess
    import sys
    import time

    import httpx

    key = new_key(sqlite_url, "poller")
    rng = np.random.default_rng(0)
    files = {f"c{i % 4}/img{i:03d}.png": png(rng.integers(0, 255, (256, 256, 3), np.uint8))
             for i in range(240)}
    archive = write_zip(tmp_path / "noisy.zip", files)  # 47 MB decoded, incompressible
    cfg = settings(sqlite_url, tmp_path)
    with serve(create_app(cfg)) as port, httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers=auth(key)) as client:
        with archive.open("rb") as f:
            made = client.post("/datasets", files={"file": ("noisy.zip", f)})
        assert made.status_code == 202
        dataset_id = made.json()["id"]

        def poll(n: int) -> list[float]:
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                assert client.get(f"/datasets/{dataset_id}").status_code == 200
                times.append(time.perf_counter() - t0)
            return times

        baseline = statistics.median(poll(40))
        rss_before = _rss()
        worker = subprocess.Popen([sys.executable, "-c", _INGEST, sqlite_url, dataset_id,
                                   str(tmp_path)], stdout=subprocess.PIPE, text=True)
        during: list[float] = []
        while worker.poll() is None:
            during += poll(5)
        out, _ = worker.communicate()
        assert out.strip() == "ready"
        assert client.get(f"/datasets/{dataset_id}").json()["num_examples"] == 240
        assert len(during) >= 5
        # The API does none of the decoding: it stays small, and a poll stays a poll (the
        # bound is loose because the worker shares this machine's cores).
        assert _rss() - rss_before < 32 * MB
        assert statistics.median(during) < 5 * baseline + 0.05


def test_a_lost_ingest_is_resent_by_the_reconciler(sqlite_url: str, tmp_path: Path) -> None:
    from workers import ingest as ingest_task
    from workers import reconciler

    key = new_key(sqlite_url, "lost")
    archive = write_zip(tmp_path / "a.zip", {"manifest.csv": b"path,label\nx.png,0\n",
                                              "x.png": png(np.zeros((8, 8, 3), np.uint8))})
    with api(settings(sqlite_url, tmp_path)) as client, archive.open("rb") as f:
        dataset_id = client.post("/datasets", headers=auth(key),
                                 files={"file": ("a.zip", f)}).json()["id"]
    engine = make_engine(sqlite_url)
    fresh = Runtime(settings=Settings(database_url=sqlite_url, data_dir=tmp_path),
                    engine=engine, sessions=make_sessionmaker(engine),
                    device=torch.device("cpu"), name="w")
    sent: list[tuple[str, list[str]]] = []
    assert reconciler.reconcile_once(fresh, lambda name, args: sent.append((name, args))) == []
    rt = Runtime(settings=Settings(database_url=sqlite_url, data_dir=tmp_path,
                                   requeue_queued_after=0), engine=engine,
                 sessions=make_sessionmaker(engine), device=torch.device("cpu"), name="w")
    assert reconciler.reconcile_once(rt, lambda name, args: sent.append((name, args))) == [
        dataset_id]
    assert sent == [("robustscope.ingest", [dataset_id])]
    assert ingest_task.run(rt, uuid.UUID(dataset_id)) == "ready"
    assert ingest_task.run(rt, uuid.UUID(dataset_id)) is None  # a redelivery does nothing
    assert reconciler.reconcile_once(rt, lambda name, args: sent.append((name, args))) == []
