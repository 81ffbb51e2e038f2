"""Webhook delivery, signed by the Standard Webhooks scheme (see
:mod:`service.webhook_policy`): the final evaluation record, POSTed once the job ends.

The URL is checked again here, since a name may resolve to another address than when the job
was submitted; redirects are not followed (a public URL must not bounce to a private one).
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime

import httpx
from standardwebhooks.webhooks import Webhook

from service.auth.keys import webhook_secret
from service.evaluations.service import to_out
from service.settings import Settings
from service.tables import Evaluation
from service.webhook_policy import refuse_reason, standard_secret
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
    reason = refuse_reason(url, rt.settings.webhook_allow_private)
    if reason is not None:
        log.warning("webhook for evaluation %s not sent: the URL %s", evaluation_id, reason)
        return None
    resp = httpx.post(url, content=body.encode(), timeout=timeout, follow_redirects=False,
                      headers=signed_headers(secret, msg_id, body))
    resp.raise_for_status()
    return resp.status_code
