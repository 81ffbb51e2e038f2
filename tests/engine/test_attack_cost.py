"""How much model work an attack spends (forwards and input gradients per step), and
APGD's step-size rule.

On an example no attack can break (eps far below its margin) every step runs, so the counts
are exact: APGD takes one gradient per iterate except the last (whose gradient nothing uses),
FAB one forward and one gradient per step (its adversarial test reuses the forward of the
gradient), PGD one gradient per step and one forward for the final iterate.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from torch import Tensor, nn

from tests.engine.attack_helpers import linear_problem, one_thread  # noqa: F401
from workers.engine.attacks import APGD, PGD, APGDTargeted, FABTargeted, Forward
from workers.engine.attacks.apgd import APGDState, hopeless, too_few_increases
from workers.engine.attacks.base import AttackOutput, over_targets, top_targets
from workers.engine.attacks.square import Square
from workers.engine.threats import Norm


class Counting(nn.Module):
    """The wrapped model, counting forwards and gradients that reach its input."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.forwards = 0
        self.gradients = 0

    def forward(self, x: Tensor) -> Tensor:
        self.forwards += 1
        if x.requires_grad:
            x.register_hook(self._count)
        return self.inner(x)

    def _count(self, grad: Tensor) -> Tensor:
        self.gradients += 1
        return grad


def _unbreakable() -> tuple[Counting, Tensor, Tensor]:
    model, x, y = linear_problem(n=16, seed=0)
    return Counting(model), x, y


def test_apgd_takes_no_gradient_at_its_last_iterate() -> None:
    model, x, y = _unbreakable()
    out = APGD(Norm.LINF, steps=10).run(Forward(model), x, y, 1e-4, torch.Generator())
    assert not bool(out.success.any())
    assert (model.forwards, model.gradients) == (11, 10)


def test_apgd_t_costs_one_run_per_target() -> None:
    model, x, y = _unbreakable()
    logits = model.inner(x)
    APGDTargeted(Norm.L2, steps=8, n_targets=3).run(Forward(model), x, y, 1e-4,
                                                    torch.Generator(), logits)
    assert (model.forwards, model.gradients) == (3 * 9, 3 * 8)


def test_fab_takes_one_forward_per_step() -> None:
    model, x, y = _unbreakable()
    logits = model.inner(x)
    out = FABTargeted(Norm.LINF, steps=6, n_targets=2).run(Forward(model), x, y, 1e-6,
                                                           torch.Generator(), logits)
    assert not bool(out.success.any())
    assert (model.forwards, model.gradients) == (2 * 7, 2 * 6)


def test_pgd_takes_one_gradient_per_step() -> None:
    model, x, y = _unbreakable()
    PGD(Norm.L1, steps=5).run(Forward(model), x, y, 1e-4, torch.Generator())
    assert (model.forwards, model.gradients) == (6, 5)


