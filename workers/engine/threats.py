"""Threat models as strategies: one small class per l_p norm.

An attack never branches on the norm; it asks the threat for ``project`` (onto the l_p ball
around the clean input intersected with the [0, 1] box), ``step`` (the steepest-ascent step
for that norm) and ``random_init``. All three work on batches ``[N, C, H, W]`` and take
``eps`` / ``step_size`` either as a float or as a per-example tensor ``[N]``, which is what
the adaptive step sizes of APGD and the per-example radii of minimal-norm attacks need.

Projections are exact (not "scale then clip"): for l_inf the box and the ball are both
coordinate-wise; for l_2 and l_1 the KKT conditions reduce the problem to a single scalar
multiplier that is found from the sorted breakpoints of a piecewise function. The l_1 case
is the box-aware projection of Croce & Hein, "Mind the box: l1-APGD for sparse adversarial
attacks on image classifiers" (ICML 2021).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from contract.attacks import Norm as Norm  # the contract's norms, re-exported for the engine

Radius = float | Tensor
"""A radius or step size: a float, or a tensor of one value per example ``[N]``."""

_TINY = 1e-12


def per_example(value: Radius, x: Tensor) -> Tensor:
    """``value`` as a tensor ``[N]`` on ``x``'s device, float32."""
    n = x.shape[0]
    if isinstance(value, Tensor):
        v = value.to(device=x.device, dtype=torch.float32).reshape(-1)
        return v.expand(n) if v.numel() == 1 else v
    return torch.full((n,), float(value), device=x.device, dtype=torch.float32)


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    return v.view(-1, *([1] * (x.dim() - 1)))


class Threat(ABC):
    """An l_p ball intersected with the [0, 1] box."""

    norm: Norm
    dual: float  # the exponent q of the dual norm (1/p + 1/q = 1)

    @abstractmethod
    def norm_of(self, delta: Tensor) -> Tensor:
        """Per-example l_p norm of ``delta`` ``[N, ...]`` -> ``[N]``."""

    @abstractmethod
    def project(self, x_adv: Tensor, x: Tensor, eps: Radius) -> Tensor:
        """The closest point to ``x_adv`` in ``{z : |z - x|_p <= eps, 0 <= z <= 1}``."""

    @abstractmethod
    def step(self, x_adv: Tensor, grad: Tensor, step_size: Radius) -> Tensor:
        """An ascent step of l_p length ``step_size`` along the steepest direction (unprojected)."""

    @abstractmethod
    def random_init(self, x: Tensor, eps: Radius, generator: torch.Generator) -> Tensor:
        """A random starting point inside the ball and the box."""

    def dual_norm_of(self, w: Tensor) -> Tensor:
        flat = w.flatten(1)
        if self.dual == float("inf"):
            return flat.abs().amax(1)
        return flat.norm(p=self.dual, dim=1)


class LinfThreat(Threat):
    norm = Norm.LINF
    dual = 1.0

    def norm_of(self, delta: Tensor) -> Tensor:
        return delta.flatten(1).abs().amax(1)

    def project(self, x_adv: Tensor, x: Tensor, eps: Radius) -> Tensor:
        e = _bcast(per_example(eps, x), x)
        return torch.minimum(torch.maximum(x_adv, x - e), x + e).clamp_(0.0, 1.0)

    def step(self, x_adv: Tensor, grad: Tensor, step_size: Radius) -> Tensor:
        return x_adv + _bcast(per_example(step_size, x_adv), x_adv) * grad.sign()

    def random_init(self, x: Tensor, eps: Radius, generator: torch.Generator) -> Tensor:
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self.project(x + (2 * u - 1) * _bcast(per_example(eps, x), x), x, eps)


