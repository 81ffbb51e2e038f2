"""Every read of a tenant's object goes through here: another owner's row is not found."""

from __future__ import annotations

import uuid
from typing import Any, Protocol, TypeVar

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from core.errors import NotFound


class _Owned(Protocol):
    id: Any
    owner: Any


T = TypeVar("T", bound=_Owned)


def owned(session: Session, table: type[T], owner: str, row_id: uuid.UUID, what: str,
          options: list[Any] | None = None) -> T:
    """The owner's row ``row_id`` of ``table``; 404 when it is missing or someone else's
    (the two are indistinguishable to the caller)."""
    row = session.get(table, row_id, options=options)
    if row is None or row.owner != owner:
        raise NotFound(f"no {what} {row_id}")
    return row


def owned_rows(table: type[T], owner: str) -> Select[T]:
    """A query over the owner's rows of ``table``, to narrow further and page."""
    return select(table).where(table.owner == owner)