def test_the_first_checkpoint_counts_the_step_from_the_starting_point() -> None:
    # Starting point, then four steps; the checkpoint after step 3 looks at those four steps.
    rising = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    assert not bool(too_few_increases(rising, 3, 4, 0.75))  # 4 of 4 steps went up
    first_fell = torch.tensor([[5.0, 1.0, 2.0, 3.0, 4.0]])
    assert bool(too_few_increases(first_fell, 3, 4, 0.75))  # 3 of 4: at most 0.75 * 4
    # The next checkpoint (after step 7) compares steps 4..7 with the loss after step 3.
    later = torch.tensor([[0.0, 1.0, 2.0, 3.0, 9.0, 5.0, 6.0, 7.0, 8.0],
                          [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
    assert too_few_increases(later, 7, 4, 0.75).tolist() == [True, False]


def test_a_flat_margin_is_discarded_at_the_second_checkpoint() -> None:
    # 100 steps: checkpoints after steps 21 and 40. At eps 1e-4 no margin moves, so with
    # ``discard`` every example leaves after step 40 (the start and steps 0..40: 42 gradients);
    # without it every step runs.
    model, x, y = _unbreakable()
    APGD(Norm.LINF, steps=100, discard=4.0).run(Forward(model), x, y, 1e-4, torch.Generator())
    assert (model.forwards, model.gradients) == (42, 42)
    model.forwards = model.gradients = 0
    APGD(Norm.LINF, steps=100).run(Forward(model), x, y, 1e-4, torch.Generator())
    assert (model.forwards, model.gradients) == (101, 100)


def test_hopeless_extrapolates_the_pace_since_the_last_checkpoint() -> None:
    best = torch.tensor([0.5, 0.5, 0.5, 0.05])
    at_check = torch.tensor([0.5, 0.9, 0.52, 0.06])
    # paces per step over 10 steps: 0, 0.04, 0.002, 0.001; times 4 over 50 steps left:
    # 0, 8, 0.4, 0.2 against margins 0.5, 0.5, 0.5, 0.05
    assert hopeless(best, at_check, 10, 50, 4.0).tolist() == [True, False, True, False]


def test_examples_leave_every_part_of_the_apgd_state_together() -> None:
    """An example that leaves (broken, or hopeless) leaves every per-example tensor of the
    run; a run without targets keeps none."""
    names = [f.name for f in fields(APGDState)]
    full = {name: torch.arange(5 * k, 5 * k + 10).reshape(5, 2).float()
            for k, name in enumerate(names)}
    for target in (full["target"], None):
        st = APGDState(**{**full, "target": target})
        for keep in (torch.tensor([True, False, True, False, True]), torch.tensor([4, 0])):
            kept = st.restrict(keep)
            for name in names:
                if name == "target" and target is None:
                    assert kept.target is None
                else:
                    assert torch.equal(getattr(kept, name), full[name][keep]), name
        assert torch.equal(st.x, full["x"])  # the state it came from is unchanged


def test_apgd_t_can_leave_out_the_targets_an_earlier_stage_tried() -> None:
    model, x, y = _unbreakable()
    logits = model.inner(x)
    out = APGDTargeted(Norm.LINF, steps=8, n_targets=2, skip_targets=3).run(
        Forward(model), x, y, 1e-4, torch.Generator(), logits)
    assert not bool(out.success.any())
    assert (model.forwards, model.gradients) == (2 * 9, 2 * 8)  # two targets, not five
    tried: list[Tensor] = []

    def attack(i: Tensor, t: Tensor) -> AttackOutput:
        tried.append(t)
        return AttackOutput(x[i].clone(), torch.zeros(i.numel(), dtype=torch.bool))

    over_targets(Forward(model), x, y, logits, 2, attack, skip=3)
    assert torch.equal(torch.stack(tried, 1), top_targets(logits, y, 5)[:, 3:])


def test_parallel_targets_take_one_loop_of_steps_over_every_target() -> None:
    model, x, y = _unbreakable()
    logits = model.inner(x)
    out = APGDTargeted(Norm.LINF, steps=8, n_targets=3, skip_targets=1, parallel=True).run(
        Forward(model), x, y, 1e-4, torch.Generator(), logits)
    assert not bool(out.success.any())
    assert out.x_adv.shape == x.shape
    assert (model.forwards, model.gradients) == (9, 8)  # one run, not three
    calls: list[tuple[Tensor, Tensor]] = []

    def attack(i: Tensor, t: Tensor) -> AttackOutput:
        calls.append((i, t))
        return AttackOutput(x[i].clone(), torch.zeros(i.numel(), dtype=torch.bool))

    over_targets(Forward(model), x, y, logits, 3, attack, skip=1, parallel=True)
    assert len(calls) == 1
    rows, targets = calls[0]
    assert torch.equal(rows, torch.arange(16).repeat_interleave(3))
    assert torch.equal(targets, top_targets(logits, y, 4)[:, 1:].reshape(-1))


def test_parallel_targets_break_an_example_when_any_of_its_rows_breaks() -> None:
    model, x, y = _unbreakable()
    logits = model.inner(x)

    def attack(i: Tensor, t: Tensor) -> AttackOutput:
        # Rows are (example, target) pairs; example 0 breaks on its second target only,
        # example 1 on both (the first one's point is reported), the rest on none.
        ok = torch.zeros(i.numel(), dtype=torch.bool)
        ok[[1, 2, 3]] = True
        return AttackOutput(x[i] + torch.arange(i.numel())[:, None, None, None], ok)

    out = over_targets(Forward(model), x[:4], y[:4], logits[:4], 2, attack, parallel=True)
    assert out.success.tolist() == [True, True, False, False]
    assert torch.equal(out.x_adv[0], x[0] + 1)  # its second row
    assert torch.equal(out.x_adv[1], x[1] + 2)  # the first of its two rows


def test_square_discards_a_flat_margin_at_its_second_checkpoint() -> None:
    # 100 queries, checkpoints every 10: at eps 1e-4 no margin can reach zero, so with
    # ``discard`` every example leaves at query 20 (the starting point and queries 0..19);
    # without it every query runs. Square takes no gradient.
    model, x, y = _unbreakable()
    out = Square(Norm.LINF, queries=100, discard=4.0).run(Forward(model), x, y, 1e-4,
                                                          torch.Generator())
    assert not bool(out.success.any())
    assert (model.forwards, model.gradients) == (21, 0)
    model.forwards = 0
    Square(Norm.L2, queries=100).run(Forward(model), x, y, 1e-4, torch.Generator())
    assert (model.forwards, model.gradients) == (101, 0)


def test_an_examples_restarts_write_its_result_once_the_first_row_wins() -> None:
    from workers.engine.attacks.pgd import first_per_owner

    owner = torch.tensor([0, 1, 2, 0, 1, 2, 0])  # three examples, restarts after each other
    mask = torch.tensor([False, True, True, True, True, False, True])
    assert first_per_owner(mask, owner).tolist() == [3, 1, 2]  # owners 0, 1, 2
    assert first_per_owner(torch.zeros(7, dtype=torch.bool), owner).tolist() == []