def _project_ball_box(x_adv: Tensor, x: Tensor, eps: Radius,
                      measure: Callable[[Tensor], Tensor],
                      solve: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Tensor:
    """Exact projection of ``x_adv`` onto {x + d : measure(d) <= eps} intersected with [0,1].

    Shared by l_2 and l_1: with u = x_adv - x, each coordinate may move at most ``cap`` (to
    the box face in u's direction). Rows whose box-clipped move already fits the ball keep it;
    the others get ``solve(|u|, cap, eps)``, the magnitudes from the norm's KKT conditions.
    """
    shape = x.shape
    e = per_example(eps, x)
    xf, u = x.flatten(1), (x_adv - x).flatten(1)
    cap = torch.where(u >= 0, 1.0 - xf, xf).clamp_min(0.0)
    au = u.abs()
    d = torch.minimum(au, cap)
    need = measure(d) > e
    if bool(need.any()):
        rows = need.nonzero().squeeze(1)
        d[rows] = solve(au[rows], cap[rows], e[rows])
    d = d * u.sign()
    d = _shrink_to(d, measure(d), e)
    return (xf + d).clamp_(0.0, 1.0).view(shape)


class L2Threat(Threat):
    norm = Norm.L2
    dual = 2.0

    def norm_of(self, delta: Tensor) -> Tensor:
        return delta.flatten(1).norm(dim=1)

    def project(self, x_adv: Tensor, x: Tensor, eps: Radius) -> Tensor:
        # KKT: d = clip(t * u, -x, 1 - x) for the t in (0, 1] with |d|_2 = eps (or t = 1 when
        # the box-clipped point is already inside the ball). |d(t)|^2 is piecewise quadratic
        # in t with one breakpoint per coordinate (where it hits the box): sort them.
        def solve(au: Tensor, cap: Tensor, e: Tensor) -> Tensor:
            t = _l2_multiplier(au, cap, e)
            return torch.minimum(t[:, None] * au, cap)

        return _project_ball_box(x_adv, x, eps, lambda d: d.norm(dim=1), solve)

    def step(self, x_adv: Tensor, grad: Tensor, step_size: Radius) -> Tensor:
        g = grad / _bcast(grad.flatten(1).norm(dim=1) + _TINY, grad)
        return x_adv + _bcast(per_example(step_size, x_adv), x_adv) * g

    def random_init(self, x: Tensor, eps: Radius, generator: torch.Generator) -> Tensor:
        g = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        g = g / _bcast(g.flatten(1).norm(dim=1) + _TINY, g)
        r = torch.rand((x.shape[0],), generator=generator, device=x.device, dtype=x.dtype)
        radius = per_example(eps, x) * r.pow(1.0 / x[0].numel())
        return self.project(x + _bcast(radius, x) * g, x, eps)


class L1Threat(Threat):
    norm = Norm.L1
    dual = float("inf")

    def __init__(self, sparsity: float = 0.05) -> None:
        self.sparsity = sparsity

    def norm_of(self, delta: Tensor) -> Tensor:
        return delta.flatten(1).abs().sum(1)

    def project(self, x_adv: Tensor, x: Tensor, eps: Radius) -> Tensor:
        # KKT: d_i = sign(u_i) * clip(|u_i| - lam, 0, cap_i) (soft threshold, then the box);
        # |d(lam)|_1 is piecewise linear and decreasing in lam, breakpoints |u_i| - cap_i and
        # |u_i|. Sorting the 2D breakpoints gives the exact lam (Croce & Hein 2021, Lemma 1).
        def solve(au: Tensor, cap: Tensor, e: Tensor) -> Tensor:
            lam = _l1_threshold(au, cap, e)
            return torch.minimum((au - lam[:, None]).clamp_min(0.0), cap)

        return _project_ball_box(x_adv, x, eps, lambda d: d.abs().sum(1), solve)

    def step(self, x_adv: Tensor, grad: Tensor, step_size: Radius,
             sparsity: Radius | None = None) -> Tensor:
        """Move the top-k coordinates of |grad| (k = sparsity * dims), each by step / k.

        Coordinates sitting on the box face the gradient points out of cannot move, so they
        are left out of the top-k (l1-APGD's box-aware step); otherwise the whole l_1 budget
        of a step could be spent on pixels that the projection immediately clips back.
        """
        g = grad.flatten(1)
        xa = x_adv.flatten(1)
        blocked = ((xa <= 0.0) & (g < 0)) | ((xa >= 1.0) & (g > 0))
        g = g.masked_fill(blocked, 0.0)
        n = g.shape[1]
        frac = per_example(self.sparsity if sparsity is None else sparsity, x_adv)
        k = (frac * n).ceil().clamp(1, n).long()
        sorted_abs = g.abs().sort(dim=1, descending=True).values
        thresh = sorted_abs.gather(1, (k - 1)[:, None])
        mask = (g.abs() >= thresh) & (g != 0)
        direction = g.sign() * mask
        direction = direction / (direction.abs().sum(1, keepdim=True) + _TINY)
        s = per_example(step_size, x_adv)[:, None]
        return (xa + s * direction).view(x_adv.shape)

    def random_init(self, x: Tensor, eps: Radius, generator: torch.Generator) -> Tensor:
        g = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self.project(x + g, x, eps)


def _shrink_to(d: Tensor, norms: Tensor, eps: Tensor) -> Tensor:
    """Guard against rounding: scale rows whose norm exceeds eps back onto the sphere."""
    scale = torch.where(norms > eps, eps / (norms + _TINY), torch.ones_like(norms))
    return d * scale[:, None]


def _l2_multiplier(au: Tensor, cap: Tensor, eps: Tensor) -> Tensor:
    """The t with |min(t * au, cap)|_2 = eps, rows where |min(au, cap)|_2 > eps."""
    big = torch.finfo(au.dtype).max ** 0.25
    tb = torch.where(au > 0, cap / au.clamp_min(_TINY), torch.full_like(au, big)).clamp_max(big)
    ts, idx = tb.sort(dim=1)
    u2 = au.square().gather(1, idx)
    c2 = cap.square().gather(1, idx)
    cum_u2 = u2.cumsum(1)
    cum_c2 = c2.cumsum(1)
    total = cum_u2[:, -1:]
    g = ts.square() * (total - cum_u2) + cum_c2  # |d|^2 at each breakpoint
    k = (g < eps.square()[:, None]).sum(1)  # number of coordinates capped at the optimum
    km1 = (k - 1).clamp_min(0)[:, None]
    b = torch.where(k[:, None] > 0, cum_c2.gather(1, km1), torch.zeros_like(total))
    a = total - torch.where(k[:, None] > 0, cum_u2.gather(1, km1), torch.zeros_like(total))
    t = ((eps.square()[:, None] - b).clamp_min(0.0) / a.clamp_min(_TINY)).sqrt()
    return t.squeeze(1)


def _l1_threshold(au: Tensor, cap: Tensor, eps: Tensor) -> Tensor:
    """The lam >= 0 with sum_i clip(au_i - lam, 0, cap_i) = eps, rows where it exceeds eps."""
    n = au.shape[1]
    f0 = torch.minimum(au, cap).sum(1)
    bp = torch.cat(((au - cap).clamp_min(0.0), au), dim=1)
    slope_change = torch.cat((-torch.ones_like(au), torch.ones_like(au)), dim=1)
    bs, idx = bp.sort(dim=1)
    slope = slope_change.gather(1, idx).cumsum(1)  # slope of f on (bs_k, bs_k+1)
    seg = slope[:, :-1] * (bs[:, 1:] - bs[:, :-1])
    f = torch.cat((f0[:, None], f0[:, None] + seg.cumsum(1)), dim=1)  # f at each breakpoint
    k = (f > eps[:, None]).sum(1).clamp(1, 2 * n - 1)  # first breakpoint with f <= eps
    km1 = (k - 1)[:, None]
    f_prev = f.gather(1, km1).squeeze(1)
    s_prev = slope.gather(1, km1).squeeze(1)
    b_prev = bs.gather(1, km1).squeeze(1)
    lam = b_prev + (f_prev - eps) / (-s_prev).clamp_min(1.0)
    return lam.clamp_min(0.0)


THREATS: dict[Norm, type[Threat]] = {Norm.LINF: LinfThreat, Norm.L2: L2Threat, Norm.L1: L1Threat}


def threat_for(norm: Norm | str) -> Threat:
    return THREATS[Norm(norm)]()
