"""Evaluation jobs: creation (with idempotency), reads, listing and cancellation."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session, object_session, selectinload
from sqlalchemy.orm.attributes import set_committed_value

from contract.jobs import ACTIVE_STATES, JobStatus
from contract.stats import interval
from core import jobs
from core.errors import Invalid, invalid
from core.queue import EVALUATE_TASK, SHARD_TASK, Outbox
from core.repository import owned, owned_rows
from core.settings import Settings
from core.tables import Evaluation, EvaluationShard, Result, WorkerSeen, utcnow
from core.webhook_policy import check_url
from service.datasets.service import check_params, resolve
from service.evaluations import suite as suites
from service.evaluations.schemas import (
    MAX_SHARDS,
    EvaluationIn,
    EvaluationOut,
    ResultOut,
    ShardOut,
)
from service.http.pagination import newest_first
from service.http.polling import Polled
from service.jobs.schemas import RECORD_COLUMNS, record_fields
from service.jobs.service import within_quota
from service.models import service as models
from service.models.service import CheckpointUpload


@dataclass(frozen=True)
class Submission:
    """A ``POST /evaluations`` request as read: the evaluation's fields (JSON, validated as
    :class:`EvaluationIn` once a one-call upload's model exists) and, for a one-call upload,
    the checkpoint with its model's metadata."""

    fields: Any
    idempotency_key: str | None = None
    checkpoint: CheckpointUpload | None = None


def submit(session: Session, outbox: Outbox, owner: str, submission: Submission,
           settings: Settings) -> tuple[Evaluation, bool]:
    """The blocking part of a submission, in one thread hop: a one-call upload's checkpoint
    received and registered as the owner's model, the request validated, the webhook URL's
    check (it resolves the host), the job's creation and the active-jobs quota. The
    checkpoint of a submission that fails goes with the transaction's rollback."""
    fields = submission.fields
    if submission.checkpoint is not None:
        model = models.receive(session, owner, submission.checkpoint, settings)
        fields = {**fields, "model_id": str(model.id)}
    body = parse_body(fields)
    check_url(body.webhook_url, settings.webhook_allow_private)
    return within_quota(session, owner, settings, create(
        session, outbox, owner, body, submission.idempotency_key, settings))


def parse_body(raw: object) -> EvaluationIn:
    try:
        return EvaluationIn.model_validate(raw)
    except ValidationError as exc:
        raise invalid(exc) from exc


def create(session: Session, outbox: Outbox, owner: str, body: EvaluationIn,
           idempotency_key: str | None, settings: Settings | None = None
           ) -> tuple[Evaluation, bool]:
    """Create a job (or return the one this Idempotency-Key made); enqueued after commit.
    A sharded one (``shards`` > 1) is its shard jobs, enqueued; it is merged when they have
    all succeeded (``settings`` gives the batch the shards align to and the live workers the
    default counts; without them it is one job)."""
    bounds: list[tuple[int, int]] = []  # a sharded one's slices, as its request gives them
    row, created = jobs.create(session, outbox, Evaluation, owner, body, idempotency_key,
                               lambda: _build(session, owner, body, settings, bounds))
    if not created:
        return row, False
    set_committed_value(row, "results", [])  # a new job has none: no query to load them
    if row.shards == 1:
        outbox.add(EVALUATE_TASK, str(row.id))
        return row, True
    for index, (start, stop) in enumerate(bounds):
        shard = EvaluationShard(evaluation_id=row.id, index=index, start=start, stop=stop,
                                status=JobStatus.QUEUED.value,
                                progress_stage=JobStatus.QUEUED.value,
                                progress_message="waiting for a worker", enqueued_at=utcnow(),
                                completed_entries=[])
        session.add(shard)
        session.flush()
        outbox.add(SHARD_TASK, str(shard.id))
    return row, True


def _build(session: Session, owner: str, body: EvaluationIn, settings: Settings | None,
           bounds: list[tuple[int, int]]) -> Evaluation:
    """The job for a valid request, checked against its model and dataset (``bounds``
    receives a sharded one's slices)."""
    model = models.get(session, owner, body.model_id)
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
    size = dataset.sizes.get(split, 0)
    n = min(body.n_examples, size) if body.n_examples else size
    block = settings.batch_size if settings is not None else 0
    shards = _shard_count(session, body.shards, entries, n, block, settings)
    options: dict[str, Any] = {"n_examples": body.n_examples, "class_map": body.class_map}
    if shards > 1:
        options["block"] = block
        bounds += shard_bounds(n, block, shards)
    return Evaluation(
        model_id=model.id, model_name=model.name, dataset=dataset.name,
        dataset_id=dataset.id, dataset_params=body.dataset_params, split=split, suite=entries,
        seed=body.seed, public=body.public, webhook_url=body.webhook_url, checks=[],
        artifacts={}, completed_entries=[], timings={}, options=options, shards=shards,
    )


