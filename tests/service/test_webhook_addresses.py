"""Webhooks never reach internal addresses: refused at submission, checked again at
delivery, and delivered to the very address that was vetted (DNS rebinding)."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from sqlalchemy import update

from core import webhook_policy
from core.db import make_engine, make_sessionmaker, transaction
from core.settings import Settings
from core.tables import Evaluation
from tests.factories import api, auth, new_key, settings, tiny_net, torchscript_bytes, upload
from workers import webhooks
from workers.runtime import Runtime

MB = 1 << 20


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
