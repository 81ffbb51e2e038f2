"""Webhook delivery, signed by the Standard Webhooks scheme (see
:mod:`core.webhook_policy`): the final evaluation record, POSTed once the job ends.

The URL is checked again here, since a name may resolve to another address than when the job
was submitted, and the connection goes to the very addresses that check vetted (no second
lookup a rebinding name could answer differently); redirects are not followed (a public URL
must not bounce to a private one).
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime

import httpx
from standardwebhooks.webhooks import Webhook

from core.keys import webhook_secret
from core.settings import Settings
from core.tables import Evaluation
from core.webhook_policy import standard_secret, vet
from service.evaluations.service import to_out
from workers.runtime import Runtime

log = logging.getLogger("robustscope.webhooks")

PLACEHOLDER = "change-me"


def signing_secret(settings: Settings, owner_secret: str | None) -> str:
    """The deployment's secret when one is configured, else the owner's."""
    if settings.webhook_signing_secret and settings.webhook_signing_secret != PLACEHOLDER:
        return standard_secret(settings.webhook_signing_secret)
    return standard_secret(owner_secret or "")


def signed_headers(secret: str, msg_id: str, body: str,
                   now: datetime | None = None) -> dict[str, str]:
    now = now or datetime.now(UTC)
    return {"content-type": "application/json", "webhook-id": msg_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": Webhook(secret).sign(msg_id, now, body)}


def deliver(rt: Runtime, evaluation_id: str, timeout: float = 10.0) -> int | None:
    """POST the final evaluation record; raises on a non-2xx answer so Celery retries. A URL
    that now resolves to a refused address is dropped (logged), not retried."""
    with rt.sessions() as s:
        ev = s.get(Evaluation, uuid.UUID(evaluation_id))
        if ev is None or not ev.webhook_url:
            return None
        secret = signing_secret(rt.settings, webhook_secret(s, ev.owner))
        body = json.dumps({"event": f"evaluation.{ev.status}",
                           "evaluation": to_out(ev).model_dump(mode="json")})
        url = ev.webhook_url
        # One id per job and final state: retries repeat it, so a receiver can deduplicate.
        msg_id = f"msg_{ev.id.hex}_{ev.status}"
    reason, addresses = vet(url, rt.settings.webhook_allow_private)
    if reason is not None:
        log.warning("webhook for evaluation %s not sent: the URL %s", evaluation_id, reason)
        return None
    resp = post_pinned(url, addresses, body.encode(), signed_headers(secret, msg_id, body),
                       timeout)
    resp.raise_for_status()
    return resp.status_code


def post_pinned(url: str, addresses: list[str], body: bytes, headers: dict[str, str],
                timeout: float, transport: httpx.BaseTransport | None = None) -> httpx.Response:
    """POST ``body`` to ``url``, connecting only to ``addresses`` (the vetted ones, in order,
    the next tried when one cannot be reached), never to what the name resolves to now. The
    request keeps the URL's ``Host`` header, and for https its TLS server name (SNI), against
    which the certificate is verified. No addresses (private receivers allowed): by name."""
    with httpx.Client(timeout=timeout, follow_redirects=False, transport=transport) as client:
        if not addresses:
            return client.post(url, content=body, headers=headers)
        target = httpx.URL(url)
        pinned_headers = {**headers, "host": target.netloc.decode("ascii")}
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        for i, address in enumerate(addresses):
            try:
                return client.post(target.copy_with(host=address), content=body,
                                   headers=pinned_headers, extensions=extensions)
            except httpx.ConnectError:
                if i == len(addresses) - 1:
                    raise
        raise AssertionError("unreachable")
