"""Clean top-1 accuracy, and the check that the model does not answer one class for everything."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from contract.suite import Clean
from workers.engine.benchmarks import register
from workers.engine.layout import in_layout
from workers.engine.types import BenchmarkResult, Check, EvalData, MetricRow, RunContext

DEGENERATE_SHARE = 0.95  # one class predicted for at least this share of the inputs


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, ctx: RunContext) -> Tensor:
    """Top-1 predictions for ``x`` (on the CPU), in batches on ``ctx.device``, in fp32.

    Reported accuracies are never computed under bf16: rounding could flip near-ties; the
    inputs are in the contiguous layout, whatever strides the caller's tensor has.
    """
    out = []
    for start in range(0, x.shape[0], ctx.batch_size):
        xb = x[start:start + ctx.batch_size].to(ctx.device, non_blocking=True)
        out.append(model(in_layout(xb)).argmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def degenerate_check(pred: Tensor, y: Tensor) -> Check:
    """Flags a model that predicts one class for (nearly) every input.

    Such a model's accuracy is the share of that class, and every attack "fails" on the
    examples it gets right, so its robust accuracy equals its clean accuracy while the other
    checks pass. Flagged when one class takes at least 95% of the predictions and at least
    5 points more than the most common label's share (a split that is itself 97% one class
    is not held against the model).
    """
    n = int(pred.numel())
    if n == 0:
        return Check("degenerate_predictions", True, "no examples")
    counts = torch.bincount(pred.cpu())
    top = int(counts.argmax())
    share = float(counts[top]) / n
    label_share = float(torch.bincount(y.cpu()).max()) / n
    flagged = share >= max(DEGENERATE_SHARE, label_share + 0.05)
    detail = (f"class {top} is predicted for {share:.1%} of {n} inputs (the most common label "
              f"is {label_share:.1%})")
    if flagged:
        detail += ": the model answers (nearly) one class, so its robust accuracy says nothing"
    return Check("degenerate_predictions", not flagged, detail,
                 {"top_class": top, "share": share, "label_share": label_share})


@register("clean")
def clean(model: nn.Module, data: EvalData, entry: Clean,
          ctx: RunContext) -> BenchmarkResult:
    n = len(data)
    preds = []
    for start in range(0, n, ctx.batch_size):
        preds.append(predict(model, data.x[start:start + ctx.batch_size], ctx))
        ctx.progress(min(1.0, (start + ctx.batch_size) / max(n, 1)), "clean accuracy")
    pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    return BenchmarkResult(rows=[MetricRow.share("clean", "accuracy", pred == data.y)],
                           checks=[degenerate_check(pred, data.y)])
