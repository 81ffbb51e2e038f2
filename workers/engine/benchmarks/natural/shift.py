"""Accuracy under a shift of the spurious correlation (built-in generated data).

The dataset's source redraws the evaluated split with the spurious attribute's agreement with
the label set to the train-time value (``kept``), to chance (``removed``: 1/K, independent of
the label) and to its mirror image (``reversed``: 1 - train value; for two classes this swaps
the attribute's meaning). Built-in sources keep every object and pose across redraws, so the
three accuracies differ only through the spurious feature.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from contract.suite import SpuriousShift
from workers.engine.benchmarks import register
from workers.engine.benchmarks.natural.common import require
from workers.engine.benchmarks.natural.groups import correct_flags, group_rows
from workers.engine.types import (
    BenchmarkError,
    BenchmarkResult,
    DatasetSource,
    EvalData,
    MetricRow,
    RunContext,
)

NAME = "spurious_shift"


def shift_levels(source: DatasetSource, entry: SpuriousShift,
                 num_classes: int) -> dict[str, float]:
    """The entry's levels, each defaulted from the source (see the module doc)."""
    train = entry.correlation
    if train is None:
        train = getattr(source, "train_correlation", None)
    if train is None:
        raise BenchmarkError(f"{NAME}: the dataset does not say its train-time correlation; "
                             "pass correlation")
    return {"kept": float(train),
            "removed": entry.removed if entry.removed is not None else 1.0 / num_classes,
            "reversed": (entry.reversed if entry.reversed is not None
                         else round(1.0 - float(train), 12))}


@register(NAME)
def spurious_shift(model: nn.Module, data: EvalData, entry: SpuriousShift,
                   ctx: RunContext) -> BenchmarkResult:
    """Rows ``accuracy`` and ``worst_group_accuracy`` with ``params.shift`` in
    {kept, removed, reversed} and the ``correlation`` used.

    Options: ``correlation`` (train-time value, default the source's), ``removed``,
    ``reversed`` (defaults 1/K and 1 - correlation), ``split`` (default "test").
    """
    source: DatasetSource = require(data, "source", NAME)
    k = int(getattr(source, "num_classes", len(data.class_names)))
    levels = shift_levels(source, entry, k)
    split = entry.split or "test"
    rows: list[MetricRow] = []
    for i, (shift, corr) in enumerate(levels.items()):
        try:
            shifted = source.with_correlation(corr, split)
        except ValueError as exc:
            raise BenchmarkError(f"{NAME}: cannot redraw the dataset: {exc}") from exc

        def progress(fraction: float, message: str, i: int = i, shift: str = shift) -> None:
            ctx.progress((i + fraction) / len(levels), f"{shift} correlation: {message}")

        ok = correct_flags(model, shifted, replace(ctx, progress=progress), "accuracy")
        extra = {"shift": shift, "correlation": corr}
        rows.append(MetricRow.share(NAME, "accuracy", ok, extra))
        if shifted.groups is not None and shifted.group_names:
            rows += [r for r in group_rows(NAME, ok, shifted.groups, shifted.group_names, extra)
                     if r.metric == "worst_group_accuracy"]
    return BenchmarkResult(rows=rows)
