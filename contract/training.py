"""Adversarial training: the methods, optimisers and schedules the API offers and the engine
runs."""

from __future__ import annotations

from enum import StrEnum


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