def shardable(entries: list[dict[str, Any]]) -> list[int]:
    """The suite entries shards run: adversarial ones, whose work is per example. An audit
    draws from the whole set's robust examples, and the other benchmarks are cheap or draw
    from the whole set; they run once, in the merge."""
    return [i for i, e in enumerate(entries)
            if e.get("benchmark") == "adversarial" and not e.get("audit")]


def shard_bounds(n: int, block: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` slices of ``n`` examples, each a run of whole blocks of ``block`` (the last
    may end mid-block), as even as blocks allow."""
    blocks = -(-n // block)
    cuts = [k * blocks // shards * block for k in range(shards)] + [n]
    return [(cuts[k], min(cuts[k + 1], n)) for k in range(shards)]


def _shard_count(session: Session, asked: int | None, entries: list[dict[str, Any]], n: int,
                 block: int, settings: Settings | None) -> int:
    if asked == 1 or settings is None or (asked is None and not shardable(entries)):
        return 1
    blocks = -(-n // max(block, 1))
    if asked is not None:
        if not shardable(entries):
            raise Invalid("no entry of this suite runs in shards: only adversarial entries "
                          "without an audit do", field="shards")
        if asked > blocks:
            raise Invalid(f"at most {blocks} shards for {n} examples: each shard takes whole "
                          f"batches of {block} (ROBUSTSCOPE_BATCH_SIZE)", field="shards")
        return asked
    since = utcnow() - timedelta(seconds=settings.stale_after)
    live = session.scalar(select(func.count()).select_from(WorkerSeen)
                          .where(WorkerSeen.seen_at >= since)) or 0
    return max(1, min(live, blocks // DEFAULT_BLOCKS_PER_SHARD, MAX_SHARDS))


#: By default a shard gets at least this many batches of examples: below it, starting one
#: more job (a sandbox, the model) costs more than the work it takes off the others.
DEFAULT_BLOCKS_PER_SHARD = 4


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
    for shard in session.scalars(select(EvaluationShard).where(
            EvaluationShard.evaluation_id == row.id,
            EvaluationShard.status.in_(ACTIVE_STATES))):
        jobs.request_cancel(shard, "shard")
    return row


def list_page(session: Session, owner: str, *, status: str | None, model_id: uuid.UUID | None,
              dataset: str | None, cursor: str | None, limit: int,
              model_name: str | None = None) -> tuple[list[Evaluation], str | None]:
    q = owned_rows(Evaluation, owner)
    if model_name:
        q = q.where(Evaluation.model_name == model_name)
    if status:
        q = q.where(Evaluation.status == status)
    if model_id:
        q = q.where(Evaluation.model_id == model_id)
    if dataset:
        q = q.where(Evaluation.dataset == dataset)
    return newest_first(session, q.options(selectinload(Evaluation.results)), Evaluation,
                        cursor, limit)


def to_out(row: Evaluation) -> EvaluationOut:
    shards: list[EvaluationShard] = []
    session = object_session(row)
    if row.shards > 1 and session is not None:
        shards = list(session.scalars(select(EvaluationShard).where(
            EvaluationShard.evaluation_id == row.id).order_by(EvaluationShard.index)))
    return out_of(row, row.results, shards)


def out_of(row: Any, results: Iterable[Any], shards: Iterable[Any] = ()) -> EvaluationOut:
    """The record of an evaluation from anything with its columns as attributes: the ORM row,
    or a Core row of the polling path (:mod:`service.http.polling`) and its results (and
    shards, for a sharded one)."""
    return EvaluationOut(
        **record_fields(row),
        model_id=row.model_id, model_name=row.model_name, dataset=row.dataset,
        dataset_params=row.dataset_params or {}, split=row.split, suite=row.suite,
        seed=row.seed, public=row.public, results=[_result(r) for r in results],
        checks=list(row.checks or []), timings=dict(row.timings or {}),
        artifacts=sorted(row.artifacts or {}),
        n_examples=(row.options or {}).get("n_examples"),
        class_map=(row.options or {}).get("class_map"),
        shards=[ShardOut(index=s.index, start=s.start, stop=s.stop, status=s.status,
                         worker=s.worker, attempts=s.attempts, fraction=s.progress_fraction)
                for s in shards],
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
    "seed", "public", "checks", "timings", "artifacts", "options", "shards"), out_of,
    with_results=True,
    more=select(*(EvaluationShard.__table__.c[name] for name in (
        "index", "start", "stop", "status", "worker", "attempts", "progress_fraction")))
    .where(EvaluationShard.evaluation_id == bindparam("job_id", type_=EvaluationShard.id.type))
    .order_by(EvaluationShard.index), more_if="shards")
