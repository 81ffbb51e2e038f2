"""The suite accepts the efficient preset and the audit, and hands the engine exactly what its
``adversarial`` benchmark runs."""

from __future__ import annotations

import pytest

from contract.suite import Adversarial
from core.errors import Invalid
from service.datasets.schemas import Capabilities
from service.evaluations.suite import expand
from workers.engine.benchmarks import parse
from workers.engine.benchmarks.adversarial import AttackParams
from workers.engine.types import EvalData

CAPS = Capabilities(name="d", has_masks=False, has_groups=False, regenerable=False,
                    default_eps={"linf": 8 / 255, "l2": 0.5, "l1": 12.0})


def test_efficient_with_audit_reaches_the_engine() -> None:
    import torch

    [entry] = expand([{"benchmark": "adversarial", "attack": "efficient", "audit": 25}], CAPS)
    assert entry == {"benchmark": "adversarial", "attack": "efficient", "norm": "linf",
                     "eps": 8 / 255, "targeted": False, "audit": 25}
    data = EvalData(torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 2, 3]), list("abcd"))
    typed = parse(entry)
    assert isinstance(typed, Adversarial)
    params = AttackParams.of(typed, data)
    assert params.attack.value == "efficient"
    assert params.audit == 25


def test_an_audit_of_no_examples_is_refused() -> None:
    with pytest.raises((Invalid, ValueError)):
        expand([{"benchmark": "adversarial", "attack": "efficient", "audit": 0}], CAPS)
