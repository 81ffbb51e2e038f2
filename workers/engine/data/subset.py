"""A fixed, seeded subset of a split, so a quick run measures the same examples every time.

The subset is drawn without replacement by a local generator seeded from ``seed`` (never the
global RNG) and kept in the split's own order, so the same ``(n, seed)`` on the same split
always picks the same examples, and a smaller ``n`` is not a prefix of a larger one's draw
in general (each is a uniform sample of the split).
"""

from __future__ import annotations

import torch

from workers.engine.types import EvalData


def seeded_subset(data: EvalData, n: int | None, seed: int) -> EvalData:
    """``n`` examples of ``data`` drawn uniformly without replacement; all of it when ``n``
    is None or at least the split's size."""
    if n is None or n >= len(data):
        return data
    if n < 1:
        raise ValueError(f"n_examples must be positive, got {n}")
    g = torch.Generator().manual_seed(seed * 7_919 + 104_729)
    index = torch.randperm(len(data), generator=g)[:n].sort().values
    return data.subset(index)
