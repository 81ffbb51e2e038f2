from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class DatasetOut(BaseModel):
    """An upload's shape fields are null until its ingest is ``ready``."""

    id: str
    name: str
    builtin: bool
    status: str = "ready"  # ingesting | ready | failed (built-ins are always ready)
    error: dict[str, Any] | None = None  # the ingest's problem body when ``failed``
    num_classes: int | None
    input_shape: list[int] | None
    num_examples: int | None
    splits: dict[str, int]
    has_masks: bool | None
    has_groups: bool | None
    class_names: list[str]
    group_names: list[str]
    default_eps: dict[str, float]
    parameters: dict[str, Any]
    layout: str | None
    sha256: str | None
    description: str
    warnings: list[str]
    created_at: datetime | None
    finished_at: datetime | None = None


class DatasetList(BaseModel):
    items: list[DatasetOut]
