"""Adversarial training: the methods, optimisers and schedules the API offers and the engine
runs, the bounds and method-aware defaults of a training spec, and the spec itself.

A request names the dataset, the architecture, the method and the threat (:class:`ThreatIn`,
whose ``steps`` and ``step_size`` may be left out); the API fills what it leaves out
(:func:`fill`, :func:`fill_threat`) and stores the result, which the worker reads back as a
:class:`TrainingSpec`, the typed spec the engine trains by.

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
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from contract.attacks import Norm


class Method(StrEnum):
    STANDARD = "standard"
    PGD = "pgd"  # Madry et al. 2018
    FGSM_RS = "fgsm_rs"  # Wong et al. 2020
    TRADES = "trades"  # Zhang et al. 2019


class Optimizer(StrEnum):
    SGD = "sgd"  # momentum 0.9, weight decay 5e-4 (the adversarial-training standard)
    ADAM = "adam"


class LrSchedule(StrEnum):
    CONSTANT = "constant"
    COSINE = "cosine"  # per step, from lr down to 0 over the whole run


# Inclusive bounds of what a training spec may ask for (``lr`` and ``beta``: (0, max]).
EPOCHS_RANGE = (1, 1000)
BATCH_SIZE_RANGE = (2, 4096)
LR_MAX = 10
THREAT_STEPS = (1, 1000)
EPS_MAX = 1000
BETA_MAX = 100

EPOCHS = 10
BATCH_SIZE = 128
ADAM_LR = 0.001
BETA = 6.0  # TRADES' trade-off (Zhang et al. use 6 on CIFAR-10)

Eps = Annotated[float, Field(gt=0, le=EPS_MAX)]


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


class ThreatIn(BaseModel):
    """The perturbations adversarial training trains against."""

    model_config = ConfigDict(extra="forbid")

    norm: Norm = Field(description="the threat norm: `l1`, `l2` or `linf`")
    eps: float = Field(gt=0, le=EPS_MAX, description="the perturbation budget, in pixel units "
                                                     "of images scaled to [0, 1]")
    steps: int | None = Field(None, ge=THREAT_STEPS[0], le=THREAT_STEPS[1],
                              description="attack steps per batch (default: the method's)")
    step_size: float | None = Field(None, gt=0, le=1000,
                                    description="the attack's step size (default: from `eps` "
                                                "and `steps`)")


class Threat(BaseModel):
    """A training threat with its defaults filled in: what the job record shows and the
    engine trains against (for ``standard``, only what the held-out robust accuracy uses)."""

    model_config = ConfigDict(extra="forbid")

    norm: Norm
    eps: float = Field(gt=0, le=EPS_MAX)
    steps: int = Field(ge=THREAT_STEPS[0], le=THREAT_STEPS[1])
    step_size: float = Field(gt=0)


def fill_threat(method: Method, threat: ThreatIn, steps: int) -> Threat:
    """``threat`` with ``steps`` (the method's, see :func:`fill`) and the method's step size
    where it gives none: FGSM-RS takes one step of 1.25 * eps, the others 2.5 * eps / steps."""
    if method is Method.FGSM_RS:
        steps = 1
        step_size = threat.step_size if threat.step_size is not None else 1.25 * threat.eps
    else:
        step_size = (threat.step_size if threat.step_size is not None
                     else 2.5 * threat.eps / steps)
    return Threat(norm=threat.norm, eps=threat.eps, steps=steps, step_size=step_size)


class TrainingSpec(BaseModel):
    """What the engine trains: a request with every default filled in."""

    model_config = ConfigDict(extra="forbid")

    architecture: str = Field(min_length=1, max_length=100)
    method: Method
    threat: Threat
    epochs: int = Field(ge=EPOCHS_RANGE[0], le=EPOCHS_RANGE[1])
    batch_size: int = Field(ge=BATCH_SIZE_RANGE[0], le=BATCH_SIZE_RANGE[1])
    lr: float = Field(gt=0, le=LR_MAX)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    optimizer: Optimizer = Optimizer.SGD
    lr_schedule: LrSchedule = LrSchedule.COSINE
    beta: float = Field(BETA, gt=0, le=BETA_MAX)
