"""Every query and check that narrows by owner goes through here, or through a domain's own
``repository`` module: another owner's row is not found, and a reader sees their own rows and
the public ones. ``tests/test_owner_scoping.py`` refuses an owner comparison written anywhere
else."""

from __future__ import annotations

import uuid
from typing import Any, Protocol, TypeVar

from sqlalchemy import ColumnElement, Select, func, or_, select
from sqlalchemy.orm import Session

from core.errors import NotFound


class _OwnedTable(Protocol):
    id: Any
    owner: Any


class _PublicTable(_OwnedTable, Protocol):
    public: Any


class OwnedRow(Protocol):
    """A row, record or entry that names its owner."""

    @property
    def owner(self) -> Any: ...


T = TypeVar("T", bound=_OwnedTable)


def owned_by(table: Any, owner: str | ColumnElement[Any]) -> ColumnElement[bool]:
    """The condition that a row of ``table`` (a mapped class, or a Core table's columns
    ``table.c``) is ``owner``'s: an owner's name, or another table's owner column to join on."""
    condition: ColumnElement[bool] = table.owner == owner
    return condition


def owned(session: Session, table: type[T], owner: str, row_id: uuid.UUID, what: str,
          options: list[Any] | None = None, field: str | None = None) -> T:
    """The owner's row ``row_id`` of ``table``; 404 when it is missing or someone else's
    (the two are indistinguishable to the caller), naming the request's ``field`` if given."""
    row = session.get(table, row_id, options=options)
    if row is None or row.owner != owner:
        where = {"field": field} if field else {}
        raise NotFound(f"no {what} {row_id}", **where)
    return row


def owned_rows(table: type[T], owner: str) -> Select[T]:
    """A query over the owner's rows of ``table``, to narrow further and page."""
    return select(table).where(owned_by(table, owner))


def count_owned(session: Session, table: type[_OwnedTable], owner: str,
                *where: ColumnElement[bool]) -> int:
    """How many of the owner's rows of ``table`` meet ``where``."""
    count = session.scalar(select(func.count()).select_from(table)
                           .where(owned_by(table, owner), *where))
    return int(count or 0)


def visible_to(table: type[_PublicTable], viewer: str | None) -> ColumnElement[bool]:
    """The rows of ``table`` that ``viewer`` may read: public ones, and their own (None: an
    anonymous reader, who sees the public ones only)."""
    if viewer is None:
        public: ColumnElement[bool] = table.public.is_(True)
        return public
    return or_(owned_by(table, viewer), table.public.is_(True))


def is_owner(row: OwnedRow | None, owner: str | None) -> bool:
    """Whether ``row`` is ``owner``'s; never for no row, nor for an anonymous reader."""
    return row is not None and owner is not None and row.owner == owner
