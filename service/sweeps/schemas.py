from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from contract.training import MAX_MODELS, SweepIn
from service.http.pagination import Page
from service.jobs.schemas import Progress

__all__ = ["MAX_MODELS", "SweepIn", "SweepOut", "SweepPage", "SweepRow"]


class SweepRow(BaseModel):
    """One model of the sweep: how it was trained and what its evaluation measured."""

    training_id: uuid.UUID = Field(description="the model's training")
    method: str = Field(description="the training method")
    norm: str | None = Field(description="the threat norm trained against; null for `standard`")
    eps: float | None = Field(description="the budget trained at; null for `standard`")
    training_status: str = Field(description="the training's status")
    model_id: uuid.UUID | None = Field(description="the trained model, once saved")
    evaluation_id: uuid.UUID | None = Field(description="the model's evaluation, once submitted")
    evaluation_status: str | None = Field(description="the evaluation's status")
    clean_accuracy: float | None = Field(description="accuracy on unperturbed inputs, 0 to 1")
    robust_accuracy: dict[str, float] = Field(
        description="robust accuracy (0 to 1) per threat, keyed `<norm>:<eps>`")
    zero_gradient_fraction: dict[str, float] = Field(
        default_factory=dict,
        description="per norm, the fraction (0 to 1) of clean-correct examples where the "
                    "model's input gradient is zero or not finite, so the attack could not "
                    "start: robust accuracy resting on them is gradient masking")
    bg_gap: float | None = Field(
        description="the background gap: accuracy with a background from the same class minus "
                    "with a random one (`mixed_same` - `mixed_rand`)")
    mixed_rand_accuracy: float | None = Field(
        description="accuracy with backgrounds swapped at random, 0 to 1")
    rfs: float | None = Field(
        description="relative foreground sensitivity at the mean noise level, -1 to 1; +1: only "
                    "foreground noise hurts (relies on the object), -1: only background noise")
    worst_group_accuracy: float | None = Field(None, description="the lowest per-group accuracy")
    intervals: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="the 95% Wilson interval [low, high] of each accuracy above, keyed by its "
                    "field (`clean_accuracy`, `mixed_rand_accuracy`, `worst_group_accuracy`) "
                    "or `robust_accuracy:<norm>:<eps>`; absent for values stored without a count")
    degenerate: bool | None = Field(
        None, description="true if the model's predictions were flagged degenerate (nearly "
                          "one class)")
    name: str | None = Field(None, description="the trained model's name")
    failed_checks: list[str] = Field(
        default_factory=list, description="the names of the evaluation's failed sanity checks "
                                          "(`degenerate_predictions`, …); empty when all passed")


class SweepOut(BaseModel):
    """A sweep: its trainings and a table of their results."""

    id: uuid.UUID = Field(description="the sweep's id")
    status: str = Field(description="`queued`, `running`, `succeeded`, `failed` or `cancelled`")
    progress: Progress = Field(description="how far the sweep has come")
    spec: dict[str, Any] = Field(description="the sweep as submitted (`SweepIn`)")
    training_ids: list[uuid.UUID] = Field(description="its trainings, one per model")
    created_at: datetime = Field(description="when it was submitted (UTC)")
    table: list[SweepRow] = Field(description="one row per model of the grid")


class SweepPage(Page[SweepOut]):
    """One page of sweeps, newest first."""
