"""Adversarial training: the methods, optimisers and schedules the API offers and the engine
runs, the bounds and method-aware defaults of a training spec, and the spec itself.

A request (:class:`TrainingIn`, or a :class:`SweepIn` grid of them) names the dataset, the
architecture, the method and the threat (:class:`ThreatIn`,
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
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

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


# The requests: one training (POST /trainings) and a grid of them (POST /sweeps), with the
# shared fields written once.

class TrainingFields(BaseModel):
    """The fields a training and a sweep share (a sweep's apply to each of its trainings);
    what is left out takes the method's default (:data:`DEFAULTS`)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(min_length=1, max_length=200,
                         description="a built-in dataset's name, or an uploaded one's id or "
                                     "name, to train on")
    dataset_params: dict[str, Any] = Field(
        default_factory=dict,
        description="a built-in's generator parameters, e.g. {\"correlation\": 0.8}")
    architecture: str = Field(min_length=1, max_length=100,
                              description="a built-in architecture's name, e.g. `resnet18`")
    epochs: int | None = Field(None, ge=EPOCHS_RANGE[0], le=EPOCHS_RANGE[1],
                               description="passes over the training split (default: the "
                                           "method's)")
    batch_size: int | None = Field(None, ge=BATCH_SIZE_RANGE[0], le=BATCH_SIZE_RANGE[1],
                                   description="examples per step (default: the method's)")
    lr: float | None = Field(None, gt=0, le=LR_MAX,
                             description="the initial learning rate (default: the method's)")
    seed: int = Field(0, ge=0, le=2**31 - 1,
                      description="fixes initialization, data order and attacks")
    optimizer: Optimizer | None = Field(None, description="`sgd` or `adam` (default: the "
                                                          "method's)")
    lr_schedule: LrSchedule | None = Field(None, description="`constant` or `cosine` (default: "
                                                             "the method's)")
    train_examples: int | None = Field(None, ge=2, description="train on this many examples of "
                                                               "the training split (default: "
                                                               "all)")
    eval_examples: int = Field(1000, ge=1, le=100_000,
                               description="held-out examples the per-epoch history is measured "
                                           "on")
    public: bool = Field(False, description="make the trained models' evaluations (and a "
                                            "sweep's report) public: on the public "
                                            "leaderboard, their reports open to anyone")


class TrainingIn(TrainingFields):
    """The training spec (docs/API.md, "Trainings") and a few optional extras."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "dataset": "shapes-32", "architecture": "resnet18", "method": "pgd",
        "threat": {"norm": "linf", "eps": 0.0314, "steps": 7}, "epochs": 10,
        "evaluate": "standard"}]})

    method: Method = Field(description="`standard`, `pgd`, `fgsm_rs` (fast FGSM with a random "
                                       "start) or `trades`")
    threat: ThreatIn | None = Field(None, description="what to train against; required unless "
                                                      "`method` is `standard`")
    evaluate: str | list[dict[str, Any]] | None = Field(
        None, description="a suite (preset name or entries) to evaluate the trained model with")
    name: str | None = Field(None, min_length=1, max_length=200,
                             description="a name for the trained model")
    beta: float = Field(BETA, gt=0, le=BETA_MAX,
                        description="TRADES' robustness weight; `trades` only")
    n_examples: int | None = Field(None, ge=1, le=10_000_000,
                                   description="the `evaluate` run measures on this many examples")

    @model_validator(mode="after")
    def _threat_fits_the_method(self) -> TrainingIn:
        if self.threat is None and self.method is not Method.STANDARD:
            raise ValueError(f"method {self.method.value!r} needs a threat "
                             "{norm, eps, steps?, step_size?}")
        if (self.method is Method.FGSM_RS and self.threat is not None
                and self.threat.steps not in (None, 1)):
            raise ValueError("fgsm_rs takes exactly one step; leave threat.steps out or set 1")
        if self.beta != BETA and self.method is not Method.TRADES:
            raise ValueError("beta applies to method 'trades' only")
        return self


MAX_MODELS = 32


class SweepIn(TrainingFields):
    """A grid over methods and threats; every other field is shared by all its trainings."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "dataset": "shapes-32", "architecture": "resnet18", "methods": ["standard", "pgd"],
        "threats": {"linf": [0.0157, 0.0314]}, "epochs": 5, "suite": "standard"}]})

    methods: list[Method] = Field(min_length=1, max_length=4,
                                  description="training methods, each once: `standard`, `pgd`, "
                                              "`fgsm_rs`, `trades`")
    threats: dict[Norm, list[Eps]] = Field(
        default_factory=dict,
        description="per norm (`l1`, `l2`, `linf`) 1 to 8 budgets; every non-standard method "
                    "trains once at each")
    steps: int | None = Field(None, ge=THREAT_STEPS[0], le=THREAT_STEPS[1],
                              description="attack steps per batch (default: each method's)")
    suite: str | list[dict[str, Any]] | None = Field(
        None, description="the suite (preset name or entries) every trained model is evaluated "
                          "with")
    n_examples: int | None = Field(None, ge=1, le=10_000_000,
                                   description="every evaluation measures on this many examples")

    @model_validator(mode="after")
    def _grid(self) -> SweepIn:
        if len(set(self.methods)) != len(self.methods):
            raise ValueError("methods must not repeat")
        for norm, values in self.threats.items():
            if not 1 <= len(values) <= 8 or len(set(values)) != len(values):
                raise ValueError(f"threats.{norm.value} takes 1 to 8 distinct eps values")
        if any(m is not Method.STANDARD for m in self.methods) and not self.threats:
            raise ValueError("adversarial methods need threats, e.g. {\"linf\": [0.0157, 0.0314]}")
        if len(self.grid()) > MAX_MODELS:
            raise ValueError(f"the grid has {len(self.grid())} models; at most {MAX_MODELS}")
        return self

    def grid(self) -> list[tuple[Method, Norm | None, float | None]]:
        """Each model of the sweep: standard once, every other method at every (norm, eps)."""
        out: list[tuple[Method, Norm | None, float | None]] = []
        for method in self.methods:
            if method is Method.STANDARD:
                out.append((method, None, None))
                continue
            out += [(method, norm, eps) for norm, values in self.threats.items()
                    for eps in values]
        return out
