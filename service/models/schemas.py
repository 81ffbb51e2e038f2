from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.http.pagination import Page


class ModelMetadata(BaseModel):
    """The ``metadata`` JSON of an upload (docs/API.md, "Checkpoints")."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "name": "resnet18-pgd", "architecture": "resnet18", "num_classes": 10,
        "input_shape": [3, 32, 32], "mean": [0.4914, 0.4822, 0.4465],
        "std": [0.2471, 0.2435, 0.2616]}]})

    name: str = Field(min_length=1, max_length=200, description="a name for the model")
    architecture: str | None = Field(
        None, description="a built-in architecture's name; needed for a safetensors state dict, "
                          "ignored for TorchScript and torch.export")
    num_classes: int = Field(ge=2, le=100_000, description="the number of classes it predicts")
    input_shape: list[int] = Field(min_length=3, max_length=3,
                                   description="the input's shape, [channels, height, width]")
    mean: list[float] | None = Field(
        None, description="per-channel mean to normalize inputs by (images are in [0, 1]); "
                          "leave out if the model normalizes itself")
    std: list[float] | None = Field(None, description="per-channel standard deviation, with "
                                                      "`mean`; positive")
    class_names: list[str] | None = Field(None, description="the classes' names, by output index")

    @model_validator(mode="after")
    def _consistent(self) -> ModelMetadata:
        channels = self.input_shape[0]
        if any(d < 1 or d > 4096 for d in self.input_shape):
            raise ValueError("input_shape must be [channels, height, width] with sizes in 1..4096")
        for field_name in ("mean", "std"):
            values = getattr(self, field_name)
            if values is not None and len(values) != channels:
                raise ValueError(f"{field_name} needs {channels} values (one per input channel)")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise ValueError("std values must be positive")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names needs {self.num_classes} names (num_classes)")
        return self


class ModelOut(BaseModel):
    """An uploaded model."""

    id: uuid.UUID = Field(description="the model's id")
    name: str = Field(description="its name")
    format: str = Field(description="the checkpoint's format: `safetensors`, `torchscript` or "
                                    "`torch_export`")
    architecture: str | None = Field(description="the built-in architecture, for safetensors")
    num_classes: int = Field(description="the number of classes it predicts")
    input_shape: list[int] = Field(description="the input's shape, [channels, height, width]")
    mean: list[float] | None = Field(description="per-channel normalization mean, if any")
    std: list[float] | None = Field(description="per-channel normalization standard deviation")
    class_names: list[str] | None = Field(description="the classes' names, by output index")
    sha256: str = Field(description="the checkpoint's SHA-256, hex")
    size_bytes: int = Field(description="the checkpoint's size in bytes")
    created_at: datetime = Field(description="when it was uploaded (UTC)")


class ModelList(Page[ModelOut]):
    """One page of your models, newest first."""
