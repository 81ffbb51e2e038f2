"""Method-aware defaults, so a training spec can name just the dataset, the architecture, the
method and the threat. What a spec leaves out is filled here, and the job record shows the
filled values.

| method   | optimizer | lr   | schedule | inner steps | step size        |
|----------|-----------|------|----------|-------------|------------------|
| standard | sgd       | 0.05 | cosine   | -           | -                |
| pgd      | sgd       | 0.05 | cosine   | 7 (PGD-7)   | 2.5 * eps / steps |
| fgsm_rs  | sgd       | 0.05 | cosine   | 1           | 1.25 * eps       |
| trades   | sgd       | 0.05 | cosine   | 10          | 2.5 * eps / steps |

Every method: 10 epochs, batch size 128; SGD has momentum 0.9 and weight decay 5e-4. PGD-7
with step 2.5 * eps / 7 is Madry et al.'s CIFAR-10 recipe; FGSM-RS's 1.25 * eps step is
Wong et al.'s (2020), trained with the guard that restores the best epoch when held-out PGD
accuracy collapses; TRADES takes 10 steps as Zhang et al. (2019) do. Adam, when asked for,
defaults to lr 0.001.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.trainings.schemas import LrSchedule, Method, Optimizer

EPOCHS = 10
BATCH_SIZE = 128
ADAM_LR = 0.001


@dataclass(frozen=True)
class MethodDefaults:
    optimizer: Optimizer
    lr: float
    lr_schedule: LrSchedule
    steps: int


DEFAULTS = {
    Method.STANDARD: MethodDefaults(Optimizer.SGD, 0.05, LrSchedule.COSINE, 10),
    Method.PGD: MethodDefaults(Optimizer.SGD, 0.05, LrSchedule.COSINE, 7),
    Method.FGSM_RS: MethodDefaults(Optimizer.SGD, 0.05, LrSchedule.COSINE, 1),
    Method.TRADES: MethodDefaults(Optimizer.SGD, 0.05, LrSchedule.COSINE, 10),
}


def fill(method: Method, *, optimizer: Optimizer | None, lr: float | None,
         lr_schedule: LrSchedule | None, steps: int | None) -> MethodDefaults:
    """The spec's own values where it gives them, the method's defaults elsewhere."""
    d = DEFAULTS[method]
    opt = optimizer or d.optimizer
    default_lr = d.lr if opt is d.optimizer else ADAM_LR
    return MethodDefaults(optimizer=opt, lr=lr if lr is not None else default_lr,
                          lr_schedule=lr_schedule or d.lr_schedule,
                          steps=steps if steps is not None else d.steps)
