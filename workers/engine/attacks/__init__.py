"""Adversarial attacks, one module per attack (see each module's docstring for the paper)."""

from workers.engine.attacks.apgd import APGD, APGDTargeted
from workers.engine.attacks.base import Attack, AttackOutput, Forward, Loss
from workers.engine.attacks.cw import CarliniWagnerL2
from workers.engine.attacks.fab import FABTargeted
from workers.engine.attacks.fgsm import FGSM
from workers.engine.attacks.pgd import PGD, PGDTargeted, Schedule
from workers.engine.attacks.square import Square

__all__ = [
    "APGD", "FGSM", "PGD", "APGDTargeted", "Attack", "AttackOutput", "CarliniWagnerL2",
    "FABTargeted", "Forward", "Loss", "PGDTargeted", "Schedule", "Square",
]
