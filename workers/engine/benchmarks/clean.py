"""Clean top-1 accuracy."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from workers.engine.benchmarks import register
from workers.engine.types import BenchmarkResult, EvalData, MetricRow, RunContext


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, ctx: RunContext) -> Tensor:
    """Top-1 predictions for ``x`` (on the CPU), in batches on ``ctx.device``, in fp32.

    Reported accuracies are never computed under bf16: rounding could flip near-ties.
    """
    out = []
    for start in range(0, x.shape[0], ctx.batch_size):
        xb = x[start:start + ctx.batch_size].to(ctx.device, non_blocking=True)
        out.append(model(xb).argmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


@register("clean")
def clean(model: nn.Module, data: EvalData, params: dict[str, Any],
          ctx: RunContext) -> BenchmarkResult:
    correct = 0
    n = len(data)
    for start in range(0, n, ctx.batch_size):
        sl = slice(start, start + ctx.batch_size)
        correct += int((predict(model, data.x[sl], ctx) == data.y[sl]).sum())
        ctx.progress(min(1.0, (start + ctx.batch_size) / max(n, 1)), "clean accuracy")
    return BenchmarkResult(rows=[MetricRow("clean", "accuracy", correct / max(n, 1))])
