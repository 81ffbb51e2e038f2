"""Attacks against linear classifiers, where each example's minimal perturbation is known.

For a linear model the smallest l_p perturbation that changes the label is
min_j (z_y - z_j) / |w_y - w_j|_q (q the dual norm), as long as the box does not bind (the
helpers build inputs for which it does not). A strong attack must break every example below
eps * (1 - 3 %), and none above eps.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from tests.engine.attack_helpers import (  # noqa: F401  (one_thread is an autouse fixture)
    assert_strong,
    broken,
    linear_min_norms,
    linear_problem,
    one_thread,
)
from workers.engine.attacks import (
    APGD,
    FGSM,
    PGD,
    APGDTargeted,
    Attack,
    CarliniWagnerL2,
    FABTargeted,
    Forward,
    Loss,
    PGDTargeted,
)
from workers.engine.runner import autoattack_stages, run_cascade
from workers.engine.threats import Norm
from workers.engine.types import RunContext

pytestmark = pytest.mark.slow

EPS_QUANTILE = 0.5  # eps = median minimal norm: half the examples are breakable


def _setup(norm: Norm, seed: int = 0) -> tuple[torch.nn.Module, Tensor, Tensor, Tensor, float]:
    model, x, y = linear_problem(n=64, seed=seed)
    m = linear_min_norms(model, x, y, norm)
    eps = float(m.quantile(EPS_QUANTILE))
    assert eps < 0.35  # the box does not bind (see linear_min_norms)
    return model, x, y, m, eps


ATTACKS: list[tuple[str, Norm, Attack]] = [
    ("pgd-linf", Norm.LINF, PGD(Norm.LINF, steps=40, loss=Loss.MARGIN)),
    ("pgd-l2", Norm.L2, PGD(Norm.L2, steps=40, loss=Loss.MARGIN)),
    ("pgd-l1", Norm.L1, PGDTargeted(PGD(Norm.L1, steps=40, loss=Loss.MARGIN), n_targets=9)),
    ("apgd-ce-linf", Norm.LINF, APGD(Norm.LINF, steps=50)),
    ("apgd-dlr-l2", Norm.L2, APGD(Norm.L2, steps=50, loss=Loss.DLR)),
    ("apgd-t-linf", Norm.LINF, APGDTargeted(Norm.LINF, steps=30)),
    ("apgd-t-l2", Norm.L2, APGDTargeted(Norm.L2, steps=30)),
    ("apgd-t-l1", Norm.L1, APGDTargeted(Norm.L1, steps=30, large_eps=True)),
    ("fab-t-linf", Norm.LINF, FABTargeted(Norm.LINF, steps=20)),
    ("fab-t-l2", Norm.L2, FABTargeted(Norm.L2, steps=20)),
    ("fab-t-l1", Norm.L1, FABTargeted(Norm.L1, steps=20)),
    ("cw-l2", Norm.L2, CarliniWagnerL2(steps=100, search_steps=6, lr=0.01)),
]


@pytest.mark.parametrize(("name", "norm", "attack"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_breaks_every_breakable_example(name: str, norm: Norm, attack: Attack) -> None:
    model, x, y, m, eps = _setup(norm)
    out = attack.run(Forward(model), x, y, eps, torch.Generator().manual_seed(0))
    success = broken(model, x, y, out.x_adv, norm, eps)
    assert_strong(success, m, eps)
    # What the attack claims must be what is true.
    assert torch.equal(out.success, success), name


def test_autoattack_l1_cascade_is_exact_on_linear_models() -> None:
    """AutoAttack's l_1 cascade (APGD-CE with 5 restarts, then APGD-T, both on the
    3eps/2eps/eps schedule) through the runner, on a linear model."""
    model, x, y, m, eps = _setup(Norm.L1)
    stages = autoattack_stages(Norm.L1, num_classes=10, steps=50)
    res = run_cascade(model, x, y, Norm.L1, eps, stages, RunContext())
    assert_strong(~res.robust, m, eps)


class _Identity(Attack):
    norm = Norm.LINF

    def run(self, fwd: Forward, x: Tensor, y: Tensor, eps: float | Tensor,
            generator: torch.Generator, clean_logits: Tensor | None = None) -> object:
        return type("Out", (), {"x_adv": x.clone(), "success": torch.zeros_like(y).bool()})()


@pytest.mark.parametrize("weak", ["identity", "tiny-fgsm", "one-step-pgd"])
def test_strength_assertion_rejects_weak_attacks(weak: str) -> None:
    """The test of the tests: a weak attack must fail the very assertion the attacks pass."""
    model, x, y, m, eps = _setup(Norm.LINF)
    fwd, gen = Forward(model), torch.Generator().manual_seed(0)
    if weak == "identity":
        x_adv = _Identity().run(fwd, x, y, eps, gen).x_adv  # type: ignore[attr-defined]
    elif weak == "tiny-fgsm":
        x_adv = FGSM(Norm.LINF).run(fwd, x, y, eps / 10, gen).x_adv
    else:
        x_adv = PGD(Norm.LINF, steps=1, step_size=eps / 20, random_start=False).run(
            fwd, x, y, eps, gen).x_adv
    with pytest.raises(AssertionError, match="breakable examples were not broken"):
        assert_strong(broken(model, x, y, x_adv, Norm.LINF, eps), m, eps)


def test_strength_assertion_rejects_out_of_ball_breaks() -> None:
    model, x, y, m, eps = _setup(Norm.L2)
    success = torch.ones_like(y, dtype=torch.bool)  # claims every example, even unbreakable ones
    with pytest.raises(AssertionError, match="beyond their minimal norm"):
        assert_strong(success, m, eps)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), norm=st.sampled_from(list(Norm)))
def test_targeted_pgd_reaches_its_target(seed: int, norm: Norm) -> None:
    """On a linear model, targeted PGD drives every example whose target is reachable (the
    target beats every other class somewhere well inside the ball) into that target."""
    model, x, y = linear_problem(n=32, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    target = (y + 1 + torch.randint(0, 9, y.shape, generator=gen)) % 10
    eps = {Norm.LINF: 0.1, Norm.L2: 0.3, Norm.L1: 0.3}[norm]
    # Reachable: the exact maximiser of z_t - max_{j != t} z_j over the ball is hard, so use a
    # certificate: the step eps * (steepest direction of z_t - z_y) already makes t win.
    with torch.no_grad():
        dw = model.weight[target] - model.weight[y]
        from workers.engine.threats import threat_for

        threat = threat_for(norm)
        probe = threat.project(threat.step(x, dw.view_as(x), eps), x, eps)
        reachable = model(probe).argmax(1) == target
    if not bool(reachable.any()):
        return
    x, y, target = x[reachable], y[reachable], target[reachable]
    pgd = PGD(norm, steps=50, loss=Loss.MARGIN, until_target=True, random_start=False)
    out = pgd.attack(Forward(model), x, y, eps, gen, target)
    with torch.no_grad():
        reached = model(out.x_adv).argmax(1) == target
    assert bool(reached.all()), f"{int((~reached).sum())}/{len(y)} examples missed their target"
    assert bool(out.success.all())
    assert bool((threat.norm_of(out.x_adv - x) <= eps * (1 + 1e-5)).all())


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), norm=st.sampled_from(list(Norm)),
       restarts=st.integers(2, 4))
def test_restarts_never_weaken_pgd(seed: int, norm: Norm, restarts: int) -> None:
    model, x, y = linear_problem(n=48, seed=seed)
    m = linear_min_norms(model, x, y, norm)
    eps = float(m.quantile(0.5))
    fwd = Forward(model)
    one = PGD(norm, steps=3, restarts=1).run(fwd, x, y, eps, torch.Generator().manual_seed(seed))
    many = PGD(norm, steps=3, restarts=restarts).run(fwd, x, y, eps,
                                                     torch.Generator().manual_seed(seed))
    b1 = broken(model, x, y, one.x_adv, norm, eps)
    bn = broken(model, x, y, many.x_adv, norm, eps)
    assert bool((bn | ~b1).all()), "an example broken with one restart survived more restarts"
    assert int(bn.sum()) >= int(b1.sum())
