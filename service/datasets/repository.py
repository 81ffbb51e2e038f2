"""The owner's uploaded datasets, found by id or by name."""

from __future__ import annotations

import uuid

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from core.repository import owned_rows
from core.tables import Dataset


def by_ref(session: Session, owner: str, ref: str) -> Dataset | None:
    """The owner's upload whose id or name is ``ref``."""
    try:
        as_id: uuid.UUID | None = uuid.UUID(ref)
    except ValueError:
        as_id = None
    cond = Dataset.name == ref if as_id is None else or_(Dataset.id == as_id, Dataset.name == ref)
    return session.scalar(owned_rows(Dataset, owner).where(cond))


def name_taken(session: Session, owner: str, name: str) -> bool:
    """Whether the owner already has an upload named ``name``."""
    return session.scalar(select(Dataset.id).where(Dataset.owner == owner,
                                                   Dataset.name == name)) is not None
