"""What every kind of job's submission does the same way after its create."""

from __future__ import annotations

from sqlalchemy.orm import Session

from core.jobs import Created
from core.quotas import check_active_jobs
from core.settings import Settings


def within_quota(session: Session, owner: str, settings: Settings,
                 made: tuple[Created, bool]) -> tuple[Created, bool]:
    """A create's ``(row, created)`` once the active-jobs quota allows it: checked after the
    create, in its transaction, so a refusal (429) rolls the new jobs back; a replay of an
    earlier request is never refused."""
    if made[1]:
        check_active_jobs(session, owner, settings, 0)
    return made
