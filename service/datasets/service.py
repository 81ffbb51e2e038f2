"""Datasets: the built-in catalogue, uploads (ingested once to the canonical npz), lookup."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, BinaryIO

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from contract.jobs import ACTIVE_STATES, DatasetStatus, JobStatus
from core import storage
from core.errors import Conflict, Invalid, NotFound
from core.objectstore import Store
from core.queue import INGEST_TASK, Outbox
from core.quotas import check_stored_bytes
from core.repository import owned_rows
from core.settings import Settings
from core.tables import Dataset, DatasetIngest, Evaluation, Training, utcnow
from service.datasets import repository
from service.datasets.builtin import get_builtin, list_builtins, validate_params
from service.datasets.schemas import Capabilities, DatasetOut, IngestOut
from service.http.pagination import newest_first
from service.http.validation import reject_nul
from service.jobs.schemas import Progress

# Reasonable l_p budgets in [0,1] pixel units when an uploaded dataset names none.
DEFAULT_EPS = {"linf": 8 / 255, "l2": 0.5, "l1": 12.0}


class DatasetNotReady(Conflict):
    """An evaluation or training named an upload that is still ingesting, or failed to."""

    type, title = "dataset-not-ready", "Dataset not ready"

    def __init__(self, row: Dataset) -> None:
        what = ("is still being ingested; retry when GET /datasets/{id} says ready"
                if row.status == DatasetStatus.INGESTING
                else "failed to ingest; see GET /datasets/{id}")
        super().__init__(f"dataset {row.name!r} {what}".replace("{id}", str(row.id)),
                         field="dataset", dataset_status=row.status)


@dataclass(frozen=True)
class ResolvedDataset:
    """A dataset as an evaluation refers to it."""

    name: str  # what the evaluation records: a built-in name or the upload's id
    id: uuid.UUID | None
    num_classes: int
    input_shape: list[int]
    capabilities: Capabilities
    storage_path: str | None
    splits: list[str]
    sizes: dict[str, int]  # examples per split


def resolve(session: Session, owner: str, ref: str) -> ResolvedDataset:
    """A built-in by name, or one of the owner's uploads by id or name."""
    builtin = get_builtin(ref)
    if builtin is not None:
        return ResolvedDataset(
            name=ref,
            id=None,
            num_classes=builtin["num_classes"],
            input_shape=list(builtin["input_shape"]),
            storage_path=None,
            splits=list(builtin["splits"]),
            sizes=dict(builtin["num_examples"]),
            capabilities=Capabilities(
                ref, builtin["has_masks"], builtin["has_groups"], True, dict(builtin["default_eps"])
            ),
        )
    row = _find(session, owner, ref)
    if row.status != DatasetStatus.READY:
        raise DatasetNotReady(row)
    info = row.info
    return ResolvedDataset(
        name=str(row.id),
        id=row.id,
        num_classes=info["num_classes"],
        input_shape=list(info["input_shape"]),
        storage_path=row.storage_path,
        splits=list(info["splits"]),
        sizes=dict(info["splits"]),
        capabilities=Capabilities(
            row.name, info["has_masks"], info["has_groups"], False, dict(DEFAULT_EPS)
        ),
    )


def check_params(ref: str, params: dict[str, Any]) -> None:
    if not params:
        return
    if get_builtin(ref) is None:
        raise Invalid("dataset_params apply to built-in datasets only", field="dataset_params")
    problems = validate_params(ref, params)
    if problems:
        raise Invalid("invalid dataset_params: " + "; ".join(problems), field="dataset_params")


def _find(session: Session, owner: str, ref: str) -> Dataset:
    row = repository.by_ref(session, owner, ref)
    if row is None:
        known = ", ".join(b["name"] for b in list_builtins())
        raise NotFound(
            f"no dataset {ref!r}: name a built-in ({known}) or an uploaded dataset's id or name",
            field="dataset",
        )
    return row


def upload(
    session: Session,
    owner: str,
    file: BinaryIO,
    filename: str | None,
    name: str | None,
    channels: int | None,
    settings: Settings,
    outbox: Outbox,
) -> Dataset:
    """Keeps the archive and queues its ingest job (:class:`DatasetIngest`, sent after the
    transaction commits); the row is ``ingesting`` until a worker has decoded it (the API
    process never decodes an upload). ``name`` defaults to the file's name without its
    extension. ``channels`` (1 or 3) converts every image when the worker decodes them; None
    keeps a grey dataset grey. The stored-bytes quota is checked before the archive is read
    and again with its size; the archive goes again unless the request's transaction commits
    (:func:`core.storage.upload`)."""
    name = (name or (filename or "dataset").rsplit(".", 1)[0]).strip()
    reject_nul(name, "name")
    if channels not in (None, 1, 3):
        raise Invalid("channels must be 1 (grey) or 3 (RGB); leave it out to keep each "
                      "dataset's own", field="channels")
    if not name or len(name) > 200:
        raise Invalid("name must be 1 to 200 characters", field="name")
    check_stored_bytes(session, owner, settings, 0)
    received = storage.receive(file, settings.data_dir, settings.max_dataset_bytes,
                               "dataset archive")
    with storage.upload(session, settings.store(), received) as up:
        check_stored_bytes(session, owner, settings, up.size)
        if get_builtin(name) is not None:
            raise Conflict(f"{name!r} is the name of a built-in dataset; choose another",
                           field="name")
        if repository.name_taken(session, owner, name):
            raise Conflict(f"you already have a dataset named {name!r}", field="name")
        dataset_id = uuid.uuid4()
        up.keep(archive_path(dataset_id))
    row = Dataset(
        id=dataset_id,
        owner=owner,
        name=name,
        info={"requested_channels": channels} if channels is not None else {},
        sha256=up.sha256,
        size_bytes=up.size,
        storage_path=f"datasets/{dataset_id}.npz",
        status=DatasetStatus.INGESTING,
        ingest=DatasetIngest(id=uuid.uuid4(), status=JobStatus.QUEUED.value,
                             progress_stage=JobStatus.QUEUED.value,
                             progress_message="waiting for a worker", enqueued_at=utcnow()),
    )
    session.add(row)
    try:
        session.flush()
    except IntegrityError as exc:  # the rollback removes the stored archive
        raise Conflict(f"you already have a dataset named {name!r}", field="name") from exc
    assert row.ingest is not None
    outbox.add(INGEST_TASK, str(row.ingest.id))
    return row


