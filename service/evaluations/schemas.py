from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class EvaluationIn(BaseModel):
    """An evaluation of an uploaded model (``POST /evaluations`` as JSON)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "model_id": "2d65c0de-3f0a-4c55-9d7e-0b2f1c9a7e11", "dataset": "shapes-32",
        "suite": [{"benchmark": "clean"},
                  {"benchmark": "adversarial", "attack": "apgd-ce", "norm": "linf",
                   "eps": [0.0078, 0.0314]}]}]})

    model_id: uuid.UUID = Field(description="the model to evaluate (`POST /models`)")
    dataset: str = Field(min_length=1, max_length=200,
                         description="a built-in dataset's name, or an uploaded one's id or name")
    dataset_params: dict[str, Any] = Field(
        default_factory=dict,
        description="a built-in's generator parameters, e.g. {\"correlation\": 0.8}")
    split: str | None = Field(None, max_length=32,
                              description="the split to measure on (default `test`)")
    suite: str | list[dict[str, Any]] = Field(
        description="a preset name (`standard`, `efficient`) or a list of benchmark entries "
                    "(docs/API.md, Suites)")
    seed: int = Field(0, ge=0, le=2**31 - 1,
                      description="fixes the attacks' random starts and any subset drawn")
    public: bool = Field(False, description="list the results on the public leaderboard")
    webhook_url: str | None = Field(
        None, pattern=r"^https?://", max_length=2000,
        description="POSTed the job record (Standard Webhooks signature) at a final state")
    n_examples: int | None = Field(
        None, ge=1, le=10_000_000,
        description="measure on this many examples of the split, drawn from `seed`")
    class_map: str | list[int] | None = Field(
        None, description="for a model whose classes are not the dataset's: per model class "
                          "the dataset class it counts as (or -1), or `imagenet9`")


class EvaluationUpload(BaseModel):
    """``POST /evaluations`` as one multipart call: the checkpoint and the evaluation."""

    checkpoint: bytes = Field(
        description="the checkpoint file: safetensors, TorchScript or torch.export")
    spec: str = Field(
        description="JSON: the evaluation's fields with `model` (the model's metadata, as for "
                    "`POST /models`) in place of `model_id`")


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
