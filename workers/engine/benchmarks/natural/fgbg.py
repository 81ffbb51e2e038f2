"""Foreground / background noise and RFS (RIVAL10, Salient ImageNet).

The same Gaussian draw ``n`` is used for the object and the background version of an image
(``x + s n m`` and ``x + s n (1 - m)``): the two accuracies then differ only in *where* the
noise lands, which halves the variance of their difference, the quantity RFS is made of.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from contract.suite import SIGMA_GRID, FgBgNoise
from workers.engine.benchmarks import register
from workers.engine.benchmarks.natural.common import (
    argmax_on_device,
    balanced_accuracy,
    batches,
    require,
)
from workers.engine.benchmarks.natural.metrics import mean, rfs
from workers.engine.types import BenchmarkResult, EvalData, MetricRow, RunContext

NAME = "fg_bg_noise"


@register(NAME)
def fg_bg_noise(model: nn.Module, data: EvalData, entry: FgBgNoise,
                ctx: RunContext) -> BenchmarkResult:
    """Rows per sigma (``params.sigma``) and their mean over the grid (``sigma: "mean"``).

    Options: ``sigmas`` (a list, default the six-value grid), ``trials`` (3).
    """
    masks: Tensor = require(data, "masks", NAME)
    sigmas = list(SIGMA_GRID if entry.sigmas is None else entry.sigmas)
    trials = entry.trials
    n = len(data)
    fg_ok = torch.zeros(len(sigmas), trials, n, dtype=torch.bool)
    bg_ok = torch.zeros_like(fg_ok)
    gens = [[ctx.generator(salt=7919 * (i + 1) + t) for t in range(trials)]
            for i in range(len(sigmas))]
    for sl, done in batches(data, ctx):
        x = data.x[sl].to(ctx.device)
        m = masks[sl].to(ctx.device, x.dtype)
        y = data.y[sl].to(ctx.device)
        for i, sigma in enumerate(sigmas):
            for t in range(trials):
                noise = torch.randn(x.shape, generator=gens[i][t], device=ctx.device,
                                    dtype=x.dtype).mul_(sigma)
                x_fg = (x + noise * m).clamp_(0, 1)
                x_bg = (x + noise * (1 - m)).clamp_(0, 1)
                fg_ok[i, t, sl] = (argmax_on_device(model, x_fg, ctx) == y).cpu()
                bg_ok[i, t, sl] = (argmax_on_device(model, x_bg, ctx) == y).cpu()
        ctx.progress(done, f"foreground/background noise {sl.stop}/{n}")

    result = BenchmarkResult()
    accs_fg, accs_bg, rfss = [], [], []
    for i, sigma in enumerate(sigmas):
        acc_fg = mean([balanced_accuracy(fg_ok[i, t], data.y) for t in range(trials)])
        acc_bg = mean([balanced_accuracy(bg_ok[i, t], data.y) for t in range(trials)])
        r = rfs(acc_fg, acc_bg)
        accs_fg.append(acc_fg)
        accs_bg.append(acc_bg)
        rfss.append(r)
        p = {"sigma": sigma, "trials": trials}
        result.rows += [MetricRow(NAME, "fg_noise_accuracy", acc_fg, p),
                        MetricRow(NAME, "bg_noise_accuracy", acc_bg, p),
                        MetricRow(NAME, "rfs", r, p)]
    p_mean = {"sigma": "mean", "sigmas": sigmas, "trials": trials}
    result.rows += [MetricRow(NAME, "fg_noise_accuracy", mean(accs_fg), p_mean),
                    MetricRow(NAME, "bg_noise_accuracy", mean(accs_bg), p_mean),
                    MetricRow(NAME, "rfs", mean(rfss), p_mean)]
    return result
