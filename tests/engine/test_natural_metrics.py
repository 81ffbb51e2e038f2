"""The torch-free metric formulas of METRICS.md."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.engine.benchmarks.natural.common import balanced_accuracy
from workers.engine.benchmarks.natural.metrics import bg_gap, rfs


@pytest.mark.parametrize(("acc_fg", "acc_bg", "expected"), [
    (0.6, 0.8, (0.8 - 0.6) / (2 * 0.3)),  # a = 0.7: denominator 2 (1 - a)
    (0.2, 0.4, (0.4 - 0.2) / (2 * 0.3)),  # a = 0.3: denominator 2 a
    (0.8, 0.6, -(0.8 - 0.6) / (2 * 0.3)),  # background reliance is negative
    (0.5, 0.5, 0.0),
    (0.0, 1.0, 1.0),  # a = 0.5, the largest possible gap
    (1.0, 0.0, -1.0),
    (1.0, 1.0, 0.0),  # a = 1: no gap possible, 0 by definition
    (0.0, 0.0, 0.0),  # a = 0
])
def test_rfs_formula(acc_fg: float, acc_bg: float, expected: float) -> None:
    assert rfs(acc_fg, acc_bg) == pytest.approx(expected, abs=1e-12)


@given(st.floats(0, 1), st.floats(0, 1))
def test_rfs_is_bounded_and_antisymmetric(acc_fg: float, acc_bg: float) -> None:
    r = rfs(acc_fg, acc_bg)
    assert -1.0 <= r <= 1.0
    assert rfs(acc_bg, acc_fg) == pytest.approx(-r, abs=1e-12)
    assert (r > 0) == (acc_bg > acc_fg and 0 < (acc_fg + acc_bg) / 2 < 1)


def test_rfs_refuses_non_accuracies() -> None:
    with pytest.raises(ValueError, match="acc_fg"):
        rfs(1.2, 0.5)


def test_bg_gap() -> None:
    assert bg_gap(0.862, 0.789) == pytest.approx(0.073)  # ImageNet-9's ResNet-50 reference


def test_balanced_accuracy_weights_classes_equally() -> None:
    import torch

    y = torch.tensor([0, 0, 0, 1])
    correct = torch.tensor([True, True, True, False])
    assert balanced_accuracy(correct, y) == pytest.approx(0.5)  # plain accuracy would be 0.75
