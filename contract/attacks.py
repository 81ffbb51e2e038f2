"""Attacks, norms, what supports what, and the limits on their budgets."""

from __future__ import annotations

from enum import StrEnum


class Norm(StrEnum):
    """The threat model's norm; ``eps`` is in pixel units of [0, 1] images."""

    LINF = "linf"
    L2 = "l2"
    L1 = "l1"


class Attack(StrEnum):
    FGSM = "fgsm"
    PGD = "pgd"
    APGD_CE = "apgd-ce"
    APGD_DLR = "apgd-dlr"
    APGD_T = "apgd-t"
    FAB_T = "fab-t"
    SQUARE = "square"
    CW = "cw"
    AUTOATTACK = "autoattack"  # AutoAttack's standard protocol
    FAST = "fast"
    EFFICIENT = "efficient"  # a cheaper cascade, escalating examples near the boundary


ALL_NORMS = frozenset(Norm)

SUPPORTED_NORMS: dict[Attack, frozenset[Norm]] = {
    Attack.FGSM: ALL_NORMS, Attack.PGD: ALL_NORMS, Attack.APGD_CE: ALL_NORMS,
    Attack.APGD_DLR: ALL_NORMS, Attack.APGD_T: ALL_NORMS, Attack.FAB_T: ALL_NORMS,
    Attack.SQUARE: frozenset({Norm.LINF, Norm.L2}), Attack.CW: frozenset({Norm.L2}),
    Attack.AUTOATTACK: ALL_NORMS, Attack.FAST: ALL_NORMS, Attack.EFFICIENT: ALL_NORMS,
}
"""The norms each attack runs under (Square has no l_1 version, C&W is an l_2 attack)."""

TARGETABLE = frozenset({Attack.PGD, Attack.APGD_CE, Attack.APGD_DLR, Attack.APGD_T,
                        Attack.FAB_T})
"""Attacks with ``targeted: true`` variants."""

STEP_SIZE_ATTACKS = frozenset({Attack.PGD})
"""Attacks that take a ``step_size`` (the others choose their own)."""

QUERY_ATTACKS = frozenset({Attack.SQUARE, Attack.AUTOATTACK})
"""Attacks that take a ``queries`` budget (Square, and AutoAttack's Square stage)."""

# Inclusive bounds of the budgets an ``adversarial`` or ``robustness_curve`` entry may ask for.
STEPS = (1, 100_000)
RESTARTS = (1, 1000)
QUERIES = (1, 1_000_000)
N_TARGETS = (1, 999)
AUDIT = (1, 100_000)
EPS_VALUES = (1, 32)  # how many eps one entry may list
CURVE_EPS_VALUES = (1, 64)


def unsupported(attack: Attack, norm: Norm) -> str | None:
    """Why ``attack`` cannot run under ``norm``, or None when it can."""
    if norm in SUPPORTED_NORMS[attack]:
        return None
    ok = ", ".join(sorted(n.value for n in SUPPORTED_NORMS[attack]))
    return f"attack {attack.value!r} does not support norm {norm.value!r} (supported: {ok})"
