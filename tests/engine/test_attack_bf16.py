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
    TrustingForward,
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

pytestmark = pytest.mark.slow


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
    # A ratio of two timings: positive and finite. Its size is the CPU's (emulated bf16 on a
    # CPU without it ran at 0.05x fp32 on a busy machine); what it decides is tested above.
    assert 0.0 < ratio < float("inf")
    assert types.bf16_speedup() == ratio  # measured once per process


def test_the_bf16_probe_leaves_the_global_rng_alone() -> None:
    types.bf16_speedup.cache_clear()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    with torch.inference_mode():  # callers may be inside inference mode
        types.bf16_speedup()
    assert torch.equal(torch.rand(3), expected)


class FavoursClassZeroUnderAutocast(nn.Module):
    """Logits = inputs (two classes) in fp32; under autocast class 0's logit is raised by
    ``delta``: a systematic low-precision error that hides the breaks of class-0 examples
    whose margin lies in (-delta, 0)."""

    def __init__(self, delta: float) -> None:
        super().__init__()
        self.delta = delta

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_autocast_enabled(x.device.type):
            return x.float()
        return x.float() + torch.tensor([self.delta, 0.0])


class ChecksOnlyClaims(Forward):
    """A search that re-checks its claimed breaks but trusts every "correct"."""

    def slack(self, x: Tensor, m: Tensor, y: Tensor) -> float:
        return 0.0


def test_breaks_hidden_by_the_search_precision_are_found_in_fp32() -> None:
    # fp32 margins (label 0): far robust, clearly broken, broken by 0.05 (hidden in "bf16").
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.05]])
    y = torch.zeros(3, dtype=torch.long)
    model = FavoursClassZeroUnderAutocast(delta=0.1)
    fwd = Forward(model, amp=True)
    logits = fwd(x)
    assert logits.argmax(1).tolist() == [0, 1, 0]  # the search sees the last row as correct
    assert fwd.wrong(x, logits, y).tolist() == [False, True, True]
    assert fwd.margin_error == pytest.approx(0.1)
    assert fwd.slack(x, logits[:, 0] - logits[:, 1], y) == pytest.approx(0.3)
    # The test of the test: trusting the search's "correct" misses that break.
    trusting = ChecksOnlyClaims(model, amp=True)
    assert trusting.wrong(x, trusting(x), y).tolist() == [False, True, False]


def test_an_exact_search_is_never_second_guessed() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 0.05]])
    fwd = Forward(FavoursClassZeroUnderAutocast(delta=0.1))  # fp32, the model itself
    before = fwd.calls
    assert fwd.wrong(x, fwd(x), torch.zeros(2, dtype=torch.long)).tolist() == [False, True]
    assert fwd.calls == before + 1
    assert fwd.margin_error is None
