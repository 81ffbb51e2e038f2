"""The cascade runner: resume from state, cancellation, fp32 re-check, final assertions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from tests.engine.attack_helpers import (  # noqa: F401  (one_thread is an autouse fixture)
    TrustingForward,
    linear_problem,
    one_thread,
)
from workers.engine.attacks import PGD, Attack, AttackOutput, Forward
from workers.engine.runner import Stage, assert_valid, run_cascade
from workers.engine.threats import Norm, Radius, threat_for
from workers.engine.types import Cancelled, RunContext


class Counting(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.inner(x)


class CountingAttack(Attack):
    def __init__(self, inner: Attack) -> None:
        self.inner = inner
        self.norm = inner.norm
        self.invocations = 0

    def run(self, fwd: Forward, x: Tensor, y: Tensor, eps: Radius, generator: torch.Generator,
            clean_logits: Tensor | None = None) -> AttackOutput:
        self.invocations += 1
        return self.inner.run(fwd, x, y, eps, generator, clean_logits)


class LyingAttack(Attack):
    """Claims every example is broken and returns the clean input (or a far-away point)."""

    norm = Norm.LINF

    def __init__(self, far: bool = False) -> None:
        self.far = far

    def run(self, fwd: Forward, x: Tensor, y: Tensor, eps: Radius, generator: torch.Generator,
            clean_logits: Tensor | None = None) -> AttackOutput:
        x_adv = (1 - x) if self.far else x.clone()
        return AttackOutput(x_adv, torch.ones_like(y, dtype=torch.bool))


def _stages() -> tuple[CountingAttack, CountingAttack, list[Stage]]:
    a = CountingAttack(PGD(Norm.LINF, steps=2))
    b = CountingAttack(PGD(Norm.LINF, steps=5, restarts=2))
    return a, b, [Stage("weak", a), Stage("strong", b)]


def test_resume_skips_finished_stages(tmp_path: Path) -> None:
    inner, x, y = linear_problem(n=64)
    model = Counting(inner)
    eps = 0.02
    a, b, stages = _stages()
    ctx = RunContext(state_dir=tmp_path, batch_size=16)
    cancel_in_second = {"armed": True}

    def progress(frac: float, msg: str) -> None:
        if msg.startswith("strong") and cancel_in_second["armed"]:
            raise Cancelled("worker killed")

    with pytest.raises(Cancelled):
        run_cascade(model, x, y, Norm.LINF, eps, stages, ctx, state_dir=tmp_path,
                    progress=progress)
    assert a.invocations > 0
    assert (tmp_path / "stage00-weak.npz").exists()
    assert not (tmp_path / "stage01-strong.npz").exists()

    # The "restarted worker": the first stage and the clean pass come from the state.
    a2, b2, stages2 = _stages()
    cancel_in_second["armed"] = False
    res = run_cascade(model, x, y, Norm.LINF, eps, stages2, ctx, state_dir=tmp_path,
                      progress=progress)
    assert a2.invocations == 0
    assert b2.invocations > 0
    assert res.resumed == ["weak"]

    # A third run does no model work at all.
    a3, b3, stages3 = _stages()
    model.calls = 0
    again = run_cascade(model, x, y, Norm.LINF, eps, stages3, ctx, state_dir=tmp_path)
    assert model.calls == 0
    assert a3.invocations == 0
    assert b3.invocations == 0
    assert torch.equal(again.robust, res.robust)

    # Same result as an uninterrupted run with the same seed.
    a4, b4, stages4 = _stages()
    fresh = run_cascade(model, x, y, Norm.LINF, eps, stages4, RunContext(batch_size=16))
    assert torch.equal(fresh.robust, res.robust)
    # The state is plain npz, readable without pickle.
    with np.load(tmp_path / "stage01-strong.npz", allow_pickle=False) as f:
        assert f["robust"].dtype == np.bool_


def test_state_of_another_eps_is_not_reused(tmp_path: Path) -> None:
    model, x, y = linear_problem(n=32)
    a, b, stages = _stages()
    ctx = RunContext(state_dir=tmp_path)
    run_cascade(model, x, y, Norm.LINF, 0.02, stages, ctx, state_dir=tmp_path)
    a2, b2, stages2 = _stages()
    res = run_cascade(model, x, y, Norm.LINF, 0.03, stages2, ctx, state_dir=tmp_path)
    assert a2.invocations > 0
    assert res.resumed == []


def test_cancelled_propagates() -> None:
    model, x, y = linear_problem(n=32)

    def cancel(frac: float, msg: str) -> None:
        raise Cancelled("user cancelled")

    with pytest.raises(Cancelled):
        run_cascade(model, x, y, Norm.LINF, 0.02, _stages()[2], RunContext(), progress=cancel)


@pytest.mark.parametrize("far", [False, True])
def test_claimed_breaks_that_are_not_real_are_rejected(far: bool) -> None:
    model, x, y = linear_problem(n=32)
    res = run_cascade(model, x, y, Norm.LINF, 0.02, [Stage("liar", LyingAttack(far))],
                      RunContext())
    assert res.robust_accuracy == 1.0
    assert res.rejected == 32


class Bf16Fragile(nn.Module):
    """Misclassifies only under autocast: the kind of 'break' bf16 rounding can fake."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        z = self.inner(x)
        if torch.is_autocast_enabled(x.device.type):
            return -z
        return z


