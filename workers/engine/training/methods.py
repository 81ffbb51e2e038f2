"""Training objectives: standard, PGD (Madry), FGSM with random start (Wong), TRADES (Zhang).

Each method turns a clean batch into the loss the optimiser minimises. The inner
maximisations use the engine's threat models (``random_init``, ``step`` and the exact
``project`` onto the l_p ball intersected with the [0, 1] box), so every norm the engine
attacks in is also a norm it trains in.

Training differs from evaluation in one point that matters: the evaluation attacks stop on
an example as soon as it is misclassified (the right thing when measuring: one break is
enough), while adversarial training takes every step and trains on the last iterate, as
Madry et al. do. Stopping early would hand the optimiser examples just across the boundary
(the weaker "early-stopped PGD" of Zhang et al. 2020), a different method.

The adversarial examples are generated with the model in eval mode (as TRADES does), so
BatchNorm statistics are not updated by attack forwards; the loss is then taken in train mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from contract.training import Method
from workers.engine.threats import Norm, Threat, threat_for


@dataclass(frozen=True)
class ThreatSpec:
    """The l_p ball the inner maximisation searches; ``step_size`` None is the method's default
    (PGD and TRADES: 2.5 * eps / steps; FGSM-RS: 1.25 * eps, Wong et al.'s choice)."""

    norm: Norm
    eps: float
    steps: int = 10
    step_size: float | None = None

    def pgd_step(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps

    def fgsm_step(self) -> float:
        return self.step_size if self.step_size is not None else 1.25 * self.eps


def pgd_examples(model: nn.Module, x: Tensor, y: Tensor, threat: Threat, eps: float,
                 steps: int, step_size: float, generator: torch.Generator) -> Tensor:
    """Madry et al. (ICLR 2018): a random start in the ball, ``steps`` steepest-ascent steps
    on the cross-entropy, each projected back; returns the last iterate."""
    x_adv = threat.random_init(x, eps, generator)
    with torch.enable_grad():
        for _ in range(steps):
            xg = x_adv.detach().requires_grad_(True)
            loss = F.cross_entropy(model(xg), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, xg)
            x_adv = threat.project(threat.step(xg.detach(), grad, step_size), x, eps)
    return x_adv.detach()


def trades_examples(model: nn.Module, x: Tensor, threat: Threat, eps: float, steps: int,
                    step_size: float, generator: torch.Generator) -> Tensor:
    """Zhang et al. (ICML 2019): maximise KL(f(x) || f(x')) from x + 0.001 * N(0, I)."""
    with torch.no_grad():
        p_clean = F.softmax(model(x), dim=1)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_adv = threat.project(x + 0.001 * noise, x, eps)
    with torch.enable_grad():
        for _ in range(steps):
            xg = x_adv.detach().requires_grad_(True)
            loss = F.kl_div(F.log_softmax(model(xg), dim=1), p_clean, reduction="sum")
            (grad,) = torch.autograd.grad(loss, xg)
            x_adv = threat.project(threat.step(xg.detach(), grad, step_size), x, eps)
    return x_adv.detach()


def batch_loss(method: Method, model: nn.Module, x: Tensor, y: Tensor, spec: ThreatSpec,
               beta: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The loss to minimise on this batch and the logits of the inputs it was taken on.

    The model comes in train mode and leaves in train mode; attacks run in eval mode.
    """
    if method is Method.STANDARD:
        logits = model(x)
        return F.cross_entropy(logits, y), logits
    threat = threat_for(spec.norm)
    model.eval()
    try:
        if method is Method.PGD:
            x_adv = pgd_examples(model, x, y, threat, spec.eps, spec.steps, spec.pgd_step(),
                                 generator)
        elif method is Method.FGSM_RS:
            x_adv = pgd_examples(model, x, y, threat, spec.eps, 1, spec.fgsm_step(), generator)
        else:
            x_adv = trades_examples(model, x, threat, spec.eps, spec.steps, spec.pgd_step(),
                                    generator)
    finally:
        model.train()
    if method is Method.TRADES:
        logits_clean = model(x)
        logits_adv = model(x_adv)
        robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1),
                          reduction="batchmean")
        return F.cross_entropy(logits_clean, y) + beta * robust, logits_adv
    logits = model(x_adv)
    return F.cross_entropy(logits, y), logits
