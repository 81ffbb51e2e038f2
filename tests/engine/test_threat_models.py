"""Threat models: projections land in the ball and the box, are idempotent and exact."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from tests.engine.attack_helpers import one_thread  # noqa: F401  (autouse fixture)
from workers.engine.threats import Norm, per_example, threat_for


@st.composite
def problems(draw: st.DrawFn) -> tuple[Tensor, Tensor, Tensor]:
    seed = draw(st.integers(0, 2**31 - 1))
    n = draw(st.integers(1, 4))
    d = draw(st.integers(1, 40))
    scale = draw(st.floats(0.001, 5.0))
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 1, d, generator=g)
    # Some inputs on the box faces, where projections are easiest to get wrong.
    x = torch.where(torch.rand(x.shape, generator=g) < 0.2, x.round(), x)
    v = x + scale * torch.randn(x.shape, generator=g)
    eps = torch.rand(n, generator=g) * draw(st.floats(0.01, 3.0))
    return x, v, eps


def _inside(norm: Norm, p: Tensor, x: Tensor, eps: Tensor) -> bool:
    t = threat_for(norm)
    ok_ball = bool((t.norm_of(p - x) <= eps * (1 + 1e-5) + 1e-6).all())
    ok_box = bool(((p >= 0) & (p <= 1)).all())
    return ok_ball and ok_box and bool(torch.isfinite(p).all())


@settings(max_examples=60, deadline=None)
@given(prob=problems(), norm=st.sampled_from(list(Norm)))
def test_projection_is_inside_and_idempotent(prob: tuple[Tensor, Tensor, Tensor],
                                             norm: Norm) -> None:
    x, v, eps = prob
    t = threat_for(norm)
    p = t.project(v, x, eps)
    assert _inside(norm, p, x, eps)
    assert torch.allclose(t.project(p, x, eps), p, atol=2e-6)


def _reference(norm: Norm, v: Tensor, x: Tensor, eps: float) -> Tensor:
    """Projection by bisection on the KKT multiplier, in float64 (slow, obviously right)."""
    u, x = (v - x).double(), x.double()
    lo_b, hi_b = -x, 1 - x
    if norm is Norm.LINF:
        return x + u.clamp(-eps, eps).clamp(lo_b, hi_b)
    if norm is Norm.L2:
        def d(t: float) -> Tensor:
            return (t * u).clamp(lo_b, hi_b)
        size = lambda t: float(d(t).norm())  # noqa: E731
    else:
        def d(t: float) -> Tensor:  # t is the soft threshold
            return (u.sign() * (u.abs() - t).clamp_min(0)).clamp(lo_b, hi_b)
        size = lambda t: float(d(t).abs().sum())  # noqa: E731
    if norm is Norm.L2:
        if size(1.0) <= eps:
            return x + d(1.0)
        a, b = 0.0, 1.0
        for _ in range(100):
            mid = (a + b) / 2
            a, b = (mid, b) if size(mid) <= eps else (a, mid)
        return x + d(a)
    if size(0.0) <= eps:
        return x + d(0.0)
    a, b = 0.0, float(u.abs().max())
    for _ in range(100):
        mid = (a + b) / 2
        a, b = (a, mid) if size(mid) <= eps else (mid, b)
    return x + d(b)


@settings(max_examples=40, deadline=None)
@given(prob=problems(), norm=st.sampled_from(list(Norm)))
def test_projection_is_the_closest_point(prob: tuple[Tensor, Tensor, Tensor],
                                         norm: Norm) -> None:
    x, v, eps = prob
    p = threat_for(norm).project(v, x, eps)
    for i in range(x.shape[0]):
        ref = _reference(norm, v[i], x[i], float(eps[i]))
        assert torch.allclose(p[i].double(), ref, atol=1e-5), (norm, i)


@settings(max_examples=30, deadline=None)
@given(prob=problems(), norm=st.sampled_from(list(Norm)), seed=st.integers(0, 1000))
@pytest.mark.slow
def test_random_init_is_inside(prob: tuple[Tensor, Tensor, Tensor], norm: Norm,
                               seed: int) -> None:
    x, _, eps = prob
    p = threat_for(norm).random_init(x, eps, torch.Generator().manual_seed(seed))
    assert _inside(norm, p, x, eps)


@pytest.mark.parametrize("norm", list(Norm))
def test_step_has_the_requested_length(norm: Norm) -> None:
    g = torch.Generator().manual_seed(0)
    x = 0.25 + 0.5 * torch.rand(5, 3, 4, 4, generator=g)
    grad = torch.randn(x.shape, generator=g)
    size = torch.tensor([0.01, 0.02, 0.03, 0.04, 0.05])
    t = threat_for(norm)
    delta = t.step(x, grad, size) - x
    assert torch.allclose(t.norm_of(delta), size, rtol=1e-4)
    # An ascent direction: the first-order change of the loss is positive.
    assert bool(((delta * grad).flatten(1).sum(1) > 0).all())


def test_l1_step_is_sparse_and_box_aware() -> None:
    x = torch.full((1, 1, 10, 10), 0.5)
    x[0, 0, 0, :5] = 1.0  # on the upper face
    grad = torch.zeros_like(x)
    grad[0, 0, 0, :5] = 10.0  # points out of the box: must not be used
    grad[0, 0, 1, :3] = 1.0
    step = threat_for(Norm.L1).step(x, grad, 0.3, sparsity=0.03) - x
    moved = step.flatten().nonzero().squeeze(1).tolist()
    assert moved == [10, 11, 12]
    assert torch.allclose(step.abs().sum(), torch.tensor(0.3))


def test_per_example_accepts_floats_and_tensors() -> None:
    x = torch.zeros(3, 1, 2, 2)
    assert torch.equal(per_example(0.5, x), torch.full((3,), 0.5))
    assert torch.equal(per_example(torch.tensor(0.5), x), torch.full((3,), 0.5))
    assert torch.equal(per_example(torch.tensor([1.0, 2.0, 3.0]), x),
                       torch.tensor([1.0, 2.0, 3.0]))
