from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class DatasetOut(BaseModel):
    id: str
    name: str
    builtin: bool
    num_classes: int
    input_shape: list[int]
    num_examples: int
    splits: dict[str, int]
    has_masks: bool
    has_groups: bool
    class_names: list[str]
    group_names: list[str]
    default_eps: dict[str, float]
    parameters: dict[str, Any]
    layout: str | None
    sha256: str | None
    description: str
    warnings: list[str]
    created_at: datetime | None


class DatasetList(BaseModel):
    items: list[DatasetOut]
