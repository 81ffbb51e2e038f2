"""Pure-Python metric formulas of METRICS.md, free of torch so any process can use them."""

from __future__ import annotations

from collections.abc import Sequence


def rfs(acc_fg: float, acc_bg: float) -> float:
    """Relative Foreground Sensitivity: ``(acc_bg - acc_fg) / (2 min(a, 1 - a))``.

    ``a`` is the mean of the two accuracies. Dividing by the largest gap that ``a`` allows
    makes models of different accuracy comparable, and maps the range onto [-1, 1]: +1 means
    only foreground noise hurts (core reliance), -1 only background noise hurts. At ``a`` in
    {0, 1} no gap is possible and RFS is 0 by definition.
    """
    for name, v in (("acc_fg", acc_fg), ("acc_bg", acc_bg)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be an accuracy in [0, 1], got {v!r}")
    a = (acc_fg + acc_bg) / 2
    denom = 2 * min(a, 1 - a)
    if denom <= 0.0:
        return 0.0
    return max(-1.0, min(1.0, (acc_bg - acc_fg) / denom))


def bg_gap(acc_mixed_same: float, acc_mixed_rand: float) -> float:
    """ImageNet-9's BG-gap: how much a background of the right class helps."""
    return acc_mixed_same - acc_mixed_rand


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
