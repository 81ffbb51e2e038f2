"""Paired comparison of an evaluation with a baseline measured on the same examples.

Two evaluations of the same dataset (and generator parameters), split, seed and subset saw
the same examples in the same order, so each accuracy can be compared example by example:
the difference of the two accuracies with Newcombe's paired interval and McNemar's exact test
on the examples only one of them gets right (``contract.stats``; docs/METRICS.md,
"Uncertainty"). Rows pair when they come from identical suite entries with the same metric
and parameters; a worst-group accuracy pairs whatever group is worst on each side, and is then
compared on the same examples only when that group is the same.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session, undefer

from contract.jobs import JobStatus
from contract.metrics import LOWER_IS_BETTER
from contract.stats import CONFIDENCE, Paired, decode_outcomes, interval
from core.errors import Conflict
from core.repository import owned
from core.tables import Evaluation, Result

#: What two evaluations must share for their examples to be the same ones.
SAME_EXAMPLES = ("dataset", "dataset_params", "split", "seed", "n_examples")


class MetricComparison(BaseModel):
    """One metric of the evaluation beside the baseline's."""

    benchmark: str = Field(description="the benchmark of the suite entry")
    metric: str = Field(description="the metric, e.g. `accuracy`, `robust_accuracy`")
    params: dict[str, Any] = Field(description="the evaluation's row parameters")
    entry: dict[str, Any] = Field(description="the suite entry both rows come from")
    better: str = Field(description="`higher` or `lower`: which direction is better")
    value: float = Field(description="the evaluation's value")
    baseline_value: float = Field(description="the baseline's value")
    difference: float = Field(description="value - baseline_value")
    n: int | None = Field(description="for an accuracy: the examples both counted")
    value_interval: tuple[float, float] | None = Field(
        description="the evaluation's 95% Wilson interval (accuracies)")
    baseline_interval: tuple[float, float] | None = Field(
        description="the baseline's 95% Wilson interval (accuracies)")
    paired: bool = Field(description="whether both counted the same examples, one by one")
    interval: tuple[float, float] | None = Field(
        description="95% interval of the difference (Newcombe's paired score interval); "
                    "null unless paired")
    p_value: float | None = Field(
        description="exact two-sided McNemar p-value for 'both are equally accurate'; "
                    "null unless paired")
    only_evaluation: int | None = Field(
        description="examples only the evaluation got right (paired accuracies)")
    only_baseline: int | None = Field(
        description="examples only the baseline got right (paired accuracies)")


class Comparison(BaseModel):
    """An evaluation against a baseline on the same examples."""

    evaluation_id: uuid.UUID = Field(description="the evaluation compared")
    baseline_id: uuid.UUID = Field(description="the baseline it is compared with")
    model_name: str = Field(description="the evaluation's model name")
    baseline_model_name: str = Field(description="the baseline's model name")
    dataset: str = Field(description="the dataset both measured on")
    dataset_params: dict[str, Any] = Field(description="its generator parameters")
    split: str = Field(description="the split both measured on")
    seed: int = Field(description="the seed of both (random starts and subset)")
    n_examples: int | None = Field(description="the seeded subset's size; null: whole split")
    confidence: float = Field(description="the level of every interval, 0.95")
    metrics: list[MetricComparison] = Field(
        description="every metric both report from identical suite entries")
    only_in_evaluation: list[dict[str, Any]] = Field(
        description="rows (benchmark, metric, params) the baseline has no counterpart for")
    only_in_baseline: list[dict[str, Any]] = Field(
        description="rows of the baseline the evaluation has no counterpart for")


def _examples(ev: Evaluation) -> dict[str, Any]:
    options = ev.options or {}
    return {"dataset": ev.dataset, "dataset_params": ev.dataset_params or {},
            "split": ev.split, "seed": ev.seed, "n_examples": options.get("n_examples")}


