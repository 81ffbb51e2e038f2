"""What an evaluation measures beyond its suite: a seeded subset of the split
(``n_examples``) and a model whose classes are mapped onto the dataset's (``class_map``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from workers.engine.data import seeded_subset
from workers.engine.models import ClassMapped, resolve_class_map
from workers.engine.types import EvalData


def scoped(model: nn.Module, data: EvalData, *, n_examples: int | None,
           class_map: str | Sequence[int] | None, seed: int,
           device: torch.device | str = "cpu") -> tuple[nn.Module, EvalData]:
    """The model and data the suite runs on: the model's logits mapped onto the dataset's
    classes when a map is given, and ``n_examples`` of the split drawn from ``seed``."""
    if class_map is not None:
        mapped = ClassMapped(model, resolve_class_map(class_map), len(data.class_names))
        model = mapped.to(device).eval()
    return model, seeded_subset(data, n_examples, seed)
