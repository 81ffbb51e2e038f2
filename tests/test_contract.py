"""What the API validates must match what the engine runs (they cannot import each other)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import pytest
import torch

from contract import attacks as contract
from contract.attacks import Attack
from contract.metrics import BENCHMARK_METRICS
from service.errors import Invalid
from service.evaluations import suite
from workers.engine import benchmarks
from workers.engine.benchmarks.adversarial import parse_params
from workers.engine.benchmarks.natural.corruptions import CORRUPTIONS
from workers.engine.models import shape_table
from workers.engine.threats import Norm
from workers.engine.types import BenchmarkError, EvalData

ROOT = Path(__file__).resolve().parent.parent


def test_norms_and_corruptions_agree() -> None:
    assert {n.value for n in contract.Norm} == {n.value for n in Norm}
    assert set(suite.CORRUPTIONS) == set(CORRUPTIONS)


CAPS = suite.Capabilities(name="t", has_masks=True, has_groups=True, regenerable=True,
                          default_eps={"linf": 0.03, "l2": 0.5, "l1": 8.0})
DATA = EvalData(x=torch.rand(4, 3, 8, 8), y=torch.arange(4), class_names=list("abcd"))
EPS = {"linf": [0.01, 0.03], "l2": 0.5, "l1": 4.0}


def _api_accepts(entry: dict[str, Any]) -> bool:
    try:
        suite.expand([entry], CAPS)
    except Invalid:
        return False
    return True


def _engine_accepts(entry: dict[str, Any]) -> bool:
    try:
        parse_params({k: v for k, v in entry.items() if k != "benchmark"}, DATA)
    except BenchmarkError:
        return False
    return True


def _entries() -> list[dict[str, Any]]:
    """The whole attack x norm x targeted table, every budget at and past its bounds, and
    each attack with the options only some attacks take."""
    out: list[dict[str, Any]] = []
    for attack in Attack:
        for norm in contract.Norm:
            base = {"benchmark": "adversarial", "attack": attack.value, "norm": norm.value,
                    "eps": EPS[norm.value]}
            out += [base, {**base, "targeted": True}, {**base, "step_size": 0.01},
                    {**base, "queries": 100}]
    pgd = {"benchmark": "adversarial", "attack": "pgd", "norm": "linf", "eps": 0.03}
    square = {**pgd, "attack": "square"}
    for name, (lo, hi), base in [("steps", contract.STEPS, pgd),
                                 ("restarts", contract.RESTARTS, pgd),
                                 ("n_targets", contract.N_TARGETS, pgd),
                                 ("audit", contract.AUDIT, pgd),
                                 ("queries", contract.QUERIES, square)]:
        out += [{**base, name: v} for v in (lo - 1, lo, hi, hi + 1)]
    out += [{**pgd, "eps": [0.01, 0.01]}, {**pgd, "eps": 2.0}, {**pgd, "surprise": 1}]
    return out


@pytest.mark.parametrize("entry", _entries(), ids=lambda e: ",".join(
    f"{k}={v}" for k, v in e.items() if k != "benchmark"))
def test_the_engine_accepts_exactly_what_the_api_accepts(entry: dict[str, Any]) -> None:
    assert _api_accepts(entry) == _engine_accepts(entry)


def test_the_support_table_is_what_the_api_enforces() -> None:
    refused = {(a, n) for a in Attack for n in contract.Norm
               if not _api_accepts({"benchmark": "adversarial", "attack": a.value,
                                    "norm": n.value, "eps": EPS[n.value]})}
    assert refused == {(Attack.SQUARE, contract.Norm.L1), (Attack.CW, contract.Norm.LINF),
                       (Attack.CW, contract.Norm.L1)}


def test_every_benchmark_reports_only_the_contracts_metrics() -> None:
    assert set(BENCHMARK_METRICS) == set(benchmarks.names())


def test_every_suite_benchmark_is_registered_in_the_engine() -> None:
    entry_types = get_args(get_args(suite.Entry)[0])
    names = {get_args(t.model_fields["benchmark"].annotation)[0] for t in entry_types}
    assert names == set(benchmarks.names())


def test_the_api_architecture_table_is_current() -> None:
    stored = json.loads((ROOT / "service/models/architectures.json").read_text())
    assert stored == json.loads(json.dumps(shape_table()))


def test_training_methods_optimisers_and_schedules_agree() -> None:
    from contract import training as contract_training
    from service.trainings import schemas
    from workers.engine import training

    # one definition, used by both sides
    assert schemas.Method is training.Method is contract_training.Method
    assert schemas.Optimizer is training.Optimizer is contract_training.Optimizer
    assert schemas.LrSchedule is training.LrSchedule is contract_training.LrSchedule
