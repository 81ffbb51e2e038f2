"""The gate of ``robustscope evaluate``: thresholds (``--min``) and drops against a baseline
(``--max-drop``) as test cases, and the evaluation written as text, JSON or JUnit XML.

A drop fails only when it is both larger than allowed and significant: the metric got worse
than the baseline's by more than DROP and McNemar's exact test on the examples only one of the
two got right gives p < 0.05 (docs/METRICS.md, "Uncertainty"). On 200 examples an accuracy is
known to about ±0.07, so a drop the examples cannot tell from chance never blocks a release,
and a real one on enough examples always does. A metric with no per-example outcomes (``rfs``,
``bg_gap``) has no paired test and fails on the drop alone.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from contract.jobs import JobStatus

ALPHA = 0.05
"""A drop must be significant at this level to fail the gate."""


class Selector(Protocol):
    """What selects result rows (``client.Threshold``): its text, benchmark and metric."""

    @property
    def text(self) -> str: ...
    @property
    def benchmark(self) -> str | None: ...
    @property
    def metric(self) -> str: ...
    @property
    def minimum(self) -> float: ...

    def selects(self, row: dict[str, Any]) -> bool: ...


@dataclass
class Case:
    """One test case of the gate: a threshold, a drop limit, or the job itself."""

    name: str
    kind: str  # "evaluation", "threshold" or "max-drop"
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def label(row: dict[str, Any]) -> str:
    """``benchmark.metric (key=value, ...)``: how a row is named in every message."""
    params = ", ".join(f"{k}={v}" for k, v in sorted(row["params"].items()))
    return f"{row['benchmark']}.{row['metric']}" + (f" ({params})" if params else "")


def _selected(t: Selector, rows: list[dict[str, Any]], where: str
              ) -> tuple[list[dict[str, Any]], str | None]:
    """The rows ``t`` selects, or why it selects none usefully."""
    picked = [r for r in rows if t.selects(r)]
    benches = sorted({r["benchmark"] for r in picked})
    if not picked:
        return [], f"{t.text}: no such result {where}"
    if t.benchmark is None and len(benches) > 1:
        names = " or ".join(f"{b}.{t.metric}" for b in benches)
        return [], (f"{t.text}: ambiguous, {t.metric} is reported by {len(benches)} "
                    f"benchmarks; name one ({names})")
    return picked, None


def threshold_cases(job: dict[str, Any], thresholds: Iterable[Selector]) -> list[Case]:
    """One case per ``--min``: every row it selects must reach the minimum."""
    cases = []
    for t in thresholds:
        rows, error = _selected(t, job["results"], "in this evaluation")
        case = Case(t.text, "threshold", [error] if error else [])
        case.failures += [f"{label(r)} {r['value']:.4f} < {t.minimum:g}"
                          for r in rows if r["value"] < t.minimum]
        cases.append(case)
    return cases


def worse_by(m: dict[str, Any]) -> float:
    """How much worse than the baseline a compared metric is (negative: better)."""
    diff = float(m["difference"])
    return diff if m["better"] == "lower" else -diff


def _evidence(m: dict[str, Any]) -> str:
    text = f"{m['value']:.4f} against the baseline's {m['baseline_value']:.4f}"
    if m.get("p_value") is None:
        return text + ", no paired test"
    low, high = m["interval"]
    return (text + f", difference {m['difference']:+.4f} (95% CI [{low:+.4f}, {high:+.4f}]), "
            f"McNemar p = {m['p_value']:.3g}")


def drop_cases(comparison: dict[str, Any], drops: Iterable[Selector]) -> list[Case]:
    """One case per ``--max-drop``: no selected metric may be worse than the baseline by more
    than DROP with p < :data:`ALPHA` (or, without a paired test, by more than DROP)."""
    cases = []
    for t in drops:
        rows, error = _selected(t, comparison["metrics"], "in both evaluations")
        case = Case(f"max-drop {t.text}", "max-drop", [error] if error else [])
        for m in rows:
            drop = worse_by(m)
            line = f"{label(m)} worse by {drop:.4f} > {t.minimum:g}: {_evidence(m)}"
            if drop <= t.minimum:
                continue
            if m.get("p_value") is None or m["p_value"] < ALPHA:
                case.failures.append(line)
            else:
                case.notes.append(line + f" (not significant at {ALPHA:g})")
        cases.append(case)
    return cases


def job_case(job: dict[str, Any]) -> Case:
    """The evaluation itself: it must have succeeded."""
    case = Case("evaluation", "evaluation")
    if job["status"] != JobStatus.SUCCEEDED:
        err = job.get("error") or {}
        case.failures.append(f"the evaluation {job['status']}: {err.get('type', '')} "
                             f"{err.get('detail', '')}".rstrip())
    return case


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _params(row: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(row["params"].items()))


def _ci(pair: Any) -> str:
    return "" if pair is None else f"[{pair[0]:.4f}, {pair[1]:.4f}]"


def results_table(job: dict[str, Any]) -> str:
    """Every result row with the examples it counts and its 95% interval."""
    rows = [("benchmark", "metric", "params", "value", "n", "95% interval")]
    for r in job["results"]:
        n = r.get("n")
        rows.append((r["benchmark"], r["metric"], _params(r), f"{r['value']:.4f}",
                     "" if n is None else str(n), _ci(r.get("interval"))))
    return _table(rows)


def comparison_table(comparison: dict[str, Any]) -> str:
    """Each metric beside the baseline's, with the paired difference's interval and p."""
    rows = [("benchmark", "metric", "params", "value", "baseline", "difference",
             "95% interval", "McNemar p")]
    for m in comparison["metrics"]:
        p = m.get("p_value")
        rows.append((m["benchmark"], m["metric"], _params(m), f"{m['value']:.4f}",
                     f"{m['baseline_value']:.4f}", f"{m['difference']:+.4f}",
                     _ci(m.get("interval")), "" if p is None else f"{p:.3g}"))
    return _table(rows)


def as_text(job: dict[str, Any], comparison: dict[str, Any] | None, cases: list[Case],
            report_url: str) -> str:
    parts = [f"evaluation {job['id']} {job['status']}: {report_url}"]
    if job["results"]:
        parts.append(results_table(job))
    if comparison is not None:
        parts.append(f"against baseline {comparison['baseline_id']} "
                     f"({comparison['baseline_model_name']}), same "
                     f"{comparison['n_examples'] or 'whole-split'} examples:\n"
                     + comparison_table(comparison))
    verdicts = []
    for case in cases:
        if case.kind == "evaluation" and case.passed:
            continue
        verdicts.append(f"{'PASS' if case.passed else 'FAIL'} {case.name}")
        verdicts += [f"  {line}" for line in case.failures]
        verdicts += [f"  passes: {line}" for line in case.notes]
    if verdicts:
        parts.append("\n".join(verdicts))
    return "\n\n".join(parts) + "\n"


def as_json(job: dict[str, Any], comparison: dict[str, Any] | None, cases: list[Case],
            report_url: str) -> str:
    """The evaluation record with the report's address, the comparison and the gate."""
    out = {**job, "report_url": report_url, "comparison": comparison,
           "gate": {"passed": all(c.passed for c in cases),
                    "cases": [{"name": c.name, "kind": c.kind, "passed": c.passed,
                               "failures": c.failures, "notes": c.notes} for c in cases]}}
    return json.dumps(out, indent=2) + "\n"


