from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelMetadata(BaseModel):
    """The ``metadata`` JSON of an upload (ARCHITECTURE.md, "Model checkpoints")."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    architecture: str | None = None
    num_classes: int = Field(ge=2, le=100_000)
    input_shape: list[int] = Field(min_length=3, max_length=3)
    mean: list[float] | None = None
    std: list[float] | None = None
    class_names: list[str] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ModelMetadata:
        channels = self.input_shape[0]
        if any(d < 1 or d > 4096 for d in self.input_shape):
            raise ValueError("input_shape must be [channels, height, width] with sizes in 1..4096")
        for field_name in ("mean", "std"):
            values = getattr(self, field_name)
            if values is not None and len(values) != channels:
                raise ValueError(f"{field_name} needs {channels} values (one per input channel)")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise ValueError("std values must be positive")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names needs {self.num_classes} names (num_classes)")
        return self


class ModelOut(BaseModel):
    id: uuid.UUID
    name: str
    format: str
    architecture: str | None
    num_classes: int
    input_shape: list[int]
    mean: list[float] | None
    std: list[float] | None
    class_names: list[str] | None
    sha256: str
    size_bytes: int
    created_at: datetime


class ModelList(BaseModel):
    items: list[ModelOut]
    next_cursor: str | None = None
