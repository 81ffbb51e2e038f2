"""FAB-T: the targeted Fast Adaptive Boundary attack (minimally distorted examples).

Croce & Hein, "Minimally distorted Adversarial Examples with a Fast Adaptive Boundary
Attack", ICML 2020. Distance: l_inf, l_2, l_1.

Each step linearises the decision boundary between the true class y and the target t at the
current point, projects both the current point and the clean input onto that hyperplane
(intersected with the box, minimal l_p distance), and moves to a convex combination biased
towards the clean input (alpha <= alpha_max), with a small extrapolation eta. Whenever the
point is adversarial it is recorded if its norm beats the best so far and pulled back towards
the clean input by beta. With ``eps`` (as in AutoAttack's cascade) an example stops as soon as
it has an adversarial point within eps; :meth:`FABTargeted.minimal` runs every step and every
target to report each example's smallest perturbation norm (for robustness curves).

Difference from the reference code: the adversarial test at a point uses the logits of the
forward that also gives the gradient there, so a step costs one forward and one backward
(the reference spends a second forward per step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from workers.engine.attacks.base import Attack, AttackOutput, Forward, margin_loss, top_targets
from workers.engine.threats import Norm, Radius, Threat, per_example, threat_for

_BIG = 1e30
_NEWTON_ITERS = 50


def hyperplane_step(norm: Norm, t: Tensor, w: Tensor, c: Tensor) -> Tensor:
    """The smallest l_p step d with ``w . d = c`` and ``0 <= t + d <= 1`` (rows of [M, D]).

    Where the box does not allow reaching the hyperplane, the step goes as far as the box
    allows in the right direction. Exact: the optimum is ``d_i = sign(w_i) min(lam a_i, cap_i)``
    (a_i = 1 for l_inf, |w_i| for l_2) or, for l_1, the greedy fill of the largest |w_i|, and
    the multiplier comes from the sorted breakpoints.
    """
    sgn = torch.sign(c)
    v = w * sgn[:, None]
    need = c.abs()
    av = v.abs()
    cap = torch.where(v > 0, 1.0 - t, t).clamp_min(0.0) * (av > 0)
    if norm is Norm.L1:
        order = av.argsort(dim=1, descending=True)
        avs, caps = av.gather(1, order), cap.gather(1, order)
        reach = (avs * caps).cumsum(1)
        before = reach - avs * caps
        full = reach <= need[:, None]
        partial = (~full) & (before < need[:, None])
        amount = torch.where(full, caps, torch.zeros_like(caps))
        part = ((need[:, None] - before) / avs.clamp_min(1e-30)).clamp_min(0.0)
        amount = torch.where(partial, torch.minimum(part, caps), amount)
        d = torch.zeros_like(t).scatter(1, order, amount)
    else:
        # f(lam) = sum_i av_i min(lam a_i, cap_i) is concave, increasing and piecewise linear:
        # Newton's method from lam = 0 stays below the root and lands on it exactly once it
        # reaches the root's segment (a handful of iterations; no sort of D values per row).
        a = torch.ones_like(av) if norm is Norm.LINF else av
        reach = (av * cap).sum(1)
        lam = torch.zeros_like(need)
        for _ in range(_NEWTON_ITERS):
            lam_b = lam[:, None]
            free = lam_b * a < cap
            f = (av * torch.where(free, lam_b * a, cap)).sum(1)
            slope = (av * a * free).sum(1)
            gap = need - f
            if bool((gap <= 1e-7 * need.clamp_min(1e-12)).all()):
                break
            lam = lam + gap.clamp_min(0.0) / slope.clamp_min(1e-30)
        lam = torch.where(reach <= need, torch.full_like(lam, _BIG), lam)
        d = torch.minimum(lam[:, None] * a, cap)
    return d * torch.sign(v)


@dataclass(frozen=True)
class FABTargeted(Attack):
    norm: Norm = Norm.LINF
    steps: int = 100
    n_targets: int = 9
    restarts: int = 1
    alpha_max: float = 0.1
    eta: float = 1.05
    beta: float = 0.9
    name: str = "fab-t"

    def run(self, fwd: Forward, x: Tensor, y: Tensor, eps: Radius, generator: torch.Generator,
            clean_logits: Tensor | None = None) -> AttackOutput:
        threat = threat_for(self.norm)
        e = per_example(eps, x)
        targets = self._targets(fwd, x, y, clean_logits)
        best = x.clone()
        res = torch.full((x.shape[0],), float("inf"), device=x.device)
        for k in range(targets.shape[1]):
            for r in range(max(self.restarts, 1)):
                todo = (res > e).nonzero().squeeze(1)
                if todo.numel() == 0:
                    break
                adv, norms = self._single(threat, fwd, x[todo], y[todo], targets[todo, k],
                                          e[todo], res[todo], generator, r > 0)
                better = norms < res[todo]
                best[todo[better]] = adv[better]
                res[todo[better]] = norms[better]
        success = res <= e
        return AttackOutput(torch.where(success[:, None, None, None], best, x), success)

    def minimal(self, fwd: Forward, x: Tensor, y: Tensor, generator: torch.Generator,
                clean_logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Smallest adversarial perturbation found per example and its norm (inf if none)."""
        threat = threat_for(self.norm)
        targets = self._targets(fwd, x, y, clean_logits)
        best = x.clone()
        res = torch.full((x.shape[0],), float("inf"), device=x.device)
        no_eps = torch.full_like(res, float("inf"))
        for k in range(targets.shape[1]):
            for r in range(max(self.restarts, 1)):
                adv, norms = self._single(threat, fwd, x, y, targets[:, k], no_eps, res,
                                          generator, r > 0)
                better = norms < res
                best[better] = adv[better]
                res = torch.where(better, norms, res)
        return self._shrink(threat, fwd, x, y, best, res)

    @staticmethod
    def _shrink(threat: Threat, fwd: Forward, x: Tensor, y: Tensor, best: Tensor,
                res: Tensor, iters: int = 12) -> tuple[Tensor, Tensor]:
        """Bisect the scale of each found perturbation down to the decision boundary.

        FAB's extrapolation (eta) and pull-back (beta) settle a fraction of a percent outside
        the boundary; forwards only, and the segment stays in the box (convexity). The
        boundary is the reference model's: fp32 forwards, never the (bf16) search forward.
        """
        found = torch.isfinite(res)
        delta = best - x
        lo = torch.zeros_like(res)
        hi = torch.ones_like(res)
        with torch.inference_mode():
            for _ in range(iters):
                mid = (lo + hi) / 2
                adv = fwd.fp32(x + mid[:, None, None, None] * delta).argmax(1) != y
                hi = torch.where(adv, mid, hi)
                lo = torch.where(adv, lo, mid)
        best = torch.where(found[:, None, None, None], x + hi[:, None, None, None] * delta, best)
        return best, torch.where(found, threat.norm_of(best - x), res)

    def _targets(self, fwd: Forward, x: Tensor, y: Tensor, clean_logits: Tensor | None) -> Tensor:
        if clean_logits is None:
            with torch.inference_mode():
                clean_logits = fwd.fp32(x)
        return top_targets(clean_logits, y, self.n_targets)

    def _single(self, threat: Threat, fwd: Forward, x: Tensor, y: Tensor, target: Tensor,
                eps: Tensor, res: Tensor, generator: torch.Generator,
                random_start: bool) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        shape = x.shape
        x0 = x.flatten(1)
        x1 = x.clone()
        if random_start:
            radius = torch.minimum(res, eps)
            radius = torch.where(torch.isfinite(radius), radius, torch.zeros_like(radius))
            x1 = threat.random_init(x, 0.5 * radius, generator)
        best = x.clone()
        norms = torch.full((n,), float("inf"), device=x.device)
        idx = torch.arange(n, device=x.device)
        early = bool(torch.isfinite(eps).any())
        for i in range(self.steps + 1):
            if i < self.steps:
                logits, diff, grad = fwd.loss_grad(x1, y[idx], margin_loss, target[idx])
            else:
                with torch.inference_mode():
                    logits = fwd(x1)
            is_adv = logits.argmax(1) != y[idx]
            cur = threat.norm_of(x1 - x[idx])
            improves = is_adv & (cur < norms[idx])
            # A point within eps ends the example's search, so a bf16 claim must hold in fp32
            # first; beyond eps it only tightens the bound of an example still attacked.
            within = improves & (cur <= eps[idx])
            better = (improves & ~within) | fwd.confirmed(x1, within, y[idx])
            best[idx[better]] = x1[better]
            norms[idx[better]] = cur[better]
            if i == self.steps:
                break
            xl = x1.flatten(1)
            # Pull adversarial points back towards the clean input (beta), keep the hyperplane
            # of the linearisation point.
            xc = torch.where(is_adv[:, None], x0[idx] + (xl - x0[idx]) * self.beta, xl)
            if early:
                live = norms[idx] > eps[idx]
                if not bool(live.any()):
                    break
                if not bool(live.all()):
                    idx, xl, xc = idx[live], xl[live], xc[live]
                    diff, grad = diff[live], grad[live]
            w = grad.flatten(1)
            xo = x0[idx]
            c_cur = -diff - (w * (xc - xl)).sum(1)
            c_org = -diff - (w * (xo - xl)).sum(1)
            d = hyperplane_step(self.norm, torch.cat((xc, xo)), torch.cat((w, w)),
                                torch.cat((c_cur, c_org)))
            m = idx.numel()
            a = threat.norm_of(d).clamp_min(1e-8)
            a1, a2 = a[:m], a[m:]
            alpha = (a1 / (a1 + a2)).clamp(0.0, self.alpha_max)[:, None]
            x_next = ((xc + self.eta * d[:m]) * (1 - alpha) + (xo + self.eta * d[m:]) * alpha)
            x1 = x_next.clamp(0.0, 1.0).view(m, *shape[1:])
        return best, norms
