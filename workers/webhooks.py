"""Signed webhook delivery: HMAC-SHA256 of the exact body, with the owner's secret."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid

import httpx

from service.auth.keys import webhook_secret
from service.evaluations.service import to_out
from service.tables import Evaluation
from workers.runtime import Runtime

SIGNATURE_HEADER = "X-Robustscope-Signature"


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def deliver(rt: Runtime, evaluation_id: str, timeout: float = 10.0) -> int | None:
    """POST the final evaluation record; raises on a non-2xx answer so Celery retries."""
    with rt.sessions() as s:
        ev = s.get(Evaluation, uuid.UUID(evaluation_id))
        if ev is None or not ev.webhook_url:
            return None
        secret = webhook_secret(s, ev.owner) or ""
        body = json.dumps({"event": f"evaluation.{ev.status}",
                           "evaluation": to_out(ev).model_dump(mode="json")}).encode()
        url = ev.webhook_url
    resp = httpx.post(url, content=body, timeout=timeout, headers={
        "Content-Type": "application/json", SIGNATURE_HEADER: sign(secret, body)})
    resp.raise_for_status()
    return resp.status_code
