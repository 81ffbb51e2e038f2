"""Adversarial training: standard, PGD, FGSM-RS and TRADES under l_inf / l_2 / l_1 threats.

``train(spec, train_data, held_out)`` runs the loop of :mod:`.loop`; the objectives are in
:mod:`.methods` and the per-epoch safetensors checkpoint in :mod:`.checkpoint`.
"""

from workers.engine.training.loop import (
    LrSchedule,
    Optimizer,
    Trained,
    TrainingError,
    TrainSpec,
    measure,
    train,
)
from workers.engine.training.methods import Method, ThreatSpec

__all__ = ["LrSchedule", "Method", "Optimizer", "ThreatSpec", "TrainSpec", "Trained",
           "TrainingError", "measure", "train"]
