from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.evaluations.schemas import ErrorOut, Progress
from service.evaluations.suite import Norm


class Method(StrEnum):
    STANDARD = "standard"
    PGD = "pgd"
    FGSM_RS = "fgsm_rs"
    TRADES = "trades"


class Optimizer(StrEnum):
    SGD = "sgd"
    ADAM = "adam"


class LrSchedule(StrEnum):
    CONSTANT = "constant"
    COSINE = "cosine"


class ThreatIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    norm: Norm
    eps: float = Field(gt=0, le=1000)
    steps: int | None = Field(None, ge=1, le=1000)
    step_size: float | None = Field(None, gt=0, le=1000)


class TrainingIn(BaseModel):
    """The training spec (ARCHITECTURE.md, "Training spec") and a few optional extras."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(min_length=1, max_length=200)
    dataset_params: dict[str, Any] = Field(default_factory=dict)
    architecture: str = Field(min_length=1, max_length=100)
    method: Method
    threat: ThreatIn | None = None
    # Left out: the method's defaults (service/trainings/defaults.py).
    epochs: int | None = Field(None, ge=1, le=1000)
    batch_size: int | None = Field(None, ge=2, le=4096)
    lr: float | None = Field(None, gt=0, le=10)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    evaluate: str | list[dict[str, Any]] | None = None
    name: str | None = Field(None, min_length=1, max_length=200)
    optimizer: Optimizer | None = None
    lr_schedule: LrSchedule | None = None
    beta: float = Field(6.0, gt=0, le=100)
    train_examples: int | None = Field(None, ge=2)
    eval_examples: int = Field(1000, ge=1, le=100_000)
    n_examples: int | None = Field(None, ge=1, le=10_000_000)  # of the `evaluate` run

    @model_validator(mode="after")
    def _threat_fits_the_method(self) -> TrainingIn:
        if self.threat is None and self.method is not Method.STANDARD:
            raise ValueError(f"method {self.method.value!r} needs a threat "
                             "{norm, eps, steps?, step_size?}")
        if (self.method is Method.FGSM_RS and self.threat is not None
                and self.threat.steps not in (None, 1)):
            raise ValueError("fgsm_rs takes exactly one step; leave threat.steps out or set 1")
        if self.beta != 6.0 and self.method is not Method.TRADES:
            raise ValueError("beta applies to method 'trades' only")
        return self


class TrainingOut(BaseModel):
    id: uuid.UUID
    status: str
    progress: Progress
    name: str
    dataset: str
    dataset_params: dict[str, Any]
    held_out_split: str
    architecture: str
    method: str
    threat: dict[str, Any]
    epochs: int
    batch_size: int
    lr: float
    seed: int
    optimizer: str
    lr_schedule: str
    beta: float | None
    train_examples: int | None
    eval_examples: int
    n_examples: int | None = None
    evaluate: list[dict[str, Any]] | None
    history: list[dict[str, Any]]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    device: str | None
    engine_version: str | None
    error: ErrorOut | None
    model_id: uuid.UUID | None
    evaluation_id: uuid.UUID | None


class TrainingPage(BaseModel):
    items: list[TrainingOut]
    next_cursor: str | None
