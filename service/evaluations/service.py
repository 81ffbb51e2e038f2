"""Evaluation jobs: creation (with idempotency), reads, listing and cancellation."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy.orm import Session, selectinload
from sqlalchemy.orm.attributes import set_committed_value

from contract.stats import interval
from core import jobs
from core.errors import Invalid
from core.queue import EVALUATE_TASK, Outbox
from core.repository import owned, owned_rows
from core.tables import Evaluation, Result
from service.datasets.service import check_params, resolve
from service.evaluations import suite as suites
from service.evaluations.schemas import (
    EvaluationIn,
    EvaluationOut,
    ResultOut,
)
from service.http.pagination import newest_first
from service.http.polling import Polled
from service.jobs.schemas import RECORD_COLUMNS, record_fields
from service.models.service import get as get_model


def create(session: Session, outbox: Outbox, owner: str, body: EvaluationIn,
           idempotency_key: str | None) -> tuple[Evaluation, bool]:
    """Create a job (or return the one this Idempotency-Key made); enqueued after commit."""
    row, created = jobs.create(session, outbox, Evaluation, owner, body, idempotency_key,
                               lambda: _build(session, owner, body), EVALUATE_TASK)
    if created:
        set_committed_value(row, "results", [])  # a new job has none: no query to load them
    return row, created


def _build(session: Session, owner: str, body: EvaluationIn) -> Evaluation:
    """The job for a valid request, checked against its model and dataset."""
    model = get_model(session, owner, body.model_id)
    dataset = resolve(session, owner, body.dataset)
    check_params(body.dataset, body.dataset_params)
    split = body.split or ("test" if "test" in dataset.splits else next(iter(dataset.splits)))
    if split not in dataset.splits:
        raise Invalid(f"dataset {body.dataset!r} has no split {split!r}; it has "
                      f"{', '.join(dataset.splits)}", field="split")
    if list(model.input_shape) != list(dataset.input_shape):
        raise Invalid(
            f"the model takes inputs of shape {model.input_shape} but dataset "
            f"{body.dataset!r} has images of shape {dataset.input_shape}", field="dataset")
    _check_class_map(body, model.num_classes, dataset.num_classes)
    entries = suites.expand(body.suite, dataset.capabilities)
    return Evaluation(
        model_id=model.id, model_name=model.name, dataset=dataset.name,
        dataset_id=dataset.id, dataset_params=body.dataset_params, split=split, suite=entries,
        seed=body.seed, public=body.public, webhook_url=body.webhook_url, checks=[],
        artifacts={}, completed_entries=[], timings={},
        options={"n_examples": body.n_examples, "class_map": body.class_map},
    )


# Class maps the engine knows by name: (model classes, dataset classes). ``imagenet9`` maps the
# 1000 ImageNet-1k classes onto the 9 ImageNet-9 superclasses as the backgrounds challenge does.
NAMED_CLASS_MAPS = {"imagenet9": (1000, 9)}


def _check_class_map(body: EvaluationIn, model_classes: int, dataset_classes: int) -> None:
    """A model whose classes are not the dataset's needs a map from its classes to them."""
    cmap = body.class_map
    if cmap is None:
        if model_classes != dataset_classes:
            raise Invalid(
                f"the model has {model_classes} classes but dataset {body.dataset!r} has "
                f"{dataset_classes}; give a class_map (a list with the dataset class, or -1, "
                f"of each model class, or a built-in name: {', '.join(NAMED_CLASS_MAPS)})",
                field="class_map")
        return
    if isinstance(cmap, str):
        if cmap not in NAMED_CLASS_MAPS:
            raise Invalid(f"unknown class map {cmap!r}; known: {', '.join(NAMED_CLASS_MAPS)}",
                          field="class_map")
        need = NAMED_CLASS_MAPS[cmap]
        if (model_classes, dataset_classes) != need:
            raise Invalid(f"class map {cmap!r} maps {need[0]} model classes onto {need[1]} "
                          f"dataset classes; this model has {model_classes} and the dataset "
                          f"{dataset_classes}", field="class_map")
        return
    if len(cmap) != model_classes:
        raise Invalid(f"class_map has {len(cmap)} entries; the model has {model_classes} "
                      "classes", field="class_map")
    if any(c < -1 or c >= dataset_classes for c in cmap):
        raise Invalid(f"class_map entries must be -1 or a dataset class 0..{dataset_classes - 1}",
                      field="class_map")
    missing = sorted(set(range(dataset_classes)) - set(cmap))
    if missing:
        raise Invalid(f"class_map maps no model class to dataset class(es) {missing}",
                      field="class_map")


def get(session: Session, owner: str, evaluation_id: uuid.UUID) -> Evaluation:
    return owned(session, Evaluation, owner, evaluation_id, "evaluation",
                 options=[selectinload(Evaluation.results)])


def cancel(session: Session, owner: str, evaluation_id: uuid.UUID) -> Evaluation:
    row = get(session, owner, evaluation_id)
    jobs.request_cancel(row, "evaluation")
    return row


def list_page(session: Session, owner: str, *, status: str | None, model_id: uuid.UUID | None,
              dataset: str | None, cursor: str | None, limit: int) -> tuple[list[Evaluation],
                                                                            str | None]:
    q = owned_rows(Evaluation, owner)
    if status:
        q = q.where(Evaluation.status == status)
    if model_id:
        q = q.where(Evaluation.model_id == model_id)
    if dataset:
        q = q.where(Evaluation.dataset == dataset)
    return newest_first(session, q.options(selectinload(Evaluation.results)), Evaluation,
                        cursor, limit)


def to_out(row: Evaluation) -> EvaluationOut:
    return out_of(row, row.results)


def out_of(row: Any, results: Iterable[Any]) -> EvaluationOut:
    """The record of an evaluation from anything with its columns as attributes: the ORM row,
    or a Core row of the polling path (:mod:`service.http.polling`) and its results."""
    return EvaluationOut(
        **record_fields(row),
        model_id=row.model_id, model_name=row.model_name, dataset=row.dataset,
        dataset_params=row.dataset_params or {}, split=row.split, suite=row.suite,
        seed=row.seed, public=row.public, results=[_result(r) for r in results],
        checks=list(row.checks or []), timings=dict(row.timings or {}),
        artifacts=sorted(row.artifacts or {}),
        n_examples=(row.options or {}).get("n_examples"),
        class_map=(row.options or {}).get("class_map"),
    )


def _result(r: Result | Any) -> ResultOut:
    return ResultOut(benchmark=r.benchmark, metric=r.metric, value=r.value, params=r.params,
                     n=r.n, interval=interval(r.value, r.n))


def merge_spec(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a one-call ``spec`` into model metadata and evaluation fields.

    The metadata may sit under ``"model"`` or flat beside the evaluation fields.
    """
    spec = dict(spec)
    meta = spec.pop("model", None)
    keys = ("name", "architecture", "num_classes", "input_shape", "mean", "std", "class_names")
    if meta is None:
        meta = {k: spec.pop(k) for k in keys if k in spec}
    if not isinstance(meta, dict):
        raise Invalid("spec.model must be an object of model metadata", field="spec.model")
    return meta, spec


#: What a poll of an evaluation reads: the columns :func:`out_of` reads, and no others.
POLLED = Polled("evaluation", Evaluation.__table__, (
    *RECORD_COLUMNS, "model_id", "model_name", "dataset", "dataset_params", "split", "suite",
    "seed", "public", "checks", "timings", "artifacts", "options"), out_of, with_results=True)
