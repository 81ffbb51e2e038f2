from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from contract import training as contract
from contract.training import BETA, LrSchedule, Method, Optimizer, ThreatIn
from service.evaluations.schemas import ErrorOut, Progress
from service.pagination import Page

__all__ = ["COMMON", "LrSchedule", "Method", "Optimizer", "ThreatIn", "TrainingIn",
           "TrainingOut", "TrainingPage"]


COMMON = {
    "dataset": "a built-in dataset's name, or an uploaded one's id or name, to train on",
    "dataset_params": "a built-in's generator parameters, e.g. {\"correlation\": 0.8}",
    "architecture": "a built-in architecture's name, e.g. `resnet18`",
    "epochs": "passes over the training split (default: the method's)",
    "batch_size": "examples per step (default: the method's)",
    "lr": "the initial learning rate (default: the method's)",
    "seed": "fixes initialization, data order and attacks",
    "optimizer": "`sgd` or `adam` (default: the method's)",
    "lr_schedule": "`constant` or `cosine` (default: the method's)",
    "train_examples": "train on this many examples of the training split (default: all)",
    "eval_examples": "held-out examples the per-epoch history is measured on",
}


class TrainingIn(BaseModel):
    """The training spec (ARCHITECTURE.md, "Training spec") and a few optional extras."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "dataset": "shapes-32", "architecture": "resnet18", "method": "pgd",
        "threat": {"norm": "linf", "eps": 0.0314, "steps": 7}, "epochs": 10,
        "evaluate": "standard"}]})

    dataset: str = Field(min_length=1, max_length=200, description=COMMON["dataset"])
    dataset_params: dict[str, Any] = Field(default_factory=dict,
                                           description=COMMON["dataset_params"])
    architecture: str = Field(min_length=1, max_length=100, description=COMMON["architecture"])
    method: Method = Field(description="`standard`, `pgd`, `fgsm_rs` (fast FGSM with a random "
                                       "start) or `trades`")
    threat: ThreatIn | None = Field(None, description="what to train against; required unless "
                                                      "`method` is `standard`")
    # Left out: the method's defaults (contract/training.py).
    epochs: int | None = Field(None, ge=contract.EPOCHS_RANGE[0], le=contract.EPOCHS_RANGE[1],
                               description=COMMON["epochs"])
    batch_size: int | None = Field(None, ge=contract.BATCH_SIZE_RANGE[0],
                                   le=contract.BATCH_SIZE_RANGE[1],
                                   description=COMMON["batch_size"])
    lr: float | None = Field(None, gt=0, le=contract.LR_MAX, description=COMMON["lr"])
    seed: int = Field(0, ge=0, le=2**31 - 1, description=COMMON["seed"])
    evaluate: str | list[dict[str, Any]] | None = Field(
        None, description="a suite (preset name or entries) to evaluate the trained model with")
    name: str | None = Field(None, min_length=1, max_length=200,
                             description="a name for the trained model")
    optimizer: Optimizer | None = Field(None, description=COMMON["optimizer"])
    lr_schedule: LrSchedule | None = Field(None, description=COMMON["lr_schedule"])
    beta: float = Field(BETA, gt=0, le=contract.BETA_MAX,
                        description="TRADES' robustness weight; `trades` only")
    train_examples: int | None = Field(None, ge=2, description=COMMON["train_examples"])
    eval_examples: int = Field(1000, ge=1, le=100_000, description=COMMON["eval_examples"])
    n_examples: int | None = Field(None, ge=1, le=10_000_000,
                                   description="the `evaluate` run measures on this many examples")

    @model_validator(mode="after")
    def _threat_fits_the_method(self) -> TrainingIn:
        if self.threat is None and self.method is not Method.STANDARD:
            raise ValueError(f"method {self.method.value!r} needs a threat "
                             "{norm, eps, steps?, step_size?}")
        if (self.method is Method.FGSM_RS and self.threat is not None
                and self.threat.steps not in (None, 1)):
            raise ValueError("fgsm_rs takes exactly one step; leave threat.steps out or set 1")
        if self.beta != BETA and self.method is not Method.TRADES:
            raise ValueError("beta applies to method 'trades' only")
        return self


class TrainingOut(BaseModel):
    """A training job: its spec with defaults filled in, its history and what it produced."""

    id: uuid.UUID = Field(description="the training's id")
    status: str = Field(description="`queued`, `running`, `succeeded`, `failed` or `cancelled`")
    progress: Progress = Field(description="how far the job has come")
    name: str = Field(description="the trained model's name")
    dataset: str = Field(description="the dataset trained on")
    dataset_params: dict[str, Any] = Field(description="a built-in's generator parameters")
    held_out_split: str = Field(description="the split the history and evaluation measure on")
    architecture: str = Field(description="the architecture trained")
    method: str = Field(description="`standard`, `pgd`, `fgsm_rs` or `trades`")
    threat: dict[str, Any] = Field(description="the threat trained against (norm, eps, steps, "
                                               "step_size); empty for `standard`")
    epochs: int = Field(description="passes over the training split")
    batch_size: int = Field(description="examples per step")
    lr: float = Field(description="the initial learning rate")
    seed: int = Field(description="the seed")
    optimizer: str = Field(description="`sgd` or `adam`")
    lr_schedule: str = Field(description="`constant` or `cosine`")
    beta: float | None = Field(description="TRADES' robustness weight; null for other methods")
    train_examples: int | None = Field(description="examples trained on; null for all")
    eval_examples: int = Field(description="held-out examples the history is measured on")
    n_examples: int | None = Field(None, description="examples the `evaluate` run measures on")
    evaluate: list[dict[str, Any]] | None = Field(
        description="the suite the trained model is evaluated with; null for none")
    history: list[dict[str, Any]] = Field(
        description="one entry per epoch: `epoch`, `loss`, `train_accuracy`, "
                    "`clean_accuracy`, `robust_accuracy`, `lr`, `seconds`")
    created_at: datetime = Field(description="when the job was submitted (UTC)")
    started_at: datetime | None = Field(description="when a worker started it (UTC)")
    finished_at: datetime | None = Field(description="when it reached a final state (UTC)")
    attempts: int = Field(description="how many times a worker has started the job")
    device: str | None = Field(description="the device it ran on, e.g. `cpu`, `cuda:0`")
    engine_version: str | None = Field(description="the version of the engine that trained it")
    error: ErrorOut | None = Field(description="why it failed; null unless `failed`")
    model_id: uuid.UUID | None = Field(description="the trained model, once saved")
    evaluation_id: uuid.UUID | None = Field(description="the evaluation of the trained model, "
                                                        "if `evaluate` was given")


class TrainingPage(Page[TrainingOut]):
    """One page of trainings, newest first."""
