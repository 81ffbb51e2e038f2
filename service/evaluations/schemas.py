from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.http.pagination import Page
from service.jobs.schemas import JobRecord

#: The most shards one evaluation may have.
MAX_SHARDS = 64


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
    shards: int | None = Field(
        None, ge=1, le=MAX_SHARDS,
        description="run the adversarial entries as this many jobs over slices of the "
                    "examples, on as many workers, merged exactly (the results are identical "
                    "to `1`); default: one per live worker while each gets at least "
                    "4 batches of examples, else 1 (docs/API.md, Shards)")


class ShardOut(BaseModel):
    """One shard of a sharded evaluation: a job over a slice of its examples."""

    index: int = Field(description="its place, 0 first")
    start: int = Field(description="the first example of the slice")
    stop: int = Field(description="one past its last example")
    status: str = Field(description="`queued`, `running`, `succeeded`, `failed` or `cancelled`")
    worker: str | None = Field(description="the worker that ran (or runs) it")
    attempts: int = Field(description="how many times a worker has started it")
    fraction: float = Field(description="the share of its work done, 0 to 1")


class EvaluationUpload(BaseModel):
    """``POST /evaluations`` as one multipart call: the checkpoint and the evaluation."""

    checkpoint: bytes = Field(
        description="the checkpoint file: safetensors, TorchScript or torch.export")
    spec: str = Field(
        description="JSON: the evaluation's fields with `model` (the model's metadata, as for "
                    "`POST /models`) in place of `model_id`")


class ResultOut(BaseModel):
    """One measured number."""

    benchmark: str = Field(description="the suite entry's benchmark, e.g. `clean`, `adversarial`")
    metric: str = Field(description="what was measured, e.g. `accuracy`, `robust_accuracy`")
    value: float = Field(description="the measured value; accuracies are fractions 0 to 1")
    params: dict[str, Any] = Field(
        description="the settings this value was measured at, e.g. {\"norm\": \"linf\", "
                    "\"eps\": 0.0314}")
    n: int | None = Field(
        None, description="for an accuracy (a share of examples): the examples it counts")
    interval: tuple[float, float] | None = Field(
        None, description="for an accuracy: its 95% Wilson score interval [low, high] "
                          "(docs/METRICS.md, Uncertainty)")


class EvaluationOut(JobRecord):
    """An evaluation job and, once it has run, its results."""

    model_id: uuid.UUID | None = Field(description="the evaluated model; null once deleted")
    model_name: str = Field(description="the model's name at upload")
    dataset: str = Field(description="the dataset's name (built-in) or id (uploaded)")
    dataset_params: dict[str, Any] = Field(description="a built-in's generator parameters")
    split: str = Field(description="the split measured on")
    suite: list[dict[str, Any]] = Field(description="the benchmark entries run, presets expanded")
    seed: int = Field(description="the seed of the attacks' random starts and any subset drawn")
    public: bool = Field(description="whether the results are listed on the public leaderboard")
    results: list[ResultOut] = Field(description="the measured numbers, one row each")
    checks: list[dict[str, Any]] = Field(
        description="sanity checks on the run (e.g. degenerate predictions), each with "
                    "`name`, `passed`, `detail` and the suite `entry` it ran with")
    timings: dict[str, float] = Field(
        description="seconds spent per suite entry, keyed `<index>:<benchmark>`")
    artifacts: list[str] = Field(
        description="names of files to fetch at `/evaluations/{id}/artifacts/{name}`")
    n_examples: int | None = Field(
        None, description="the number of examples measured on; null for the whole split")
    class_map: str | list[int] | None = Field(
        None, description="the model-to-dataset class map used, if any")
    shards: list[ShardOut] = Field(
        default_factory=list, description="a sharded evaluation's shards, in order; empty "
                                          "for an evaluation run as one job")


class EvaluationPage(Page[EvaluationOut]):
    """One page of evaluations, newest first."""
