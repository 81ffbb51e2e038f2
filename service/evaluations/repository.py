"""Where an evaluation came from, for the links on its report: the training that queued it
and the sweep that training belongs to (both the owner's)."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.tables import Sweep, Training


def origin(session: Session, owner: str,
           evaluation_id: uuid.UUID) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    training = session.scalar(select(Training.id).where(
        Training.owner == owner, Training.evaluation_id == evaluation_id))
    if training is None:
        return None, None
    for sweep_id, ids in session.execute(select(Sweep.id, Sweep.training_ids)
                                         .where(Sweep.owner == owner)):
        if str(training) in ids:
            return training, sweep_id
    return training, None
