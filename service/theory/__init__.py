"""The linear theory of adversarial vs natural distributional robustness (METRICS.md)."""

from service.theory.solver import (
    DUAL_NORM,
    LinearSetting,
    adversarial_loss,
    adversarial_risk,
    natural_risk,
    optimal_weights,
    solve,
)

__all__ = [
    "DUAL_NORM",
    "LinearSetting",
    "adversarial_loss",
    "adversarial_risk",
    "natural_risk",
    "optimal_weights",
    "solve",
]
