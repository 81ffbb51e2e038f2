from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from contract import training as contract
from contract.attacks import Norm
from contract.training import Eps, LrSchedule, Method, Optimizer
from service.evaluations.schemas import Progress
from service.pagination import Page
from service.trainings.schemas import COMMON

MAX_MODELS = 32


class SweepIn(BaseModel):
    """A grid over methods and threats; every other field is shared by all its trainings."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "dataset": "shapes-32", "architecture": "resnet18", "methods": ["standard", "pgd"],
        "threats": {"linf": [0.0157, 0.0314]}, "epochs": 5, "suite": "standard"}]})

    dataset: str = Field(min_length=1, max_length=200, description=COMMON["dataset"])
    dataset_params: dict[str, Any] = Field(default_factory=dict,
                                           description=COMMON["dataset_params"])
    architecture: str = Field(min_length=1, max_length=100, description=COMMON["architecture"])
    methods: list[Method] = Field(min_length=1, max_length=4,
                                  description="training methods, each once: `standard`, `pgd`, "
                                              "`fgsm_rs`, `trades`")
    threats: dict[Norm, list[Eps]] = Field(
        default_factory=dict,
        description="per norm (`l1`, `l2`, `linf`) 1 to 8 budgets; every non-standard method "
                    "trains once at each")
    # Left out: each method's defaults (contract/training.py).
    steps: int | None = Field(None, ge=contract.THREAT_STEPS[0], le=contract.THREAT_STEPS[1],
                              description="attack steps per batch (default: each method's)")
    epochs: int | None = Field(None, ge=contract.EPOCHS_RANGE[0], le=contract.EPOCHS_RANGE[1],
                               description=COMMON["epochs"])
    batch_size: int | None = Field(None, ge=contract.BATCH_SIZE_RANGE[0],
                                   le=contract.BATCH_SIZE_RANGE[1],
                                   description=COMMON["batch_size"])
    lr: float | None = Field(None, gt=0, le=contract.LR_MAX, description=COMMON["lr"])
    seed: int = Field(0, ge=0, le=2**31 - 1, description=COMMON["seed"])
    suite: str | list[dict[str, Any]] | None = Field(
        None, description="the suite (preset name or entries) every trained model is evaluated "
                          "with")
    optimizer: Optimizer | None = Field(None, description=COMMON["optimizer"])
    lr_schedule: LrSchedule | None = Field(None, description=COMMON["lr_schedule"])
    train_examples: int | None = Field(None, ge=2, description=COMMON["train_examples"])
    eval_examples: int = Field(1000, ge=1, le=100_000, description=COMMON["eval_examples"])
    n_examples: int | None = Field(None, ge=1, le=10_000_000,
                                   description="every evaluation measures on this many examples")

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
    degenerate: bool | None = Field(
        None, description="true if the model's predictions were flagged degenerate (nearly "
                          "one class)")
    name: str | None = Field(None, description="the trained model's name")


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
