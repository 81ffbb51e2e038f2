from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class EvaluationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_id: uuid.UUID
    dataset: str = Field(min_length=1, max_length=200)
    dataset_params: dict[str, Any] = Field(default_factory=dict)
    split: str | None = Field(None, max_length=32)
    suite: str | list[dict[str, Any]]
    seed: int = Field(0, ge=0, le=2**31 - 1)
    public: bool = False
    webhook_url: str | None = Field(None, pattern=r"^https?://", max_length=2000)
    n_examples: int | None = Field(None, ge=1, le=10_000_000)
    class_map: str | list[int] | None = None


class Progress(BaseModel):
    fraction: float
    stage: str
    message: str


class ErrorOut(BaseModel):
    type: str
    detail: str


class ResultOut(BaseModel):
    benchmark: str
    metric: str
    value: float
    params: dict[str, Any]


class EvaluationOut(BaseModel):
    id: uuid.UUID
    status: str
    progress: Progress
    model_id: uuid.UUID | None
    model_name: str
    dataset: str
    dataset_params: dict[str, Any]
    split: str
    suite: list[dict[str, Any]]
    seed: int
    public: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    device: str | None
    engine_version: str | None
    error: ErrorOut | None
    results: list[ResultOut]
    checks: list[dict[str, Any]]
    timings: dict[str, float]
    artifacts: list[str]
    n_examples: int | None = None
    class_map: str | list[int] | None = None


class EvaluationPage(BaseModel):
    items: list[EvaluationOut]
    next_cursor: str | None
