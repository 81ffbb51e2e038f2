"""FGSM: one signed-gradient step of size eps.

Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015.
For l_2 / l_1 the step is the steepest l_p step of length eps (the "fast gradient method").
Kept as a cheap, weak baseline: its robust accuracy is an upper bound, never the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from workers.engine.attacks.base import LOSSES, Attack, AttackOutput, Forward, Loss
from workers.engine.threats import Norm, Radius, threat_for


@dataclass(frozen=True)
class FGSM(Attack):
    norm: Norm = Norm.LINF
    loss: Loss = Loss.CE
    name: str = "fgsm"

    def run(self, fwd: Forward, x: Tensor, y: Tensor, eps: Radius, generator: torch.Generator,
            clean_logits: Tensor | None = None) -> AttackOutput:
        threat = threat_for(self.norm)
        _, _, grad = fwd.loss_grad(x, y, LOSSES[self.loss])
        x_adv = threat.project(threat.step(x, grad, eps), x, eps)
        with torch.inference_mode():
            success = fwd.wrong(x_adv, fwd(x_adv), y)
        return AttackOutput(x_adv, success)
