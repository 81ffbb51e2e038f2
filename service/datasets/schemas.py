from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from contract.jobs import JobStatus
from service.http.pagination import Page
from service.jobs.schemas import Progress


@dataclass(frozen=True)
class Capabilities:
    """What a dataset can support, as the suite needs to know it."""

    name: str
    has_masks: bool
    has_groups: bool
    regenerable: bool  # a generated dataset that can be redrawn under another correlation
    default_eps: dict[str, float]


class IngestOut(BaseModel):
    """An upload's ingest: the job a worker runs to decode its archive."""

    id: uuid.UUID = Field(description="the ingest job's id")
    status: JobStatus = Field(description="`queued`, `running`, `succeeded`, `failed` or "
                                          "`cancelled`")
    progress: Progress = Field(description="how far the ingest has come (stages `reading`, "
                                           "`decoding`, `assembling`, `writing`, `storing`)")
    attempts: int = Field(description="how many times a worker has started the ingest")
    started_at: datetime | None = Field(description="when a worker started it (UTC)")
    finished_at: datetime | None = Field(description="when it reached a final state (UTC)")
    error: dict[str, Any] | None = Field(
        description="why it failed: the problem body the dataset's `error` repeats")


class DatasetOut(BaseModel):
    """An upload's shape fields are null until its ingest is ``ready``."""

    id: str = Field(description="the dataset's id: a built-in's name, or an upload's id")
    name: str = Field(description="the dataset's name")
    builtin: bool = Field(description="true for a dataset that ships with the service")
    status: str = Field("ready", description="`ingesting`, `ready` or `failed`; built-ins are "
                                             "always `ready`")
    error: dict[str, Any] | None = Field(
        None, description="the ingest's problem body (type, detail) when `failed`")
    num_classes: int | None = Field(description="the number of classes")
    input_shape: list[int] | None = Field(description="an image's shape, [channels, height, width]")
    num_examples: int | None = Field(description="the number of examples over all splits")
    splits: dict[str, int] = Field(description="examples per split, e.g. {\"test\": 1000}")
    has_masks: bool | None = Field(
        description="whether foreground masks come with the images (needed by `backgrounds` "
                    "and `fg_bg_noise`)")
    has_groups: bool | None = Field(
        description="whether examples carry group labels (needed for worst-group accuracy)")
    class_names: list[str] = Field(description="the classes' names, by label index")
    group_names: list[str] = Field(description="the groups' names, by group index")
    default_eps: dict[str, float] = Field(
        description="the default perturbation budget per norm (`l1`, `l2`, `linf`), in pixel "
                    "units of images scaled to [0, 1]")
    parameters: dict[str, Any] = Field(
        description="a built-in's generator parameters and their defaults (`dataset_params`)")
    layout: str | None = Field(
        description="the archive layout an upload was read as: `imagefolder`, `manifest`, "
                    "`imagenet9` or `waterbirds`; null for a built-in")
    sha256: str | None = Field(description="the uploaded archive's SHA-256, hex")
    description: str = Field(description="a one-line description of the dataset")
    warnings: list[str] = Field(description="what the ingest noticed but accepted")
    created_at: datetime | None = Field(description="when it was uploaded (UTC); null for a "
                                                    "built-in")
    finished_at: datetime | None = Field(None, description="when its ingest ended (UTC)")
    ingest: IngestOut | None = Field(
        None, description="an upload's ingest job (status, progress, attempts); null for a "
                          "built-in")


class DatasetList(Page[DatasetOut]):
    """The datasets you can evaluate on: the built-ins (on the first page) and your uploads,
    newest first."""
