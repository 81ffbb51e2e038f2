"""Helpers shared by the natural-robustness benchmarks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from workers.engine.layout import in_layout
from workers.engine.types import BenchmarkError, EvalData, RunContext


@torch.no_grad()
def argmax_on_device(model: nn.Module, x: Tensor, ctx: RunContext) -> Tensor:
    """Top-1 predictions for an on-device batch, chunked by ``ctx.batch_size``, in fp32
    (reported accuracies never go through bf16 rounding)."""
    out = []
    for start in range(0, x.shape[0], ctx.batch_size):
        out.append(model(in_layout(x[start:start + ctx.batch_size])).argmax(1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=x.device)


def batches(data: EvalData, ctx: RunContext) -> Iterator[tuple[slice, float]]:
    """Batch slices with the fraction of the data done after each."""
    n = len(data)
    for start in range(0, n, ctx.batch_size):
        stop = min(n, start + ctx.batch_size)
        yield slice(start, stop), stop / n


def balanced_accuracy(correct: Tensor, y: Tensor) -> float:
    """Mean over the classes present of per-class accuracy (RIVAL10's class-balanced score)."""
    correct, y = correct.float().cpu(), y.cpu()
    classes = torch.unique(y)
    return float(torch.stack([correct[y == c].mean() for c in classes]).mean())


def require(data: EvalData, what: str, benchmark: str) -> Any:
    value = getattr(data, what)
    if value is None:
        hint = {"masks": "foreground masks (upload masks, or use a built-in such as waterbirds-32)",
                "groups": "group labels (upload a group column, or use a built-in)",
                "source": "a generated dataset that can be redrawn at another spurious "
                          "correlation (a built-in such as waterbirds-32)"}[what]
        raise BenchmarkError(f"{benchmark} needs {hint}; dataset {data.name or '?'} has none")
    return value