def archive_path(dataset_id: uuid.UUID) -> str:
    return f"datasets/{dataset_id}.upload"


def delete(session: Session, owner: str, ref: str, store: Store) -> None:
    """Removes an upload and its files. Its ingest job goes with it (``ON DELETE CASCADE``):
    a worker still decoding it finds its job gone at its next read of the cancel flag and
    stops as for a cancel, writing nothing; what it had stored meanwhile it removes."""
    if get_builtin(ref) is not None:
        raise Conflict(f"{ref!r} is a built-in dataset; it cannot be deleted")
    row = _find(session, owner, ref)
    active = session.scalar(
        select(func.count()).select_from(Evaluation).where(
            Evaluation.dataset_id == row.id, Evaluation.status.in_(ACTIVE_STATES))
    ) or 0
    active += session.scalar(
        select(func.count()).select_from(Training).where(
            Training.dataset_id == row.id, Training.status.in_(ACTIVE_STATES))
    ) or 0
    if active:
        raise Conflict(f"dataset {row.name!r} has {active} job(s) queued or running; "
                       "cancel them first")
    session.delete(row)
    session.flush()
    storage.remove(store, row.storage_path)
    storage.remove(store, archive_path(row.id))


def get_out(session: Session, owner: str, ref: str) -> DatasetOut:
    if get_builtin(ref) is not None:
        return builtin_out(ref)
    return upload_out(_find(session, owner, ref))


def list_page(session: Session, owner: str, *, cursor: str | None,
              limit: int) -> tuple[list[DatasetOut], str | None]:
    """The built-ins (first page only, beside the first ``limit`` uploads), then the owner's
    uploads newest first."""
    builtins = [] if cursor else [builtin_out(b["name"]) for b in list_builtins()]
    rows, next_cursor = newest_first(session, owned_rows(Dataset, owner), Dataset, cursor, limit)
    return builtins + [upload_out(r) for r in rows], next_cursor


def builtin_out(name: str) -> DatasetOut:
    b = get_builtin(name)
    assert b is not None
    return DatasetOut(
        id=b["name"],
        name=b["name"],
        builtin=True,
        num_classes=b["num_classes"],
        input_shape=b["input_shape"],
        num_examples=sum(b["num_examples"].values()),
        splits=dict(b["num_examples"]),
        has_masks=b["has_masks"],
        has_groups=b["has_groups"],
        class_names=b["class_names"],
        group_names=b["group_names"],
        default_eps=dict(b["default_eps"]),
        parameters=dict(b["parameters"]),
        layout=None,
        sha256=None,
        description=b["description"],
        warnings=[],
        created_at=None,
    )


def ingest_out(job: DatasetIngest | None) -> IngestOut | None:
    if job is None:
        return None
    return IngestOut(id=job.id, status=job.status,
                     progress=Progress(fraction=job.progress_fraction, stage=job.progress_stage,
                                       message=job.progress_message),
                     attempts=job.attempts, started_at=job.started_at,
                     finished_at=job.finished_at, error=job.error)


def upload_out(row: Dataset) -> DatasetOut:
    if row.status != DatasetStatus.READY:
        return DatasetOut(
            id=str(row.id), name=row.name, builtin=False, status=row.status, error=row.error,
            ingest=ingest_out(row.ingest),
            num_classes=None, input_shape=None, num_examples=None, splits={},
            has_masks=None, has_groups=None, class_names=[], group_names=[],
            default_eps=dict(DEFAULT_EPS), parameters={}, layout=None, sha256=row.sha256,
            description=f"uploaded archive, {row.status}", warnings=[],
            created_at=row.created_at, finished_at=row.finished_at)
    info = row.info
    return DatasetOut(
        id=str(row.id),
        name=row.name,
        builtin=False,
        num_classes=info["num_classes"],
        input_shape=info["input_shape"],
        num_examples=info["num_examples"],
        splits=dict(info["splits"]),
        has_masks=info["has_masks"],
        has_groups=info["has_groups"],
        class_names=info["class_names"],
        group_names=info["group_names"],
        default_eps=dict(DEFAULT_EPS),
        parameters={},
        layout=info["layout"],
        sha256=row.sha256,
        description=f"uploaded ({info['layout']} layout)",
        warnings=list(info["warnings"]),
        created_at=row.created_at,
        finished_at=row.finished_at,
        ingest=ingest_out(row.ingest),
    )
