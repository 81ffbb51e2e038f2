"""Natural distributional robustness benchmarks (METRICS.md, "Natural / spurious axis").

Importing this package registers ``fg_bg_noise``, ``backgrounds``, ``groups``,
``corruptions`` and ``spurious_shift``.
"""

from workers.engine.benchmarks.natural import backgrounds, corruptions, fgbg, groups, shift
from workers.engine.benchmarks.natural.metrics import bg_gap, rfs

__all__ = ["backgrounds", "bg_gap", "corruptions", "fgbg", "groups", "rfs", "shift"]
