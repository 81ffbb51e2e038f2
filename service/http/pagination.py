"""Cursor pagination over ``(created_at, id)``, newest first (evaluations, trainings,
sweeps)."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar

from pydantic import BaseModel, Field
from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from core.errors import Invalid

Item = TypeVar("Item")


class Page(BaseModel, Generic[Item]):
    """One page of a listing, newest first; every listing of the API has this shape."""

    items: list[Item] = Field(description="the items on this page")
    next_cursor: str | None = Field(
        None, description="pass as `cursor` for the next page; null on the last page")


class _Paged(Protocol):
    id: Any
    created_at: Any


R = TypeVar("R", bound=_Paged)


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(row_id)])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, last = json.loads(base64.urlsafe_b64decode(padded))
        when = datetime.fromisoformat(created)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        # Normalised here: a date near the ends of the calendar overflows in UTC.
        return when.astimezone(UTC), uuid.UUID(last)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise Invalid("the cursor is not valid; pass next_cursor from a previous page",
                      field="cursor") from exc


def newest_first(session: Session, query: Select[R], table: type[R],
                 cursor: str | None, limit: int) -> tuple[list[R], str | None]:
    """One page of ``query`` (rows of ``table``), newest first, after ``cursor``; the
    cursor of the next page, or None on the last one."""
    if cursor:
        created, last_id = decode_cursor(cursor)
        query = query.where(or_(table.created_at < created,
                                and_(table.created_at == created, table.id < last_id)))
    query = query.order_by(table.created_at.desc(), table.id.desc()).limit(limit + 1)
    rows = list(session.scalars(query))
    last = rows[limit - 1] if len(rows) > limit else None
    return rows[:limit], encode_cursor(last.created_at, last.id) if last is not None else None
