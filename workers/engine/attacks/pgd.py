"""PGD: projected gradient ascent with random starts.

Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018. Distance: any :class:`Norm` (l_1 uses sparse top-k steps).

All restarts run at once, concatenated along the batch, so one forward and one backward per
step serve every restart of every example. Restart r draws its start from the generator in
order r = 0, 1, ..., so restart 0 of a multi-restart run is exactly the single-restart run and
more restarts can only add breaks. An example is the worst case over its restarts and its
iterates: the first misclassified iterate is kept and the example leaves the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import Tensor

from workers.engine.attacks.base import (
    LOSSES,
    Attack,
    AttackOutput,
    Forward,
    Loss,
    over_targets,
    restrict,
)
from workers.engine.threats import Norm, Radius, per_example, threat_for


class Schedule(StrEnum):
    CONSTANT = "constant"
    COSINE = "cosine"  # large steps first, fine steps at the end


@dataclass(frozen=True)
class PGD(Attack):
    norm: Norm = Norm.LINF
    steps: int = 10
    restarts: int = 1
    step_size: float | None = None  # absolute; default 2.5 * eps / steps (Madry et al.)
    schedule: Schedule = Schedule.CONSTANT
    random_start: bool = True
    loss: Loss = Loss.CE
    until_target: bool = False  # with a target: done only when the target class wins
    name: str = "pgd"

    def step_at(self, base: Tensor, i: int) -> Tensor:
        if self.schedule is Schedule.COSINE:
            return base * 0.5 * (1.0 + math.cos(math.pi * i / max(self.steps, 1)))
        return base

    def run(self, fwd: Forward, x: Tensor, y: Tensor, eps: Radius, generator: torch.Generator,
            clean_logits: Tensor | None = None) -> AttackOutput:
        return self.attack(fwd, x, y, eps, generator, None)

    def attack(self, fwd: Forward, x: Tensor, y: Tensor, eps: Radius,
               generator: torch.Generator, target: Tensor | None) -> AttackOutput:
        """Untargeted when ``target`` is None, else towards ``target`` (any error counts)."""
        threat = threat_for(self.norm)
        loss = LOSSES[self.loss]
        n = x.shape[0]
        e = per_example(eps, x)
        alpha = (e * 2.5 / max(self.steps, 1) if self.step_size is None
                 else torch.full_like(e, self.step_size))
        restarts = max(self.restarts, 1)
        starts = [threat.random_init(x, e, generator) if self.random_start else x
                  for _ in range(restarts)]
        owner = torch.arange(n, device=x.device).repeat(restarts)
        st = {"x": x.repeat(restarts, 1, 1, 1), "y": y.repeat(restarts),
              "x_adv": torch.cat(starts), "owner": owner, "eps": e.repeat(restarts),
              "alpha": alpha.repeat(restarts)}
        if target is not None:
            st["target"] = target.repeat(restarts)
        out = x.clone()
        success = torch.zeros(n, dtype=torch.bool, device=x.device)
        best_loss = torch.full((n,), float("-inf"), device=x.device)
        for i in range(self.steps + 1):
            if i < self.steps:
                logits, values, grad = fwd.loss_grad(st["x_adv"], st["y"], loss,
                                                     st.get("target"))
            else:
                with torch.inference_mode():
                    logits = fwd(st["x_adv"])
                values = loss(logits, st["y"], st.get("target"))
            if self.until_target and target is not None:
                broke = fwd.confirmed(st["x_adv"], logits.argmax(1) == st["target"], st["y"],
                                      st["target"])
            else:
                broke = fwd.wrong(st["x_adv"], logits, st["y"])
            rows = first_per_owner(broke, st["owner"])
            out[st["owner"][rows]] = st["x_adv"][rows]
            success[st["owner"][rows]] = True
            # Keep the highest-loss iterate of examples not (yet) broken.
            best_loss.scatter_reduce_(0, st["owner"], values, reduce="amax")
            is_best = (values >= best_loss[st["owner"]]) & ~success[st["owner"]]
            rows = first_per_owner(is_best, st["owner"])
            out[st["owner"][rows]] = st["x_adv"][rows]
            live = ~success[st["owner"]]
            if i == self.steps or not bool(live.any()):
                break
            if not bool(live.all()):
                st = restrict(st, live)
                grad = grad[live]
            step = self.step_at(st["alpha"], i)
            st["x_adv"] = threat.project(threat.step(st["x_adv"], grad, step), st["x"], st["eps"])
        return AttackOutput(out, success)


def first_per_owner(mask: Tensor, owner: Tensor) -> Tensor:
    """The rows where ``mask`` holds, only the first of each owner's: an example's restarts
    share its owner, and writing two rows to one place (``out[owner[mask]] = ...``) lets
    threads race for which one stays, so the kept iterate, and an example near the boundary
    with it, would change from run to run."""
    rows = mask.nonzero().squeeze(1)
    if rows.numel() == 0:
        return rows
    owners = owner[rows]
    unique, inverse = torch.unique(owners, return_inverse=True)
    order = torch.arange(rows.numel(), device=rows.device)
    first = torch.full((unique.numel(),), rows.numel(), dtype=torch.long, device=rows.device)
    first.scatter_reduce_(0, inverse, order, reduce="amin")
    return rows[first]


@dataclass(frozen=True)
class PGDTargeted(Attack):
    """PGD towards each of the ``n_targets`` most likely wrong classes in turn (still-robust
    examples only); the loss is the targeted version of ``base.loss``."""

    base: PGD = PGD()
    n_targets: int = 9
    name: str = "pgd-t"

    @property
    def norm(self) -> Norm:  # type: ignore[override]
        return self.base.norm

    def run(self, fwd: Forward, x: Tensor, y: Tensor, eps: Radius, generator: torch.Generator,
            clean_logits: Tensor | None = None) -> AttackOutput:
        e = per_example(eps, x)
        return over_targets(fwd, x, y, clean_logits, self.n_targets, lambda i, t: self.base.attack(
            fwd, x[i], y[i], e[i], generator, t))
