"""The original AutoAttack code (``pyautoattack``, by its authors) as the reference, and a
model wrapper that counts the passes any library spends, the same way the engine counts its
own (example-forwards, and example-backwards that reach the input)."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from workers.engine.threats import Norm

AA_NORMS = {Norm.LINF: "Linf", Norm.L2: "L2", Norm.L1: "L1"}


class _Tap(torch.autograd.Function):
    """Identity whose backward counts the rows whose gradient reached this forward's input."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor,
                counter: Counting) -> Tensor:
        ctx.counter = counter  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,
                 grad: Tensor) -> tuple[Tensor, None]:
        ctx.counter.backwards += int(grad.shape[0])  # type: ignore[attr-defined]
        return grad, None


class Counting(nn.Module):
    """``inner`` with counters: ``forwards`` (example-forwards) and ``backwards``
    (example-backwards through to the input, one per forward whose input gradient was taken)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.forwards = 0
        self.backwards = 0

    def forward(self, x: Tensor) -> Tensor:
        self.forwards += int(x.shape[0])
        if x.requires_grad:
            x = _Tap.apply(x, self)
        out: Tensor = self.inner(x)
        return out

    def reset(self) -> None:
        self.forwards = self.backwards = 0


def pyautoattack_robust(model: nn.Module, x: Tensor, y: Tensor, norm: Norm, eps: float,
                        seed: int = 0, steps: int = 100, queries: int = 5000,
                        n_targets: int = 9, batch_size: int = 500) -> Tensor:
    """Per-example robust flags under AutoAttack "standard" (APGD-CE, APGD-T, FAB-T, Square)
    as its authors' code runs it; ``steps``/``queries`` below 100/5000 shrink the budget of
    every stage alike (for tests and CPU benchmarks; the protocol is otherwise unchanged)."""
    from pyautoattack import AutoAttack

    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    adversary = AutoAttack(model, norm=AA_NORMS[norm], eps=eps, seed=seed, version="standard",
                           device=x.device)
    adversary.verbose = False
    adversary.apgd.n_iter = steps
    adversary.apgd_targeted.n_iter = steps
    adversary.apgd_targeted.n_target_classes = n_targets
    adversary.fab.n_iter = steps
    adversary.fab.n_target_classes = n_targets
    adversary.square.n_queries = queries
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    with torch.no_grad():
        return model(x_adv).argmax(1) == y
