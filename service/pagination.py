"""Cursor pagination over ``(created_at, id)``, newest first (evaluations, trainings)."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime

from service.errors import Invalid


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(row_id)])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, last = json.loads(base64.urlsafe_b64decode(padded))
        return datetime.fromisoformat(created), uuid.UUID(last)
    except (ValueError, TypeError) as exc:
        raise Invalid("the cursor is not valid; pass next_cursor from a previous page",
                      field="cursor") from exc
