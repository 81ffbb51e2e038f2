"""ImageNet-9 background variants (Xiao et al. 2020, "Noise or Signal").

Each image is re-composed from its object (mask ``m``) and a background: its own
(``original``), black (``only_fg``), its own with the object blacked out (``no_fg``), or a
*donor's* background (``mixed_same``: a donor of the same class; ``mixed_rand``: a donor drawn
uniformly from the other images). A donor must not bring its own object along, or
``mixed_rand`` would show two objects and measure something else. When the generator knows the
clean backgrounds (``data.backgrounds``) they are used as they are; otherwise the donor's object
box is filled by tiling the widest object-free strip of the same image, ImageNet-9's
``only_bg_t``, or blacked out when no such strip exists (``only_bg_b``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from contract.suite import Backgrounds
from workers.engine.benchmarks import register
from workers.engine.benchmarks.natural.common import argmax_on_device, batches, require
from workers.engine.benchmarks.natural.metrics import bg_gap
from workers.engine.types import BenchmarkResult, Check, EvalData, MetricRow, RunContext

NAME = "backgrounds"
VARIANTS = ("original", "only_fg", "no_fg", "mixed_same", "mixed_rand")
_DONOR_SALT = 0xB6


def tiled_background(x: Tensor, mask: Tensor) -> Tensor:
    """ImageNet-9's ``only_bg_t`` for one image [C, H, W] and its mask [1, H, W].

    The object's bounding box is overwritten by tiling the largest object-free strip
    (above, below, left or right of the box) across the image; with no such strip the box is
    blacked out. Everything outside the box is left as it was.
    """
    _, h, w = x.shape
    rows = torch.nonzero(mask[0].any(dim=1)).flatten()
    cols = torch.nonzero(mask[0].any(dim=0)).flatten()
    if rows.numel() == 0:
        return x.clone()
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    c0, c1 = int(cols[0]), int(cols[-1]) + 1
    strips = {  # name: (area, strip tensor, tile along height?)
        "top": (r0 * w, x[:, :r0, :], True),
        "bottom": ((h - r1) * w, x[:, r1:, :], True),
        "left": (c0 * h, x[:, :, :c0], False),
        "right": ((w - c1) * h, x[:, :, c1:], False),
    }
    area, strip, vertical = max(strips.values(), key=lambda s: s[0])
    out = x.clone()
    if area == 0:
        out[:, r0:r1, c0:c1] = 0
        return out
    if vertical:
        reps = -(-h // strip.shape[1])
        tiled = strip.repeat(1, reps, 1)[:, :h, :]
    else:
        reps = -(-w // strip.shape[2])
        tiled = strip.repeat(1, 1, reps)[:, :, :w]
    out[:, r0:r1, c0:c1] = tiled[:, r0:r1, c0:c1]
    return out


def donor_backgrounds(data: EvalData, masks: Tensor, index: Tensor) -> Tensor:
    """Object-free backgrounds of images ``index``, built per batch so that an upload of
    large images never needs a second full copy in memory."""
    if data.backgrounds is not None:
        return data.backgrounds[index]
    return torch.stack([tiled_background(data.x[int(i)], masks[int(i)]) for i in index])


def choose_donors(y: Tensor, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A same-class donor and a random donor per image, never the image itself when another
    exists; a pure function of (labels, seed), so every run of a job picks the same donors."""
    rng = np.random.default_rng([seed, _DONOR_SALT])
    labels = y.cpu().numpy()
    n = labels.shape[0]
    same = np.arange(n)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if idx.size > 1:  # offset 1..size-1 within the class: uniform over the others
            same[idx] = idx[(np.arange(idx.size) + rng.integers(1, idx.size, idx.size))
                            % idx.size]
    rand = (np.arange(n) + rng.integers(1, max(n, 2), n)) % n if n > 1 else np.arange(n)
    return same, rand


@register(NAME)
def backgrounds(model: nn.Module, data: EvalData, entry: Backgrounds,
                ctx: RunContext) -> BenchmarkResult:
    """Rows ``accuracy`` with ``params.variant`` for each variant, and ``bg_gap``."""
    masks: Tensor = require(data, "masks", NAME)
    how = ("exact (known to the generator)" if data.backgrounds is not None
           else "only_bg_t (object box filled by tiling background strips)")
    same, rand = choose_donors(data.y, ctx.seed)
    same_t, rand_t = torch.from_numpy(same), torch.from_numpy(rand)
    correct = {v: torch.zeros(len(data), dtype=torch.bool) for v in VARIANTS}
    n = len(data)
    for sl, done in batches(data, ctx):
        x = data.x[sl].to(ctx.device)
        m = masks[sl].to(ctx.device, x.dtype)
        y = data.y[sl].to(ctx.device)
        bg_same = donor_backgrounds(data, masks, same_t[sl]).to(ctx.device)
        bg_rand = donor_backgrounds(data, masks, rand_t[sl]).to(ctx.device)
        variants = {
            "original": x,
            "only_fg": x * m,
            "no_fg": x * (1 - m),
            "mixed_same": x * m + bg_same * (1 - m),
            "mixed_rand": x * m + bg_rand * (1 - m),
        }
        for v, xv in variants.items():
            correct[v][sl] = (argmax_on_device(model, xv, ctx) == y).cpu()
        ctx.progress(done, f"background variants {sl.stop}/{n}")
    rows = [MetricRow.share(NAME, "accuracy", correct[v], {"variant": v}) for v in VARIANTS]
    acc = {v: row.value for v, row in zip(VARIANTS, rows, strict=True)}
    rows.append(MetricRow(NAME, "bg_gap", bg_gap(acc["mixed_same"], acc["mixed_rand"]), {}))
    checks = [Check("donor_backgrounds", True, f"donor backgrounds: {how}")]
    # A split drawn with backgrounds independent of the class (Waterbirds' balanced test)
    # makes a same-class donor no better than a random one: BG-gap is 0 for every model.
    corr = getattr(data.source, "correlation", None)
    k = len(data.class_names)
    if corr is not None and k > 1 and abs(float(corr) - 1 / k) < 0.05:
        checks.append(Check(
            "bg_gap_informative", False,
            f"this split's backgrounds are independent of the class (P(match) = {corr:g}), so "
            "mixed_same equals mixed_rand in distribution and bg_gap is ~0 for any model; "
            "evaluate a split drawn with the training correlation (test_correlation)",
            {"correlation": float(corr)}))
    return BenchmarkResult(rows=rows, checks=checks)
