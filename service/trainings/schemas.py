from __future__ import annotations

import uuid
from typing import Any

from pydantic import Field

from contract.training import LrSchedule, Method, Optimizer, ThreatIn, TrainingIn
from service.http.pagination import Page
from service.jobs.schemas import JobRecord

__all__ = ["LrSchedule", "Method", "Optimizer", "ThreatIn", "TrainingIn",
           "TrainingOut", "TrainingPage"]


class TrainingOut(JobRecord):
    """A training job: its spec with defaults filled in, its history and what it produced."""

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
    model_id: uuid.UUID | None = Field(description="the trained model, once saved")
    evaluation_id: uuid.UUID | None = Field(description="the evaluation of the trained model, "
                                                        "if `evaluate` was given")


class TrainingPage(Page[TrainingOut]):
    """One page of trainings, newest first."""
