"""Group robustness (Waterbirds-style): average, per-group and worst-group accuracy."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from contract.suite import Groups
from workers.engine.benchmarks import register
from workers.engine.benchmarks.natural.common import argmax_on_device, batches, require
from workers.engine.types import BenchmarkError, BenchmarkResult, EvalData, MetricRow, RunContext

NAME = "groups"


def correct_flags(model: nn.Module, data: EvalData, ctx: RunContext, what: str) -> Tensor:
    ok = torch.zeros(len(data), dtype=torch.bool)
    for sl, done in batches(data, ctx):
        pred = argmax_on_device(model, data.x[sl].to(ctx.device), ctx)
        ok[sl] = (pred.cpu() == data.y[sl])
        ctx.progress(done, what)
    return ok


def group_rows(benchmark: str, ok: Tensor, groups: Tensor, names: list[str],
               extra: dict[str, Any]) -> list[MetricRow]:
    """``average_accuracy`` over examples, ``accuracy`` per non-empty group, and the minimum.

    An empty group has no accuracy; it is left out of the minimum rather than counted as 0.
    """
    rows = [MetricRow.share(benchmark, "average_accuracy", ok, extra)]
    worst: MetricRow | None = None
    for g, name in enumerate(names):
        sel = groups == g
        count = int(sel.sum())
        if count == 0:
            continue
        row = MetricRow.share(benchmark, "accuracy", ok[sel], {**extra, "group": name,
                                                               "n": count})
        rows.append(row)
        if worst is None or row.value < worst.value:
            worst = MetricRow.share(benchmark, "worst_group_accuracy", ok[sel],
                                    {**extra, "group": name})
    if worst is None:
        raise BenchmarkError(f"{benchmark}: no example belongs to any group")
    rows.append(worst)
    return rows


@register(NAME)
def groups_benchmark(model: nn.Module, data: EvalData, entry: Groups,
                     ctx: RunContext) -> BenchmarkResult:
    groups: Tensor = require(data, "groups", NAME)
    names = data.group_names or [str(g) for g in range(int(groups.max()) + 1)]
    if int(groups.max()) >= len(names) or int(groups.min()) < 0:
        raise BenchmarkError(f"{NAME}: group indices do not match group_names")
    ok = correct_flags(model, data, ctx, "group accuracy")
    return BenchmarkResult(rows=group_rows(NAME, ok, groups, names, {}))
