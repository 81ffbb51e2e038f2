"""What every attack shares: the model as attacks see it, the losses, and the result type.

Attacks are written for speed on batches: one forward and one backward per step for the
whole batch (all restarts concatenated where that is how the attack runs), gradients with
``torch.autograd.grad`` w.r.t. the input only, and examples that are already misclassified
dropped from the batch ("compaction") so the remaining steps cost only what is still robust.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.engine.threats import Norm, Radius

LossFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]
"""``(logits, labels, targets) -> per-example loss [N]`` to be *maximised* by the attack."""


class Forward:
    """The model as attacks call it.

    It may run under bf16 autocast (CUDA) and in channels_last (faster for convolutions on
    GPUs and, through oneDNN, on CPUs); logits always come back as float32. ``fp32`` is the
    reference forward without autocast, used to confirm a break before it counts. ``calls``
    counts forwards so tests and benchmarks can see how much work an attack did.
    """

    def __init__(self, model: nn.Module, amp: bool = False, channels_last: bool = False) -> None:
        self.model = model
        self.amp = amp
        self.channels_last = channels_last
        self.calls = 0
        self.examples = 0

    def __call__(self, x: Tensor) -> Tensor:
        self.calls += 1
        self.examples += int(x.shape[0])
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.model(x)
        return out.float()

    def fp32(self, x: Tensor) -> Tensor:
        self.calls += 1
        self.examples += int(x.shape[0])
        with torch.autocast(x.device.type, enabled=False):
            return self.model(x).float()

    @torch.inference_mode()
    def predict(self, x: Tensor) -> Tensor:
        return self(x).argmax(1)

    def loss_grad(self, x: Tensor, y: Tensor, loss: LossFn,
                  target: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Logits, per-example loss and d(sum loss)/dx in one forward and one backward."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logits = self(xg)
            values = loss(logits, y, target)
            (grad,) = torch.autograd.grad(values.sum(), xg)
        return logits.detach(), values.detach(), grad.detach()


def ce_loss(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    if target is not None:
        return -F.cross_entropy(logits, target, reduction="none")
    return F.cross_entropy(logits, y, reduction="none")


def dlr_loss(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020): scale- and shift-invariant margin.

    Untargeted: -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3). Targeted (APGD-T):
    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2). Indices clamp for fewer than 4 classes.
    """
    c = logits.shape[1]
    zs = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    p3 = zs[:, min(2, c - 1)]
    if target is not None:
        z_t = logits.gather(1, target[:, None]).squeeze(1)
        p4 = zs[:, min(3, c - 1)]
        return -(z_y - z_t) / (zs[:, 0] - 0.5 * (p3 + p4) + 1e-12)
    return -margin(logits, y) / (zs[:, 0] - p3 + 1e-12)


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """z_y - max_{j != y} z_j: negative exactly when the example is misclassified."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return z_y - other


def margin_loss(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    if target is not None:
        z_t = logits.gather(1, target[:, None]).squeeze(1)
        return z_t - logits.gather(1, y[:, None]).squeeze(1)
    return -margin(logits, y)


class Loss(StrEnum):
    CE = "ce"
    DLR = "dlr"
    MARGIN = "margin"


LOSSES: dict[Loss, LossFn] = {Loss.CE: ce_loss, Loss.DLR: dlr_loss, Loss.MARGIN: margin_loss}


@dataclass
class AttackOutput:
    """Adversarial inputs (inside the ball and the box) and which ones the attack believes
    are misclassified. The runner confirms every claimed success in fp32 before counting it."""

    x_adv: Tensor
    success: Tensor  # bool [N]


class Attack(ABC):
    """An attack on a batch: ``run(fwd, x, y, eps, generator) -> AttackOutput``.

    ``clean_logits`` (fp32 logits of ``x``) lets targeted attacks pick their targets without
    a second clean forward; ``eps`` may be a float or a per-example tensor.
    """

    norm: Norm
    name: str = "attack"

    @abstractmethod
    def run(self, fwd: Forward, x: Tensor, y: Tensor, eps: Radius, generator: torch.Generator,
            clean_logits: Tensor | None = None) -> AttackOutput: ...


def top_targets(clean_logits: Tensor, y: Tensor, n_targets: int) -> Tensor:
    """The ``n_targets`` most likely wrong classes per example, most likely first ``[N, k]``."""
    order = clean_logits.masked_fill(
        torch.nn.functional.one_hot(y, clean_logits.shape[1]).bool(), float("-inf")
    ).argsort(dim=1, descending=True)
    return order[:, : min(n_targets, clean_logits.shape[1] - 1)]


def over_targets(fwd: Forward, x: Tensor, y: Tensor, clean_logits: Tensor | None,
                 n_targets: int,
                 attack: Callable[[Tensor, Tensor], AttackOutput]) -> AttackOutput:
    """Targeted attacks (APGD-T, PGD-T) try the top wrong classes in turn; each target runs
    only on the examples no earlier target broke. ``attack(index, targets)`` attacks
    ``x[index]`` towards ``targets``."""
    if clean_logits is None:
        with torch.inference_mode():
            clean_logits = fwd.fp32(x)
    targets = top_targets(clean_logits, y, n_targets)
    out = x.clone()
    success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for k in range(targets.shape[1]):
        todo = (~success).nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        res = attack(todo, targets[todo, k])
        out[todo] = res.x_adv
        success[todo] = res.success
    return AttackOutput(out, success)


def restrict(state: dict[str, Tensor], keep: Tensor) -> dict[str, Tensor]:
    """Keep the rows ``keep`` (a bool mask or an index) of every per-example state tensor."""
    return {k: v[keep] for k, v in state.items()}
