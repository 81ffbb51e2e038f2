"""The gate of ``robustscope evaluate`` without a server: which drops fail, and the text, JSON
and JUnit it writes."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Any

from robustscope import gate
from robustscope.client import parse_thresholds

JOB = {"id": "e1", "status": "succeeded", "model_name": "cnn", "dataset": "digits",
       "split": "test", "seed": 0, "n_examples": 400,
       "results": [{"benchmark": "clean", "metric": "accuracy", "value": 0.7125,
                    "params": {}, "n": 400, "interval": [0.6663, 0.7547]},
                   {"benchmark": "backgrounds", "metric": "bg_gap", "value": 0.1,
                    "params": {}, "n": None, "interval": None}]}


def _metric(benchmark: str, metric: str, value: float, base: float, p: float | None,
            better: str = "higher", **params: Any) -> dict[str, Any]:
    return {"benchmark": benchmark, "metric": metric, "params": params, "better": better,
            "value": value, "baseline_value": base, "difference": value - base,
            "p_value": p, "interval": None if p is None else [value - base - 0.08,
                                                            value - base + 0.08]}


COMPARISON = {"baseline_id": "b1", "baseline_model_name": "cnn-prod", "n_examples": 400,
              "metrics": [
                  _metric("clean", "accuracy", 0.7125, 0.8925, 5.2e-19),
                  _metric("adversarial", "robust_accuracy", 0.30, 0.36, 0.09, norm="linf",
                          eps=0.1),
                  _metric("adversarial", "robust_accuracy", 0.20, 0.21, 0.7, norm="l2", eps=0.5),
                  _metric("adversarial", "zero_gradient_fraction", 0.20, 0.05, 0.001,
                          "lower", norm="linf"),
                  _metric("backgrounds", "bg_gap", 0.30, 0.10, None, "lower")]}


def cases(*drops: str) -> list[gate.Case]:
    return gate.drop_cases(COMPARISON, parse_thresholds(list(drops), "--max-drop"))


def test_a_drop_fails_only_when_larger_than_allowed_and_significant() -> None:
    [big] = cases("clean.accuracy=0.1")
    assert big.failures == [
        "clean.accuracy worse by 0.1800 > 0.1: 0.7125 against the baseline's 0.8925, "
        "difference -0.1800 (95% CI [-0.2600, -0.1000]), McNemar p = 5.2e-19"]
    assert cases("clean.accuracy=0.2")[0].passed  # within the allowance
    # 6 points worse but p = 0.09: not told apart from chance, noted and passed.
    [noisy] = cases("robust_accuracy@norm=linf=0.02")
    assert noisy.passed
    assert noisy.notes[0].endswith("McNemar p = 0.09 (not significant at 0.05)")
    # Every selected row counts: the l2 row is within 0.02, the linf row not significant.
    assert cases("adversarial.robust_accuracy=0.02")[0].passed


def test_lower_is_better_metrics_and_rows_without_a_paired_test() -> None:
    [zero] = cases("zero_gradient_fraction=0.1")
    assert zero.failures[0].startswith("adversarial.zero_gradient_fraction (norm=linf) worse "
                                       "by 0.1500 > 0.1")
    [gap] = cases("bg_gap=0.1")  # no outcomes per example: the drop alone decides
    assert gap.failures == ["backgrounds.bg_gap worse by 0.2000 > 0.1: 0.3000 against the "
                            "baseline's 0.1000, no paired test"]
    [missing] = cases("groups.worst_group_accuracy=0.1")
    assert missing.failures == ["groups.worst_group_accuracy=0.1: no such result in both "
                                "evaluations"]


def _all_cases() -> list[gate.Case]:
    return [gate.job_case(JOB),
            *gate.threshold_cases(JOB, parse_thresholds(["clean.accuracy=0.8"])),
            *cases("clean.accuracy=0.02", "robust_accuracy@norm=linf=0.02")]


def test_junit_has_one_case_per_check_and_a_failure_for_each_unmet_one() -> None:
    xml = gate.as_junit(JOB, _all_cases(), "http://h/evaluations/e1/report", 12.5)
    root = ET.fromstring(xml)
    assert (root.tag, root.get("tests"), root.get("failures")) == ("testsuites", "4", "2")
    [suite] = root
    props = {p.get("name"): p.get("value") for p in suite.find("properties") or []}
    assert props["report"] == "http://h/evaluations/e1/report"
    assert props["n_examples"] == "400"
    got = {(tc.get("classname"), tc.get("name")): tc.find("failure")
           for tc in suite.iter("testcase")}
    assert list(got) == [("robustscope.evaluation", "evaluation"),
                         ("robustscope.threshold", "clean.accuracy=0.8"),
                         ("robustscope.max-drop", "max-drop clean.accuracy=0.02"),
                         ("robustscope.max-drop", "max-drop robust_accuracy@norm=linf=0.02")]
    failed = [k[1] for k, f in got.items() if f is not None]
    assert failed == ["clean.accuracy=0.8", "max-drop clean.accuracy=0.02"]
    threshold = got[("robustscope.threshold", "clean.accuracy=0.8")]
    assert threshold is not None
    assert threshold.get("message") == "clean.accuracy 0.7125 < 0.8"


def test_a_failed_job_is_a_junit_failure() -> None:
    job = {**JOB, "status": "failed", "error": {"type": "time-limit", "detail": "ran 6 h"},
           "results": []}
    root = ET.fromstring(gate.as_junit(job, [gate.job_case(job)], "u", 1.0))
    failure = root.find("testsuite/testcase/failure")
    assert failure is not None
    assert failure.get("message") == "the evaluation failed: time-limit ran 6 h"


def test_json_is_the_record_with_the_comparison_and_the_gate() -> None:
    out = json.loads(gate.as_json(JOB, COMPARISON, _all_cases(), "http://h/r"))
    assert out["id"] == "e1"
    assert out["results"] == JOB["results"]
    assert out["comparison"] == COMPARISON
    assert out["report_url"] == "http://h/r"
    assert out["gate"]["passed"] is False
    assert [c["passed"] for c in out["gate"]["cases"]] == [True, False, False, True]


def test_text_shows_intervals_the_comparison_and_the_verdicts() -> None:
    text = gate.as_text(JOB, COMPARISON, _all_cases(), "http://h/evaluations/e1/report")
    assert text.startswith("evaluation e1 succeeded: http://h/evaluations/e1/report\n")
    assert "clean        accuracy          0.7125  400  [0.6663, 0.7547]" in text
    assert ("clean        accuracy                                    0.7125  0.8925    -0.1800"
            in text)
    assert "FAIL clean.accuracy=0.8\n  clean.accuracy 0.7125 < 0.8" in text
    assert "PASS max-drop robust_accuracy@norm=linf=0.02\n  passes: " in text
