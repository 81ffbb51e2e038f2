"""Per-owner quotas: jobs waiting or running, and bytes stored (checkpoints and datasets).

A request over a quota is a 429 with ``Retry-After``; nothing is created. Zero turns a quota
off (``ROBUSTSCOPE_QUOTA_ACTIVE_JOBS``, ``ROBUSTSCOPE_QUOTA_STORED_BYTES``).
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from contract.jobs import ACTIVE_STATES
from core.errors import QuotaExceeded
from core.repository import count_owned, owned_by
from core.settings import Settings
from core.tables import Dataset, Evaluation, Model, Training

ACTIVE = ACTIVE_STATES


def active_jobs(session: Session, owner: str) -> int:
    return (count_owned(session, Evaluation, owner, Evaluation.status.in_(ACTIVE))
            + count_owned(session, Training, owner, Training.status.in_(ACTIVE)))


def check_active_jobs(session: Session, owner: str, settings: Settings, adding: int = 1) -> None:
    limit = settings.quota_active_jobs
    if limit <= 0:
        return
    current = active_jobs(session, owner)
    if current + adding > limit:
        raise QuotaExceeded(
            f"you have {current} job(s) queued or running and this request adds {adding}; "
            f"the limit is {limit}; retry when some have finished",
            quota="active_jobs", limit=limit, current=current)


def stored_bytes(session: Session, owner: str) -> int:
    models = session.scalar(select(func.coalesce(func.sum(Model.size_bytes), 0))
                            .where(owned_by(Model, owner))) or 0
    datasets = session.scalar(select(func.coalesce(func.sum(Dataset.size_bytes), 0))
                              .where(owned_by(Dataset, owner))) or 0
    return int(models) + int(datasets)


def check_stored_bytes(session: Session, owner: str, settings: Settings, adding: int) -> None:
    limit = settings.quota_stored_bytes
    if limit <= 0:
        return
    current = stored_bytes(session, owner)
    if current + adding > limit:
        raise QuotaExceeded(
            f"you store {current} bytes and this upload adds {adding}; the limit is {limit}; "
            "delete models or datasets you no longer need",
            quota="stored_bytes", limit=limit, current=current)
