"""What the API validates must match what the engine runs (they cannot import each other)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

from service.evaluations import suite
from workers.engine import benchmarks
from workers.engine.benchmarks.adversarial import AttackName
from workers.engine.benchmarks.natural.corruptions import CORRUPTIONS
from workers.engine.models import shape_table
from workers.engine.threats import Norm

ROOT = Path(__file__).resolve().parent.parent


def test_attacks_norms_and_corruptions_agree() -> None:
    assert {a.value for a in suite.Attack} == {a.value for a in AttackName}
    assert {n.value for n in suite.Norm} == {n.value for n in Norm}
    assert set(suite.CORRUPTIONS) == set(CORRUPTIONS)


def test_every_suite_benchmark_is_registered_in_the_engine() -> None:
    entry_types = get_args(get_args(suite.Entry)[0])
    names = {get_args(t.model_fields["benchmark"].annotation)[0] for t in entry_types}
    assert names == set(benchmarks.names())


def test_the_api_architecture_table_is_current() -> None:
    stored = json.loads((ROOT / "service/models/architectures.json").read_text())
    assert stored == json.loads(json.dumps(shape_table()))


def test_training_methods_optimisers_and_schedules_agree() -> None:
    from service.trainings import schemas
    from workers.engine import training

    assert {m.value for m in schemas.Method} == {m.value for m in training.Method}
    assert {o.value for o in schemas.Optimizer} == {o.value for o in training.Optimizer}
    assert {s.value for s in schemas.LrSchedule} == {s.value for s in training.LrSchedule}
