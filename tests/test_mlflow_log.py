"""What the MLflow extra names and logs, without a tracking server (the server test is in
tests/service/test_gate_cli.py)."""

from __future__ import annotations

import re

import pytest

from robustscope import mlflow_log


def test_metric_names_are_stable_and_in_mlflows_alphabet() -> None:
    row = {"benchmark": "adversarial", "metric": "robust_accuracy",
           "params": {"norm": "linf", "eps": 0.0314, "attack": "pgd"}}
    assert mlflow_log.metric_name(row) == \
        "adversarial/robust_accuracy/attack_pgd/eps_0.0314/norm_linf"
    shuffled = {**row, "params": dict(reversed(list(row["params"].items())))}
    assert mlflow_log.metric_name(shuffled) == mlflow_log.metric_name(row)
    group = {"benchmark": "groups", "metric": "accuracy",
             "params": {"group": "landbird@water (y=0)", "n": 8}}
    assert mlflow_log.metric_name(group) == "groups/accuracy/group_landbird-water -y-0-/n_8"
    many = {"benchmark": "corruptions", "metric": "mean_accuracy",
            "params": {"types": [f"corruption_type_{i}" for i in range(20)],
                       "severities": [1, 2, 3, 4, 5]}}
    name = mlflow_log.metric_name(many)
    assert len(name) == mlflow_log.MAX_NAME
    assert re.fullmatch(r"[\w.\- /~]+", name)
    other = {**many, "params": {**many["params"], "severities": [1, 2]}}
    assert mlflow_log.metric_name(other) != name  # the hash keeps long names apart


def test_the_run_params_describe_the_examples_and_the_suite() -> None:
    job = {"id": "e1", "model_name": "cnn", "dataset": "digits", "split": "test", "seed": 0,
           "n_examples": 400, "dataset_params": {"b": 1, "a": 2}, "engine_version": "0.1.0",
           "suite": [{"benchmark": "clean"}, {"benchmark": "adversarial", "eps": 0.03}]}
    assert mlflow_log.run_params(job) == {
        "robustscope.evaluation_id": "e1", "robustscope.model_name": "cnn",
        "robustscope.dataset": "digits", "robustscope.split": "test",
        "robustscope.seed": "0", "robustscope.n_examples": "400",
        "robustscope.dataset_params": '{"a": 2, "b": 1}',
        "robustscope.engine_version": "0.1.0",
        "robustscope.suite.0": '{"benchmark": "clean"}',
        "robustscope.suite.1": '{"benchmark": "adversarial", "eps": 0.03}'}


@pytest.mark.parametrize(("env", "run", "wanted"), [
    ({}, None, False), ({}, "r1", True), ({"MLFLOW_RUN_ID": "r2"}, None, True),
    ({"MLFLOW_EXPERIMENT_NAME": "gate"}, None, True),
    ({"MLFLOW_EXPERIMENT_ID": "3"}, None, True),
    ({"MLFLOW_TRACKING_URI": "http://x"}, None, False)])
def test_logging_is_asked_for_by_a_run_or_mlflows_variables(
        monkeypatch: pytest.MonkeyPatch, env: dict[str, str], run: str | None,
        wanted: bool) -> None:
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID",
                 "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert mlflow_log.wanted(run) is wanted
