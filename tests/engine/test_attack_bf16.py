"""Attacks searching in bf16 keep their fp32 strength.

Under bf16 autocast a point near the decision boundary can look misclassified when it is not.
Every attack drops an example from its batch once it is broken, so a faked break would end
the search on an example the runner's fp32 check then counts as robust: a weaker attack.
Each attack therefore re-checks its claimed breaks in fp32 before dropping them
(``Forward.confirmed``). Here a model fakes such breaks under autocast, deterministically, and
every attack must still break every breakable example of the linear problems.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from tests.engine.attack_helpers import (  # noqa: F401  (one_thread is an autouse fixture)
    assert_strong,
    broken,
    one_thread,
)
from tests.engine.test_attack_linear import ATTACKS, _setup
from workers.engine import types
from workers.engine.attacks import PGD, Attack, Forward, Loss, Square
from workers.engine.runner import Stage, run_cascade
from workers.engine.threats import Norm
from workers.engine.types import RunContext, native_bf16


class FakesBreaksUnderAutocast(nn.Module):
    """fp32 logits, except that under autocast a correctly classified point whose margin is
    below ``tau`` shows its runner-up class on top: a break that exists only in low precision.

    The true label of a point is that of the nearest clean input (the perturbations are far
    smaller than the distances between inputs). Gradients stay those of the fp32 model, so
    only the decision is faked, never the search direction, and no true break is hidden.
    """

    def __init__(self, inner: nn.Module, x_clean: Tensor, y: Tensor, tau: float = 0.25) -> None:
        super().__init__()
        self.inner = inner
        self.x_clean = x_clean.flatten(1)
        self.y = y
        self.tau = tau

    def forward(self, x: Tensor) -> Tensor:
        low_precision = torch.is_autocast_enabled(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            z = self.inner(x.float())
        if not low_precision:
            return z
        nearest = (x.flatten(1)[:, None, :] - self.x_clean[None]).abs().amax(-1).argmin(1)
        y = self.y[nearest]
        top = z.detach().topk(2, dim=1)
        fake = (top.indices[:, 0] == y) & (top.values[:, 0] - top.values[:, 1] < self.tau)
        swapped = z.detach().scatter(1, top.indices, top.values.flip(1))
        return z + (torch.where(fake[:, None], swapped, z.detach()) - z.detach())


class TrustingForward(Forward):
    """A bf16 search that takes its own word for a break: what the engine must not do."""

    def confirmed(self, x: Tensor, claimed: Tensor, y: Tensor,
                  target: Tensor | None = None) -> Tensor:
        return claimed


@pytest.mark.parametrize(("name", "norm", "attack"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_faked_low_precision_breaks_do_not_end_the_search(name: str, norm: Norm,
                                                          attack: Attack) -> None:
    model, x, y, m, eps = _setup(norm)
    fwd = Forward(FakesBreaksUnderAutocast(model, x, y), amp=True)
    out = attack.run(fwd, x, y, eps, torch.Generator().manual_seed(0))
    success = broken(model, x, y, out.x_adv, norm, eps)
    assert_strong(success, m, eps)
    assert torch.equal(out.success, success), name


@pytest.mark.parametrize("attack", [PGD(Norm.LINF, steps=40, loss=Loss.MARGIN),
                                    Square(Norm.LINF, queries=300)], ids=["pgd", "square"])
def test_trusting_low_precision_breaks_fails_the_strength_test(attack: Attack) -> None:
    """The test of the test above: without the fp32 confirmation the same attacks are weak."""
    model, x, y, m, eps = _setup(Norm.LINF)
    fwd = TrustingForward(FakesBreaksUnderAutocast(model, x, y), amp=True)
    out = attack.run(fwd, x, y, eps, torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError, match="breakable examples were not broken"):
        assert_strong(broken(model, x, y, out.x_adv, Norm.LINF, eps), m, eps)


def test_runner_in_bf16_matches_fp32_on_a_linear_model() -> None:
    """Through the runner, with real autocast where the CPU has native bf16 (the fake
    otherwise): the same cascade, as many robust examples as in fp32."""
    model, x, y, m, eps = _setup(Norm.LINF)
    stages = [Stage("pgd", PGD(Norm.LINF, steps=30, loss=Loss.MARGIN))]
    ref = run_cascade(model, x, y, Norm.LINF, eps, stages, RunContext())
    assert_strong(~ref.robust, m, eps)
    native = native_bf16(torch.device("cpu"))
    subject = model if native else FakesBreaksUnderAutocast(model, x, y)
    res = run_cascade(subject, x, y, Norm.LINF, eps, stages, RunContext(amp=True))
    assert res.rejected == 0
    assert_strong(~res.robust, m, eps)


@pytest.mark.parametrize(("native", "speedup", "expected"),
                         [(True, 2.4, True), (True, 1.5, True), (True, 1.2, False),
                          (True, 0.6, False), (False, 3.0, False)])
def test_cpu_searches_in_bf16_only_where_it_measured_faster(
        monkeypatch: pytest.MonkeyPatch, native: bool, speedup: float, expected: bool) -> None:
    monkeypatch.setattr(types, "native_bf16", lambda device: native)
    monkeypatch.setattr(types, "bf16_speedup", lambda: speedup)
    assert types.fast_bf16(torch.device("cpu")) is expected


def test_the_bf16_probe_measures_a_ratio() -> None:
    types.bf16_speedup.cache_clear()
    ratio = types.bf16_speedup()
    assert 0.05 < ratio < 50.0
    assert types.bf16_speedup() == ratio  # measured once per process


def test_the_bf16_probe_leaves_the_global_rng_alone() -> None:
    types.bf16_speedup.cache_clear()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    with torch.inference_mode():  # callers may be inside inference mode
        types.bf16_speedup()
    assert torch.equal(torch.rand(3), expected)