def test_fp32_recheck_rejects_a_low_precision_break() -> None:
    inner, x, y = linear_problem(n=32)
    model = Bf16Fragile(inner)
    stages = [Stage("pgd", PGD(Norm.LINF, steps=2))]
    # The attack checks its claims in fp32 before it stops on them: nothing false comes out.
    res = run_cascade(model, x, y, Norm.LINF, 1e-4, stages, RunContext(),
                      fwd=Forward(model, amp=True, probe=False))
    assert res.robust_accuracy == 1.0
    assert res.rejected == 0
    # An attack that trusted bf16 would claim all 32; the runner's own re-check rejects them.
    res = run_cascade(model, x, y, Norm.LINF, 1e-4, stages, RunContext(),
                      fwd=TrustingForward(model, amp=True, probe=False))
    assert res.robust_accuracy == 1.0
    assert res.rejected == 32
    # Without the fake, the same cascade does break examples at a larger eps.
    res2 = run_cascade(inner, x, y, Norm.LINF, 0.2, stages, RunContext())
    assert res2.robust_accuracy < 1.0


def test_assert_valid_catches_points_outside_the_ball_or_box() -> None:
    t = threat_for(Norm.L2)
    x = torch.full((2, 1, 2, 2), 0.5)
    assert_valid(t, x, x + 0.1, eps=0.21)
    with pytest.raises(AssertionError, match="outside"):
        assert_valid(t, x, x + 0.2, eps=0.21)
    with pytest.raises(AssertionError, match="outside"):
        assert_valid(t, x, x.clone().fill_(float("nan")), eps=1.0)
    with pytest.raises(AssertionError, match="outside"):
        assert_valid(threat_for(Norm.LINF), x, x + 0.6, eps=1.0)


class RunsOutOfMemory(Attack):
    """Raises CUDA's out-of-memory error for batches larger than ``limit``, like a GPU would."""

    def __init__(self, inner: Attack, limit: int) -> None:
        self.inner = inner
        self.norm = inner.norm
        self.limit = limit
        self.batches: list[int] = []

    def run(self, fwd: Forward, x: Tensor, y: Tensor, eps: Radius, generator: torch.Generator,
            clean_logits: Tensor | None = None) -> AttackOutput:
        self.batches.append(int(x.shape[0]))
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner.run(fwd, x, y, eps, generator, clean_logits)


def test_out_of_memory_halves_the_batch_until_it_fits() -> None:
    model, x, y = linear_problem(n=64)
    oom = RunsOutOfMemory(PGD(Norm.LINF, steps=5), limit=20)
    res = run_cascade(model, x, y, Norm.LINF, 0.02, [Stage("pgd", oom)],
                      RunContext(batch_size=64))
    assert oom.batches[:3] == [64, 32, 16]
    assert max(oom.batches[2:]) == 16
    assert sum(oom.batches[2:]) == 64  # every example attacked exactly once, none skipped
    # The same as a run that used batches of 16 from the start (the failed tries drew nothing
    # from the generator).
    ref = run_cascade(model, x, y, Norm.LINF, 0.02, [Stage("pgd", PGD(Norm.LINF, steps=5))],
                      RunContext(batch_size=16))
    assert 0.0 < ref.robust_accuracy < 1.0
    assert torch.equal(res.robust, ref.robust)


def test_out_of_memory_on_a_single_example_is_raised() -> None:
    model, x, y = linear_problem(n=8)
    oom = RunsOutOfMemory(PGD(Norm.LINF, steps=2), limit=0)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_cascade(model, x, y, Norm.LINF, 0.02, [Stage("pgd", oom)], RunContext(batch_size=8))
    assert oom.batches == [8, 4, 2, 1]


