from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.evaluations.schemas import Progress
from service.evaluations.suite import Norm
from service.trainings.schemas import LrSchedule, Method, Optimizer

MAX_MODELS = 32
Eps = Annotated[float, Field(gt=0, le=1000)]


class SweepIn(BaseModel):
    """A grid over methods and threats; every other field is shared by all its trainings."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(min_length=1, max_length=200)
    dataset_params: dict[str, Any] = Field(default_factory=dict)
    architecture: str = Field(min_length=1, max_length=100)
    methods: list[Method] = Field(min_length=1, max_length=4)
    threats: dict[Norm, list[Eps]] = Field(default_factory=dict)
    # Left out: each method's defaults (service/trainings/defaults.py).
    steps: int | None = Field(None, ge=1, le=1000)
    epochs: int | None = Field(None, ge=1, le=1000)
    batch_size: int | None = Field(None, ge=2, le=4096)
    lr: float | None = Field(None, gt=0, le=10)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    suite: str | list[dict[str, Any]] | None = None
    optimizer: Optimizer | None = None
    lr_schedule: LrSchedule | None = None
    train_examples: int | None = Field(None, ge=2)
    eval_examples: int = Field(1000, ge=1, le=100_000)
    n_examples: int | None = Field(None, ge=1, le=10_000_000)  # of every evaluation

    @model_validator(mode="after")
    def _grid(self) -> SweepIn:
        if len(set(self.methods)) != len(self.methods):
            raise ValueError("methods must not repeat")
        for norm, values in self.threats.items():
            if not 1 <= len(values) <= 8 or len(set(values)) != len(values):
                raise ValueError(f"threats.{norm.value} takes 1 to 8 distinct eps values")
        if any(m is not Method.STANDARD for m in self.methods) and not self.threats:
            raise ValueError("adversarial methods need threats, e.g. {\"linf\": [0.0157, 0.0314]}")
        if len(self.grid()) > MAX_MODELS:
            raise ValueError(f"the grid has {len(self.grid())} models; at most {MAX_MODELS}")
        return self

    def grid(self) -> list[tuple[Method, Norm | None, float | None]]:
        """Each model of the sweep: standard once, every other method at every (norm, eps)."""
        out: list[tuple[Method, Norm | None, float | None]] = []
        for method in self.methods:
            if method is Method.STANDARD:
                out.append((method, None, None))
                continue
            out += [(method, norm, eps) for norm, values in self.threats.items()
                    for eps in values]
        return out


class SweepRow(BaseModel):
    """One model of the sweep: how it was trained and what its evaluation measured."""

    training_id: uuid.UUID
    method: str
    norm: str | None
    eps: float | None
    training_status: str
    model_id: uuid.UUID | None
    evaluation_id: uuid.UUID | None
    evaluation_status: str | None
    clean_accuracy: float | None
    robust_accuracy: dict[str, float]  # "<norm>:<eps>" -> robust accuracy
    bg_gap: float | None
    mixed_rand_accuracy: float | None
    rfs: float | None
    worst_group_accuracy: float | None = None
    degenerate: bool | None = None  # the degenerate_predictions check flagged the model
    name: str | None = None


class SweepOut(BaseModel):
    id: uuid.UUID
    status: str
    progress: Progress
    spec: dict[str, Any]
    training_ids: list[uuid.UUID]
    created_at: datetime
    table: list[SweepRow]


class SweepPage(BaseModel):
    items: list[SweepOut]
    next_cursor: str | None
