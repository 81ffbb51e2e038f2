"""Sharded evaluation in the engine: slices of the set that start on a block boundary, run
apart with their own offset, give every example the outcome of the whole run, and their saved
states merge into the whole run's, so the merged run measures nothing again and reports
exactly what the whole run reported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.factories import comparable, run_benchmark, tiny_net
from workers.engine.data import load_builtin
from workers.engine.models import Normalized
from workers.engine.runner import merge_states
from workers.engine.types import RunContext

pytestmark = pytest.mark.slow
ENTRY: dict[str, Any] = {"attack": "fast", "norm": "linf", "eps": [2 / 255, 8 / 255],
                         "steps": 5}


def _run(model: torch.nn.Module, data: Any, state: Path, offset: int = 0) -> Any:
    ctx = RunContext(seed=5, batch_size=16, state_dir=state, offset=offset,
                     artifact_dir=state.parent / f"artifacts-{state.name}")
    return run_benchmark("adversarial", model, data, ENTRY, ctx)


def _rows(result: Any) -> list[dict[str, Any]]:
    return [r.as_dict() for r in result.rows]


def test_shards_merge_into_exactly_the_whole_run(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model = Normalized(tiny_net(4, seed=1), None, None, 3).eval()
    data = load_builtin("shapes-32", "test").subset(torch.arange(72))
    whole = _run(model, data, tmp_path / "whole")
    bounds = [(0, 48), (48, 72)]  # 48 = three blocks of 16; the last part is a partial block
    parts = []
    for k, (a, b) in enumerate(bounds):
        _run(model, data.subset(torch.arange(a, b)), tmp_path / f"shard{k}", offset=a)
        parts.append(tmp_path / f"shard{k}" / "adversarial")
    merged_dir = tmp_path / "merged" / "adversarial"
    written = merge_states(parts, bounds, merged_dir, data.y)
    assert written == 1 + 2 * 2  # the clean pass, and two stages for each of two eps
    merged = _run(model, data, tmp_path / "merged")
    assert comparable(_rows(merged)) == comparable(_rows(whole))
    assert [c.as_dict() for c in merged.checks] == [c.as_dict() for c in whole.checks]
    for name, path in whole.artifacts.items():
        with np.load(path) as a, np.load(merged.artifacts[name]) as b:
            assert set(a.files) == set(b.files)
            for key in a.files:
                assert np.array_equal(a[key], b[key]), (name, key)
    # Every stage came from the shards' states: the merged run attacked nothing itself, and
    # its pass counts are what the shards spent together (one search probe each).
    fwd = {(r["params"]["eps"], r["params"]["stage"]): r["params"]["passes"]
           for r in _rows(merged) if r["metric"] == "forward_passes"}
    whole_fwd = {(r["params"]["eps"], r["params"]["stage"]): r["params"]["passes"]
                 for r in _rows(whole) if r["metric"] == "forward_passes"}
    assert fwd.keys() == whole_fwd.keys()
    assert all(fwd[k] >= whole_fwd[k] for k in fwd)
    extra = sum(fwd[k] - whole_fwd[k] for k in fwd if k[1] != "total")
    assert 0 < extra <= 16 * (len(bounds) - 1)  # the search probe of the second process


def test_a_part_that_is_not_its_slice_is_not_merged(tmp_path: Path) -> None:
    model = Normalized(tiny_net(4, seed=1), None, None, 3).eval()
    data = load_builtin("shapes-32", "test").subset(torch.arange(32))
    for k, (a, b) in enumerate([(0, 16), (16, 32)]):
        _run(model, data.subset(torch.arange(a, b)), tmp_path / f"shard{k}", offset=a)
    parts = [tmp_path / "shard0" / "adversarial", tmp_path / "shard1" / "adversarial"]
    # Swapped parts hold other examples' labels: nothing is merged, the stages run again.
    assert merge_states(parts[::-1], [(0, 16), (16, 32)], tmp_path / "m", data.y) == 0
    assert merge_states(parts, [(0, 16), (16, 32)], tmp_path / "m", data.y) == 5
