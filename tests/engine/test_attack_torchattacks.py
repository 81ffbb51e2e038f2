"""Our attacks against torchattacks 3.5.1 on the same small CNN, examples, eps and budgets.

The CNN is adversarially trained for a few seconds on a synthetic 10-class task so that its
robust accuracy at eps is neither 0 nor 1 (otherwise any attack "matches"). Ours must be at
most torchattacks' robust accuracy + 0.5 points.
"""

from __future__ import annotations

import pytest
import torch
import torchattacks
from torch import Tensor, nn

from tests.engine.attack_helpers import (  # noqa: F401  (one_thread is an autouse fixture)
    TinyCNN,
    one_thread,
    template_data,
    train,
)
from workers.engine.attacks import APGD, PGD, Forward
from workers.engine.runner import autoattack_stages, run_cascade
from workers.engine.threats import Norm
from workers.engine.types import RunContext

pytestmark = pytest.mark.slow

EPS = 0.04
N = 200
TOLERANCE = 0.005


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, Tensor, Tensor]:
    torch.set_num_threads(1)
    x, y = template_data(1200, classes=10, shape=(1, 16, 16), noise=0.22, seed=3)
    torch.manual_seed(0)  # parameter init of the test model only
    model = train(TinyCNN(1, 10, 8), x[:1000], y[:1000], steps=250, adv_eps=EPS / 2)
    return model, x[1000:1000 + N], y[1000:1000 + N]


def _robust(model: nn.Module, x_adv: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean())


def _check(ours: float, ref: float, clean: float) -> None:
    assert 0.05 < ref < clean - 0.05, f"degenerate setup: ref {ref}, clean {clean}"
    assert ours <= ref + TOLERANCE, f"ours {ours:.3f} weaker than torchattacks {ref:.3f}"


def _clean(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return _robust(model, x, y)


def test_pgd10_matches_or_beats_torchattacks(setup: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = setup
    ours = PGD(Norm.LINF, steps=10, step_size=EPS / 4).run(
        Forward(model, channels_last=True), x, y, EPS, torch.Generator().manual_seed(0))
    ref = torchattacks.PGD(model, eps=EPS, alpha=EPS / 4, steps=10, random_start=True)(x, y)
    _check(_robust(model, ours.x_adv, y), _robust(model, ref, y), _clean(model, x, y))


def test_apgd_ce_matches_or_beats_torchattacks(setup: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = setup
    ours = APGD(Norm.LINF, steps=25).run(Forward(model, channels_last=True), x, y, EPS,
                                         torch.Generator().manual_seed(0))
    ref = torchattacks.APGD(model, norm="Linf", eps=EPS, steps=25, loss="ce", seed=0)(x, y)
    _check(_robust(model, ours.x_adv, y), _robust(model, ref, y), _clean(model, x, y))


def test_autoattack_cascade_matches_or_beats_torchattacks(
        setup: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = setup
    steps, queries = 10, 150
    res = run_cascade(model, x, y, Norm.LINF, EPS,
                      autoattack_stages(Norm.LINF, 10, steps=steps, square_queries=queries),
                      RunContext())
    ref_attack = torchattacks.MultiAttack([
        torchattacks.APGD(model, norm="Linf", eps=EPS, steps=steps, loss="ce", seed=0),
        torchattacks.APGDT(model, norm="Linf", eps=EPS, steps=steps, n_classes=10, seed=0),
        torchattacks.FAB(model, norm="Linf", eps=EPS, steps=steps, multi_targeted=True,
                         n_classes=10, seed=0),
        torchattacks.Square(model, norm="Linf", eps=EPS, n_queries=queries, seed=0),
    ])
    ref = ref_attack(x, y)
    _check(res.robust_accuracy, _robust(model, ref, y), _clean(model, x, y))
