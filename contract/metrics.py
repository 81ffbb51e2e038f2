"""The metrics each benchmark reports, and which direction is better."""

from __future__ import annotations

BENCHMARK_METRICS: dict[str, frozenset[str]] = {
    "clean": frozenset({"accuracy"}),
    "adversarial": frozenset({"clean_accuracy", "robust_accuracy", "robust_accuracy_after",
                              "forward_passes", "backward_passes", "attack_seconds",
                              "audit_missed", "audit_bound", "zero_gradient_fraction"}),
    "robustness_curve": frozenset({"robust_accuracy", "median_min_norm", "curve_area"}),
    "fg_bg_noise": frozenset({"fg_noise_accuracy", "bg_noise_accuracy", "rfs"}),
    "backgrounds": frozenset({"accuracy", "bg_gap"}),
    "groups": frozenset({"accuracy", "average_accuracy", "worst_group_accuracy"}),
    "corruptions": frozenset({"accuracy", "mean_accuracy"}),
    "spurious_shift": frozenset({"accuracy", "average_accuracy", "worst_group_accuracy"}),
}

LOWER_IS_BETTER = frozenset({"bg_gap", "forward_passes", "backward_passes", "attack_seconds",
                             "audit_missed", "audit_bound", "zero_gradient_fraction"})
"""Metrics where smaller is better; every other metric ranks descending."""