def _key(ev: Evaluation, r: Result) -> tuple[str, str, str, str]:
    entry = ev.suite[r.entry_index] if r.entry_index < len(ev.suite) else {}
    params = dict(r.params)
    if r.metric == "worst_group_accuracy":
        params.pop("group", None)  # the worst group may differ; the metric is the same
    return (json.dumps(entry, sort_keys=True), r.benchmark, r.metric,
            json.dumps(params, sort_keys=True))


def _rows(session: Session, ev: Evaluation) -> dict[tuple[str, str, str, str], Result]:
    q = (select(Result).where(Result.evaluation_id == ev.id)
         .options(undefer(Result.outcomes)).order_by(Result.id))
    return {_key(ev, r): r for r in session.scalars(q)}


def _bits(r: Result) -> int | None:
    if r.n is None or r.outcomes is None:
        return None
    try:
        return decode_outcomes(r.outcomes, r.n)
    except ValueError:
        return None


def _compare(key: tuple[str, str, str, str], new: Result, base: Result) -> MetricComparison:
    a, b, n = _bits(new), _bits(base), new.n
    paired = (Paired.of(a, b, n) if a is not None and b is not None and n and n == base.n
              and new.params.get("group") == base.params.get("group") else None)
    return MetricComparison(
        benchmark=new.benchmark, metric=new.metric, params=new.params,
        entry=json.loads(key[0]), better="lower" if new.metric in LOWER_IS_BETTER else "higher",
        value=new.value, baseline_value=base.value, difference=new.value - base.value,
        n=new.n if paired else None,
        value_interval=interval(new.value, new.n), baseline_interval=interval(base.value, base.n),
        paired=paired is not None,
        interval=paired.interval() if paired else None,
        p_value=paired.p_value if paired else None,
        only_evaluation=paired.only_new if paired else None,
        only_baseline=paired.only_base if paired else None)


def compare(session: Session, owner: str, evaluation_id: uuid.UUID,
            baseline_id: uuid.UUID) -> Comparison:
    """The owner's evaluation against the owner's baseline: 404 for either unseen (another
    owner's included), 409 while either is unfinished or when they measured other examples."""
    ev = owned(session, Evaluation, owner, evaluation_id, "evaluation")
    base = owned(session, Evaluation, owner, baseline_id, "evaluation")
    return between(session, ev, base)


def between(session: Session, ev: Evaluation, base: Evaluation) -> Comparison:
    """``ev`` against ``base``, both already found readable by the caller (the comparison
    page also compares public evaluations of other owners); 409 as :func:`compare`."""
    for which, row in (("evaluation", ev), ("baseline", base)):
        if row.status != JobStatus.SUCCEEDED:
            raise Conflict(f"the {which} {row.id} is {row.status}; only succeeded evaluations "
                           "are compared", reason="not-finished", field=which)
    mine, theirs = _examples(ev), _examples(base)
    differ = [{"field": f, "evaluation": mine[f], "baseline": theirs[f]}
              for f in SAME_EXAMPLES if mine[f] != theirs[f]]
    if differ:
        names = ", ".join(d["field"] for d in differ)
        raise Conflict(f"the two evaluations did not measure the same examples (they differ in "
                       f"{names}); compare evaluations of the same dataset, dataset_params, "
                       "split, seed and n_examples", reason="not-comparable",
                       field="baseline", differences=differ)
    new_rows, base_rows = _rows(session, ev), _rows(session, base)
    return Comparison(
        evaluation_id=ev.id, baseline_id=base.id, model_name=ev.model_name,
        baseline_model_name=base.model_name, confidence=CONFIDENCE, **mine,
        metrics=[_compare(k, r, base_rows[k]) for k, r in new_rows.items() if k in base_rows],
        only_in_evaluation=[_describe(r) for k, r in new_rows.items() if k not in base_rows],
        only_in_baseline=[_describe(r) for k, r in base_rows.items() if k not in new_rows])


def _describe(r: Result) -> dict[str, Any]:
    return {"benchmark": r.benchmark, "metric": r.metric, "params": r.params}
