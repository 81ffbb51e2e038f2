"""The API's torch-free catalogue must describe exactly what the engine generates."""

from __future__ import annotations

import pytest

from service.datasets.builtin import BUILTIN_DATASETS, DEFAULT_BUILTIN, validate_params
from workers.engine.data import BUILTINS, load_builtin
from workers.engine.data import DEFAULT_BUILTIN as ENGINE_DEFAULT


def test_same_names_and_default() -> None:
    assert set(BUILTIN_DATASETS) == set(BUILTINS)
    assert DEFAULT_BUILTIN == ENGINE_DEFAULT


@pytest.mark.parametrize("name", sorted(BUILTINS))
@pytest.mark.slow
def test_entry_matches_generated_data(name: str) -> None:
    entry = BUILTIN_DATASETS[name]
    spec = BUILTINS[name]
    assert entry["num_examples"] == dict(spec.sizes)
    assert entry["splits"] == list(spec.sizes)
    assert entry["parameters"]["correlation"]["default"] == spec.correlation
    assert entry["parameters"]["test_correlation"]["default"] == spec.test_correlation
    extra = {k: v["default"] for k, v in entry["parameters"].items()
             if k not in ("correlation", "test_correlation")}
    assert extra == dict(spec.extra_params)

    data = load_builtin(name, "test")
    assert len(data) == entry["num_examples"]["test"]
    assert list(data.x.shape[1:]) == entry["input_shape"]
    assert data.class_names == entry["class_names"]
    assert entry["num_classes"] == len(data.class_names) == int(data.y.max()) + 1
    assert (data.masks is not None) == entry["has_masks"]
    assert (data.groups is not None) == entry["has_groups"]
    assert (data.backgrounds is not None) == entry["has_backgrounds"]
    assert data.group_names == entry["group_names"]
    assert entry["default_eps"]["linf"] > 0


def test_validate_params() -> None:
    assert validate_params("waterbirds-32", {"correlation": 0.7}) == []
    assert validate_params("waterbirds-32", {"correlation": 1.5})
    assert validate_params("waterbirds-32", {"label_noise": 0.1})
    assert validate_params("colored-mnist", {"label_noise": 0.1}) == []
    assert validate_params("nope", {})