class ShyAttack(Attack):
    """Finds adversarial examples but claims none, like a bf16 search that saw a true break
    on the right side of the boundary."""

    norm = Norm.LINF

    def run(self, fwd: Forward, x: Tensor, y: Tensor, eps: Radius, generator: torch.Generator,
            clean_logits: Tensor | None = None) -> AttackOutput:
        found = PGD(Norm.LINF, steps=10).run(Forward(fwd.model), x, y, eps, generator)
        return AttackOutput(found.x_adv, torch.zeros_like(found.success))


def test_unclaimed_breaks_of_a_low_precision_search_are_found_in_fp32() -> None:
    model, x, y = linear_problem(n=64)
    stages = [Stage("shy", ShyAttack())]
    exact = run_cascade(model, x, y, Norm.LINF, 0.02, stages, RunContext(), fwd=Forward(model))
    assert exact.robust_accuracy == 1.0  # a search with the reference forward is taken at its word
    low = run_cascade(model, x, y, Norm.LINF, 0.02, stages, RunContext(),
                      fwd=Forward(model, amp=True))
    ref = run_cascade(model, x, y, Norm.LINF, 0.02, [Stage("pgd", PGD(Norm.LINF, steps=10))],
                      RunContext())
    assert ref.robust_accuracy < 1.0
    assert torch.equal(low.robust, ref.robust)
    assert low.rejected == 0


class Threshold(nn.Module):
    """Two classes: the mean pixel against 0.5, so the margin of class 0 is mean(x) - 0.5."""

    def forward(self, x: Tensor) -> Tensor:
        v = x.flatten(1).mean(1, keepdim=True)
        return torch.cat([v, torch.full_like(v, 0.5)], 1)


class Shift(Attack):
    """Moves every pixel down by ``d`` and claims nothing: a known smaller margin."""

    norm = Norm.LINF

    def __init__(self, d: float) -> None:
        self.d = d

    def run(self, fwd: Forward, x: Tensor, y: Tensor, eps: Radius, generator: torch.Generator,
            clean_logits: Tensor | None = None) -> AttackOutput:
        return AttackOutput(x - self.d, torch.zeros_like(y, dtype=torch.bool))


class Recording(Attack):
    norm = Norm.LINF

    def __init__(self) -> None:
        self.seen: list[float] = []

    def run(self, fwd: Forward, x: Tensor, y: Tensor, eps: Radius, generator: torch.Generator,
            clean_logits: Tensor | None = None) -> AttackOutput:
        self.seen += x.flatten(1).mean(1).tolist()
        return AttackOutput(x.clone(), torch.zeros_like(y, dtype=torch.bool))


def test_an_escalation_stage_attacks_only_examples_near_the_boundary(tmp_path: Path) -> None:
    # Clean margins 0.4, 0.5, 0.45; after the shift 0.1, 0.2, 0.15: fractions 0.25, 0.4, 0.33
    # of the clean margin, so only the first is within 0.3 of it.
    x = torch.tensor([0.9, 1.0, 0.95]).view(3, 1, 1, 1)
    y = torch.zeros(3, dtype=torch.long)
    near = Recording()
    stages = [Stage("shift", Shift(0.3)), Stage("near", near, escalate=0.3)]
    res = run_cascade(Threshold(), x, y, Norm.LINF, 0.3, stages, RunContext())
    assert near.seen == pytest.approx([0.9])
    assert res.closest is not None
    assert res.closest.tolist() == pytest.approx([0.1, 0.2, 0.15], abs=1e-6)
    assert bool(res.robust.all())

    # A worker restarted after the first stage escalates the same examples: the smallest
    # margins are part of the saved state.
    def stop(frac: float, msg: str) -> None:
        if msg.startswith("near"):
            raise Cancelled("worker killed")

    ctx = RunContext(state_dir=tmp_path)
    with pytest.raises(Cancelled):
        run_cascade(Threshold(), x, y, Norm.LINF, 0.3, [Stage("shift", Shift(0.3)),
                    Stage("near", Recording(), escalate=0.3)], ctx, state_dir=tmp_path,
                    progress=stop)
    again = Recording()
    res = run_cascade(Threshold(), x, y, Norm.LINF, 0.3, [Stage("shift", Shift(0.3)),
                      Stage("near", again, escalate=0.3)], ctx, state_dir=tmp_path)
    assert res.resumed == ["shift"]
    assert again.seen == pytest.approx([0.9])
