"""Browser sessions and share links: how a person with a browser reads the pages.

A session starts when a browser posts a valid API key to ``/login``. Its cookie holds a random
token (256 bits); the table holds only the token's hash, the key it was opened with and when
it expires. The cookie is read on ``GET`` and ``HEAD`` only, so it opens its owner's pages and
reads but authorises no write: every request with a body needs ``Authorization: Bearer``
(``service.http.guard``), so a cross-site form cannot submit, cancel or revoke anything. A session
ends at its expiry, at logout, or when its key is revoked.

A share link opens one private report (an evaluation's or a sweep's) read-only, to anyone
holding it, until it expires or its owner revokes it. Its URL holds a random token; the table
holds the token's hash, so a link that was not issued (or was revoked) opens nothing.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from core import keys
from core.errors import DomainError
from core.repository import owned, owned_rows
from core.tables import ApiKey, BrowserSession, ShareLink, utcnow

COOKIE = "robustscope_session"
SHARE_KINDS = ("evaluation", "sweep")


class LoginRequired(DomainError):
    """A page asked for without a session: a browser is sent to ``/login?next=…`` (303), any
    other client gets the 401 problem."""

    status, type, title = 401, "unauthorized", "Missing or invalid API key"

    def __init__(self, next_url: str) -> None:
        super().__init__("log in at /login, or send 'Authorization: Bearer <api key>'")
        self.next_url = next_url


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def start(session: Session, key: str, hours: float) -> tuple[str, str, datetime]:
    """A new session for a valid, unrevoked ``key``: (cookie token, owner, expiry); a wrong
    key raises Unauthorized."""
    row = keys.authenticate(session, key)
    # Sessions that ended or expired a day ago are of no use to anyone: forget them.
    session.execute(delete(BrowserSession).where(
        BrowserSession.expires_at < utcnow() - timedelta(days=1)))
    token = secrets.token_urlsafe(32)
    expires = utcnow() + timedelta(hours=hours)
    session.add(BrowserSession(token_hash=_hash(token), key_id=row.id, owner=row.owner,
                               expires_at=expires))
    return token, row.owner, expires


def owner_of(session: Session, token: str) -> str | None:
    """The owner of a live session: not ended, not expired, its key not revoked."""
    owner = session.scalar(
        select(BrowserSession.owner).join(ApiKey, ApiKey.id == BrowserSession.key_id)
        .where(BrowserSession.token_hash == _hash(token), BrowserSession.ended_at.is_(None),
               BrowserSession.expires_at > utcnow(), ApiKey.revoked_at.is_(None)))
    return str(owner) if owner is not None else None


def end(session: Session, token: str) -> None:
    session.execute(update(BrowserSession).where(
        BrowserSession.token_hash == _hash(token), BrowserSession.ended_at.is_(None))
        .values(ended_at=utcnow()))


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a path on this site, never another host (``//evil``,
    ``/\\evil``, ``https://evil`` and anything with control characters become ``/``)."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return "/"
    if "\\" in target or any(ord(c) < 0x20 or ord(c) == 0x7F for c in target):
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    return target


def create_share(session: Session, owner: str, kind: str, target_id: uuid.UUID,
                 days: float) -> tuple[ShareLink, str]:
    """A link to the owner's report ``target_id`` (checked by the caller), valid ``days``."""
    token = secrets.token_urlsafe(32)
    row = ShareLink(token_hash=_hash(token), owner=owner, kind=kind, target_id=target_id,
                    expires_at=utcnow() + timedelta(days=days))
    session.add(row)
    session.flush()
    return row, token


def shared(session: Session, token: str) -> ShareLink | None:
    """The live share link with this token: not revoked, not expired."""
    return session.scalar(select(ShareLink).where(
        ShareLink.token_hash == _hash(token), ShareLink.revoked_at.is_(None),
        ShareLink.expires_at > utcnow()))


def list_shares(session: Session, owner: str) -> list[ShareLink]:
    return list(session.scalars(owned_rows(ShareLink, owner).order_by(ShareLink.created_at)))


def revoke_share(session: Session, owner: str, share_id: uuid.UUID) -> ShareLink:
    row = owned(session, ShareLink, owner, share_id, "share link")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return row
