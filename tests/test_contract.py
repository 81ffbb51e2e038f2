"""What the API accepts is exactly what the engine runs: both use the models of ``contract/``,
and the tests here run the whole attack x norm x targeted table, every entry kind and every
budget at and past its bounds through the API's validation and the worker's job boundary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import pytest
import torch
from pydantic import ValidationError

from contract import attacks as contract
from contract import suite as contract_suite
from contract import training as contract_training
from contract.attacks import Attack
from contract.metrics import BENCHMARK_METRICS
from contract.suite import Adversarial, RobustnessCurve, dump_entry
from core.errors import Invalid
from service.evaluations import suite
from service.trainings.schemas import TrainingIn
from service.trainings.service import spec_of
from workers.engine import benchmarks
from workers.engine.attacks import FABTargeted
from workers.engine.benchmarks.adversarial import BUILDERS, AttackParams, _eps_on
from workers.engine.benchmarks.natural.corruptions import CORRUPTIONS
from workers.engine.models import shape_table
from workers.engine.threats import Norm
from workers.engine.training import TrainSpec
from workers.engine.types import BenchmarkError, EvalData

ROOT = Path(__file__).resolve().parent.parent


def test_norms_and_corruptions_agree() -> None:
    assert Norm is contract.Norm  # the engine runs the contract's norms
    assert suite.CORRUPTIONS is contract_suite.CORRUPTIONS
    assert set(contract_suite.CORRUPTIONS) == set(CORRUPTIONS)


CAPS = suite.Capabilities(name="t", has_masks=True, has_groups=True, regenerable=True,
                          default_eps={"linf": 0.03, "l2": 0.5, "l1": 8.0})
DATA = EvalData(x=torch.rand(4, 3, 8, 8), y=torch.arange(4), class_names=list("abcd"))
EPS = {"linf": [0.01, 0.03], "l2": 0.5, "l1": 4.0}


def _api(entry: dict[str, Any]) -> dict[str, Any] | None:
    """What the API stores for ``entry``, or None when it refuses it."""
    try:
        [stored] = suite.expand([entry], CAPS)
    except Invalid:
        return None
    return stored


def _engine_accepts(stored: dict[str, Any]) -> bool:
    """The worker's side: the job boundary's parse of the stored JSON, then what the engine
    builds from the typed entry before it touches the model (the attack's stages, or the
    curve's minimal-norm attack)."""
    try:
        entry = benchmarks.parse(stored)
        if isinstance(entry, Adversarial):
            params = AttackParams.of(entry, DATA)
            assert BUILDERS[params.attack](params)
        elif isinstance(entry, RobustnessCurve):
            _eps_on(DATA, entry.norm, tuple(entry.eps or ()), "robustness_curve")
            FABTargeted(entry.norm, entry.steps or 100, n_targets=entry.n_targets or 9)
    except (BenchmarkError, ValueError):
        return False
    return True


def _adversarial_entries() -> list[dict[str, Any]]:
    """The whole attack x norm x targeted table, each attack with the options only some
    attacks take, every budget at and past its bounds."""
    out: list[dict[str, Any]] = []
    for attack in Attack:
        for norm in contract.Norm:
            base = {"benchmark": "adversarial", "attack": attack.value, "norm": norm.value,
                    "eps": EPS[norm.value]}
            for targeted in (False, True):
                for option in ({}, {"step_size": 0.01}, {"queries": 100}, {"n_targets": 3}):
                    out.append({**base, "targeted": targeted, **option})
            out.append({k: v for k, v in base.items() if k != "eps"})  # the dataset's default
    pgd = {"benchmark": "adversarial", "attack": "pgd", "norm": "linf", "eps": 0.03}
    square = {**pgd, "attack": "square"}
    for name, (lo, hi), base in [("steps", contract.STEPS, pgd),
                                 ("restarts", contract.RESTARTS, pgd),
                                 ("n_targets", contract.N_TARGETS, pgd),
                                 ("audit", contract.AUDIT, pgd),
                                 ("queries", contract.QUERIES, square)]:
        out += [{**base, name: v} for v in (lo - 1, lo, hi, hi + 1)]
    lo, hi = contract.EPS_VALUES
    out += [{**pgd, "eps": [0.001 * (i + 1) for i in range(n)]} for n in (lo - 1, lo, hi, hi + 1)]
    out += [{**pgd, "eps": [0.01, 0.01]}, {**pgd, "eps": 2.0}, {**pgd, "eps": 0},
            {**pgd, "norm": "l3"}, {**pgd, "attack": "nope"}, {**pgd, "surprise": 1}]
    return out


def _other_entries() -> list[dict[str, Any]]:
    """Every other kind of entry: its defaults, its options, and some nonsense."""
    lo, hi = contract.CURVE_EPS_VALUES
    curve: list[dict[str, Any]] = [
        {"benchmark": "robustness_curve", "norm": n.value,
         "eps": [0.001 * (i + 1) for i in range(k)]}
        for n in contract.Norm for k in (lo - 1, lo, hi, hi + 1)]
    curve += [{"benchmark": "robustness_curve"},
              {"benchmark": "robustness_curve", "eps": [0.01], "steps": 0},
              {"benchmark": "robustness_curve", "eps": [0.01], "n_targets": 9, "steps": 5}]
    return [*curve,
            {"benchmark": "clean"}, {"benchmark": "clean", "eps": 0.1},
            {"benchmark": "fg_bg_noise"}, {"benchmark": "fg_bg_noise", "sigmas": [0.0, 0.5]},
            {"benchmark": "fg_bg_noise", "sigmas": []}, {"benchmark": "fg_bg_noise", "trials": 0},
            {"benchmark": "fg_bg_noise", "sigmas": [11]},
            {"benchmark": "backgrounds"}, {"benchmark": "groups"},
            {"benchmark": "groups", "split": "test"},
            {"benchmark": "corruptions"}, {"benchmark": "corruptions", "types": "all"},
            {"benchmark": "corruptions", "types": ["fog", "contrast"], "severities": [1, 5]},
            {"benchmark": "corruptions", "types": []}, {"benchmark": "corruptions",
                                                        "types": ["snow"]},
            {"benchmark": "corruptions", "severities": [0]},
            {"benchmark": "spurious_shift"},
            {"benchmark": "spurious_shift", "correlation": 0.9, "removed": 0.5,
             "reversed": 0.1, "split": "val"},
            {"benchmark": "spurious_shift", "correlation": 1.5},
            {"benchmark": "spurious_shift", "split": "holdout"},
            {"benchmark": "nope"}]


def _id(entry: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in entry.items())


@pytest.mark.parametrize("entry", _adversarial_entries() + _other_entries(), ids=_id)
def test_the_engine_accepts_exactly_what_the_api_accepts(entry: dict[str, Any]) -> None:
    stored = _api(entry)
    if stored is None:  # refused at submission: the worker refuses it too
        assert not _engine_accepts(entry)
    else:  # accepted: the worker runs exactly the entry the API stored
        assert _engine_accepts(stored)
        assert dump_entry(benchmarks.parse(stored)) == stored


def test_the_table_covers_both_verdicts() -> None:
    verdicts = [_api(e) is not None for e in _adversarial_entries() + _other_entries()]
    assert any(verdicts)
    assert not all(verdicts)


def test_the_support_table_is_what_the_api_enforces() -> None:
    refused = {(a, n) for a in Attack for n in contract.Norm
               if _api({"benchmark": "adversarial", "attack": a.value, "norm": n.value,
                        "eps": EPS[n.value]}) is None}
    assert refused == {(Attack.SQUARE, contract.Norm.L1), (Attack.CW, contract.Norm.LINF),
                       (Attack.CW, contract.Norm.L1)}


def test_every_benchmark_reports_only_the_contracts_metrics() -> None:
    assert set(BENCHMARK_METRICS) == set(benchmarks.names())


def test_every_suite_benchmark_is_registered_in_the_engine() -> None:
    entry_types = get_args(get_args(contract_suite.Entry)[0])
    names = {get_args(t.model_fields["benchmark"].annotation)[0] for t in entry_types}
    assert names == set(benchmarks.names())


@pytest.mark.slow
def test_the_api_architecture_table_is_current() -> None:
    stored = json.loads((ROOT / "service/models/architectures.json").read_text())
    assert stored == json.loads(json.dumps(shape_table()))


def _training_bodies() -> list[dict[str, Any]]:
    """Every method x norm, with and without each optional part of the threat and spec."""
    out: list[dict[str, Any]] = []
    for method in contract_training.Method:
        base = {"dataset": "d", "architecture": "small_cnn", "method": method.value}
        out.append(base)
        for norm in contract.Norm:
            threat = {"norm": norm.value, "eps": EPS[norm.value] if norm.value != "linf"
                      else 0.03}
            for extra in ({}, {"steps": 1}, {"steps": 5}, {"step_size": 0.01},
                          {"steps": 1000, "step_size": 1000}):
                out.append({**base, "threat": {**threat, **extra}})
        out += [{**base, "optimizer": "adam"}, {**base, "lr_schedule": "constant", "lr": 10},
                {**base, "beta": 1.0}, {**base, "epochs": 1000, "batch_size": 4096}]
    return out


@pytest.mark.parametrize("body", _training_bodies(), ids=_id)
def test_the_engine_trains_by_what_the_api_stores(body: dict[str, Any]) -> None:
    """A training the API accepts is stored as the contract's spec, which the worker reads
    back and the engine builds its run from; nothing is lost on the way."""
    try:
        request = TrainingIn.model_validate(body)
    except ValidationError:
        return  # refused at submission; nothing is stored for the engine
    spec = spec_of(request, default_linf_eps=0.03)
    stored = json.loads(json.dumps(spec.model_dump(mode="json")))  # the job payload
    engine = TrainSpec.of(contract_training.TrainingSpec.model_validate(stored))
    assert engine.method is request.method
    assert engine.threat.norm is spec.threat.norm
    assert (engine.threat.eps, engine.threat.steps, engine.threat.step_size) == (
        spec.threat.eps, spec.threat.steps, spec.threat.step_size)
    assert (engine.epochs, engine.batch_size, engine.lr, engine.optimizer, engine.lr_schedule,
            engine.beta) == (spec.epochs, spec.batch_size, spec.lr, spec.optimizer,
                             spec.lr_schedule, spec.beta)
    assert engine.threat.pgd_step() > 0


def test_training_methods_optimisers_and_schedules_agree() -> None:
    from service.trainings import schemas
    from workers.engine import training

    # one definition, used by both sides
    assert schemas.Method is training.Method is contract_training.Method
    assert schemas.Optimizer is training.Optimizer is contract_training.Optimizer
    assert schemas.LrSchedule is training.LrSchedule is contract_training.LrSchedule


def test_a_curve_without_eps_gets_a_grid_around_the_datasets_default() -> None:
    stored = _api({"benchmark": "robustness_curve", "norm": "l2"})
    assert stored is not None
    assert CAPS.default_eps["l2"] == 0.5
    assert stored["eps"] == [0.125, 0.25, 0.5, 0.75, 1.0]