def as_junit(job: dict[str, Any], cases: list[Case], report_url: str, seconds: float) -> str:
    """JUnit XML, one test case per check, a ``<failure>`` for each unmet one: what CI
    dashboards (GitHub Actions reporters, GitLab's ``artifacts:reports:junit``) read."""
    failed = sum(not c.passed for c in cases)
    root = ET.Element("testsuites", name="robustscope", tests=str(len(cases)),
                      failures=str(failed), time=f"{seconds:.3f}")
    suite = ET.SubElement(root, "testsuite", name=f"robustscope {job.get('model_name', '')}",
                          tests=str(len(cases)), failures=str(failed), errors="0",
                          skipped="0", time=f"{seconds:.3f}")
    props = ET.SubElement(suite, "properties")
    for name, value in (("evaluation", job["id"]), ("report", report_url),
                        ("dataset", job.get("dataset")), ("split", job.get("split")),
                        ("seed", job.get("seed")), ("n_examples", job.get("n_examples"))):
        if value is not None:
            ET.SubElement(props, "property", name=name, value=str(value))
    for case in cases:
        tc = ET.SubElement(suite, "testcase", classname=f"robustscope.{case.kind}",
                           name=case.name, time="0")
        if case.failures:
            failure = ET.SubElement(tc, "failure", type=case.kind, message=case.failures[0])
            failure.text = "\n".join(case.failures)
        if case.notes:
            ET.SubElement(tc, "system-out").text = "\n".join(case.notes)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, "unicode") + "\n"
