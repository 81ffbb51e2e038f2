"""Carlini-Wagner l_2: minimal-norm attack by penalised optimisation in tanh space.

Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P 2017.
Distance: l_2 only. Minimises ||x' - x||_2^2 + c * max(z_y - max_{j != y} z_j, -kappa) with
x' = (tanh(w) + 1) / 2 (the box for free), Adam on w, and a per-example binary search on c.
With ``eps`` an example counts as broken when its smallest adversarial found is within eps;
the binary search and the optimisation stop early for examples already below eps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from workers.engine.attacks.base import Attack, AttackOutput, Forward, margin
from workers.engine.threats import Norm, Radius, per_example, threat_for


@dataclass(frozen=True)
class CarliniWagnerL2(Attack):
    norm: Norm = Norm.L2
    steps: int = 100
    search_steps: int = 5
    c_init: float = 1.0
    kappa: float = 0.0
    lr: float = 0.01
    name: str = "cw"

    def run(self, fwd: Forward, x: Tensor, y: Tensor, eps: Radius, generator: torch.Generator,
            clean_logits: Tensor | None = None) -> AttackOutput:
        e = per_example(eps, x)
        best, norms = self.minimal(fwd, x, y, e)
        success = norms <= e
        adv = threat_for(Norm.L2).project(best, x, e)
        return AttackOutput(torch.where(success[:, None, None, None], adv, x), success)

    def minimal(self, fwd: Forward, x: Tensor, y: Tensor,
                stop_below: Tensor | None = None) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        dev = x.device
        lo = torch.zeros(n, device=dev)
        hi = torch.full((n,), 1e10, device=dev)
        c = torch.full((n,), self.c_init, device=dev)
        best = x.clone()
        best_norm = torch.full((n,), float("inf"), device=dev)
        w0 = torch.atanh((2 * x - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        stop = torch.full((n,), -1.0, device=dev) if stop_below is None else stop_below
        for _ in range(self.search_steps):
            live = (best_norm > stop).nonzero().squeeze(1)
            if live.numel() == 0:
                break
            found = self._optimise(fwd, x[live], y[live], w0[live], c[live], best, best_norm,
                                   live, stop[live])
            # Binary search on c: smaller where an adversarial was found, larger elsewhere.
            hi[live] = torch.where(found, torch.minimum(hi[live], c[live]), hi[live])
            lo[live] = torch.where(found, lo[live], torch.maximum(lo[live], c[live]))
            c[live] = torch.where(hi[live] < 1e9, (lo[live] + hi[live]) / 2, c[live] * 10)
        return best, best_norm

    def _optimise(self, fwd: Forward, x: Tensor, y: Tensor, w0: Tensor, c: Tensor,
                  best: Tensor, best_norm: Tensor, rows: Tensor, stop: Tensor) -> Tensor:
        w = w0.clone()
        # Adam by hand: per-example, no optimizer machinery (torch.optim's first step pulls in
        # the compiler stack, seconds of start-up on a cold worker).
        m1 = torch.zeros_like(w)
        m2 = torch.zeros_like(w)
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for t in range(1, self.steps + 1):
            with torch.enable_grad():
                w.requires_grad_(True)
                x_adv = (torch.tanh(w) + 1) / 2
                logits = fwd(x_adv)
                dist = (x_adv - x).flatten(1).square().sum(1)
                f = (margin(logits, y) + self.kappa).clamp_min(0.0)
                loss = (dist + c * f).sum()
                (grad,) = torch.autograd.grad(loss, w)
            fwd.gradients += int(x.shape[0])
            with torch.no_grad():
                is_adv = logits.argmax(1) != y
                norm = dist.sqrt()
                better = fwd.confirmed(x_adv, is_adv & (norm < best_norm[rows]), y)
                best[rows[better]] = x_adv.detach()[better]
                best_norm[rows[better]] = norm[better]
                found |= is_adv
                m1.mul_(0.9).add_(grad, alpha=0.1)
                m2.mul_(0.999).addcmul_(grad, grad, value=0.001)
                step = self.lr * (m1 / (1 - 0.9**t)) / ((m2 / (1 - 0.999**t)).sqrt() + 1e-8)
                w = (w.detach() - step)
            if bool((best_norm[rows] <= stop).all()):
                break
        return found
