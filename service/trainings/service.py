"""Training jobs: creation (validated against the dataset, with idempotency), reads, listing
and cancellation. The worker side is ``workers/training_jobs.py``."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.orm import Session

from contract import training as contract
from contract.attacks import Norm
from core import jobs
from core.errors import Invalid
from core.queue import TRAIN_TASK, Outbox
from core.repository import owned, owned_rows
from core.settings import Settings
from core.tables import Training
from service.datasets.service import ResolvedDataset, check_params, resolve
from service.evaluations import suite as suites
from service.http.pagination import newest_first
from service.http.polling import Polled
from service.jobs.schemas import RECORD_COLUMNS, record_fields
from service.jobs.service import within_quota
from service.models.sniff import _shape_table
from service.trainings.schemas import Method, ThreatIn, TrainingIn, TrainingOut


def create(session: Session, outbox: Outbox, owner: str, body: TrainingIn,
           idempotency_key: str | None) -> tuple[Training, bool]:
    """Create a job (or return the one this Idempotency-Key made); enqueued after commit."""
    return jobs.create(session, outbox, Training, owner, body, idempotency_key,
                       lambda: _build(session, owner, body), TRAIN_TASK)


def submit(session: Session, outbox: Outbox, owner: str, body: TrainingIn,
           idempotency_key: str | None, settings: Settings) -> tuple[Training, bool]:
    """``POST /trainings``: the create, within the active-jobs quota."""
    return within_quota(session, owner, settings,
                        create(session, outbox, owner, body, idempotency_key))


def _build(session: Session, owner: str, body: TrainingIn) -> Training:
    """The job for a valid request, checked against its dataset and architecture."""
    dataset = _dataset(session, owner, body)
    _check_architecture(body.architecture, dataset)
    spec = spec_of(body, dataset.capabilities.default_eps["linf"])
    threat = spec.threat.model_dump(mode="json")
    evaluate = (suites.expand(body.evaluate, dataset.capabilities)
                if body.evaluate is not None else None)
    held_out = "val" if "val" in dataset.splits else "test"
    name = body.name or (f"{body.architecture}-{body.method.value}" + (
        "" if body.method is Method.STANDARD else f"-{threat['norm']}-{threat['eps']:.4g}"))
    return Training(
        name=name, dataset=dataset.name, dataset_id=dataset.id,
        dataset_params=body.dataset_params, held_out_split=held_out,
        architecture=body.architecture, method=body.method.value, threat=threat,
        epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed,
        options={"optimizer": spec.optimizer.value, "lr_schedule": spec.lr_schedule.value,
                 "beta": body.beta if body.method is Method.TRADES else None,
                 "train_examples": body.train_examples, "eval_examples": body.eval_examples,
                 "n_examples": body.n_examples, "public": body.public},
        evaluate=evaluate, history=[],
    )


def _dataset(session: Session, owner: str, body: TrainingIn) -> ResolvedDataset:
    dataset = resolve(session, owner, body.dataset)
    check_params(body.dataset, body.dataset_params)
    if "train" not in dataset.splits:
        raise Invalid(f"dataset {body.dataset!r} has no 'train' split to train on; it has "
                      f"{', '.join(dataset.splits)}", field="dataset")
    if not {"val", "test"} & set(dataset.splits):
        raise Invalid(f"dataset {body.dataset!r} needs a 'val' or 'test' split to measure "
                      "on during training", field="dataset")
    return dataset


def _check_architecture(architecture: str, dataset: ResolvedDataset) -> None:
    table = _shape_table()
    if architecture not in table:
        raise Invalid(f"unknown architecture {architecture!r}; known: "
                      f"{', '.join(sorted(table))}", field="architecture")
    channels = dataset.input_shape[0]
    any_channels = any("C" in shape for shape in table[architecture].values())
    if channels != 3 and not any_channels:
        raise Invalid(f"{architecture} takes 3 input channels but dataset {dataset.name!r} has "
                      f"{channels}", field="architecture")


def spec_of(body: TrainingIn, default_linf_eps: float) -> contract.TrainingSpec:
    """The contract's training spec for ``body``: the method's defaults where it gives none
    (``contract/training.py``), and the threat with its defaults filled in, as the job record
    shows it and the engine trains by. For ``standard`` training the threat is only what the
    held-out robust accuracy is measured against; without one, the dataset's default l_inf
    eps."""
    d = contract.fill(body.method, optimizer=body.optimizer, lr=body.lr,
                      lr_schedule=body.lr_schedule,
                      steps=body.threat.steps if body.threat is not None else None)
    t = body.threat or ThreatIn(norm=Norm.LINF, eps=default_linf_eps)
    return contract.TrainingSpec(
        architecture=body.architecture, method=body.method,
        threat=contract.fill_threat(body.method, t, d.steps),
        epochs=body.epochs or contract.EPOCHS, batch_size=body.batch_size or contract.BATCH_SIZE,
        lr=d.lr, seed=body.seed, optimizer=d.optimizer, lr_schedule=d.lr_schedule,
        beta=body.beta)


def get(session: Session, owner: str, training_id: uuid.UUID) -> Training:
    return owned(session, Training, owner, training_id, "training")


def cancel(session: Session, owner: str, training_id: uuid.UUID) -> Training:
    row = get(session, owner, training_id)
    jobs.request_cancel(row, "training")
    return row


def list_page(session: Session, owner: str, *, status: str | None, cursor: str | None,
              limit: int) -> tuple[list[Training], str | None]:
    q = owned_rows(Training, owner)
    if status:
        q = q.where(Training.status == status)
    return newest_first(session, q, Training, cursor, limit)


def to_out(row: Any) -> TrainingOut:
    """The record of a training from anything with its columns as attributes: the ORM row,
    or a Core row of the polling path (:mod:`service.http.polling`)."""
    opts = row.options or {}
    return TrainingOut(
        **record_fields(row),
        name=row.name, dataset=row.dataset, dataset_params=row.dataset_params or {},
        held_out_split=row.held_out_split, architecture=row.architecture, method=row.method,
        threat=row.threat, epochs=row.epochs, batch_size=row.batch_size, lr=row.lr,
        seed=row.seed, optimizer=opts.get("optimizer", "sgd"),
        lr_schedule=opts.get("lr_schedule", "cosine"), beta=opts.get("beta"),
        train_examples=opts.get("train_examples"), eval_examples=opts.get("eval_examples", 0),
        n_examples=opts.get("n_examples"),
        evaluate=row.evaluate, history=list(row.history or []), model_id=row.model_id,
        evaluation_id=row.evaluation_id,
    )


#: What a poll of a training reads: the columns :func:`to_out` reads, and no others.
POLLED = Polled("training", Training.__table__, (
    *RECORD_COLUMNS, "name", "dataset", "dataset_params", "held_out_split", "architecture",
    "method", "threat", "epochs", "batch_size", "lr", "seed", "options", "evaluate", "history",
    "model_id", "evaluation_id"), lambda row, _results: to_out(row))
