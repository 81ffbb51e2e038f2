"""API keys: ``rs_<prefix>_<secret>``, stored as a SHA-256 hash and looked up by prefix.

The secret has 192 bits of entropy, so a fast hash is enough (no password stretching): a
stolen table does not yield usable keys.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import Unauthorized
from service.tables import ApiKey


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, owner: str, key: str | None = None) -> str:
    """Create a key for ``owner`` (or register a given one, e.g. the bootstrap key)."""
    if key is None:
        key = f"rs_{secrets.token_hex(6)}_{secrets.token_urlsafe(24)}"
    prefix = _prefix(key)
    session.add(ApiKey(owner=owner, prefix=prefix, key_hash=_hash(key),
                       webhook_secret=secrets.token_hex(32)))
    return key


def ensure_key(session: Session, owner: str, key: str) -> None:
    """Register ``key`` for ``owner`` unless it is already known (idempotent start-up)."""
    existing = session.scalar(select(ApiKey).where(ApiKey.prefix == _prefix(key)))
    if existing is None:
        create_key(session, owner, key)
    elif not hmac.compare_digest(existing.key_hash, _hash(key)):
        raise ValueError("a different key with the same prefix exists")


def authenticate(session: Session, key: str) -> ApiKey:
    row = session.scalar(
        select(ApiKey).where(ApiKey.prefix == _prefix(key), ApiKey.revoked_at.is_(None))
    )
    if row is None or not hmac.compare_digest(row.key_hash, _hash(key)):
        raise Unauthorized("the API key is not valid")
    return row


def webhook_secret(session: Session, owner: str) -> str | None:
    row = session.scalar(
        select(ApiKey).where(ApiKey.owner == owner, ApiKey.revoked_at.is_(None))
        .order_by(ApiKey.created_at)
    )
    return row.webhook_secret if row else None


def _prefix(key: str) -> str:
    # Keys made here are rs_<12 hex>_...; any other string (a bootstrap key) uses its hash.
    parts = key.split("_")
    if len(parts) >= 3 and parts[0] == "rs" and len(parts[1]) == 12:
        return parts[1]
    return "x" + _hash(key)[:15]
