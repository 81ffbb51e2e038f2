"""Datasets: the built-in catalogue, uploads (ingested once to the canonical npz), lookup."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from contract.jobs import ACTIVE_STATES, DatasetStatus
from core import storage
from core.errors import Conflict, Invalid, NotFound, problem_body
from core.objectstore import Store, StoreError, file_sha256
from core.queue import INGEST_TASK, Outbox
from core.quotas import check_stored_bytes
from core.repository import owned_rows
from core.settings import Settings
from core.tables import Dataset, Evaluation, Training, utcnow
from service.datasets import repository
from service.datasets.builtin import get_builtin, list_builtins, validate_params
from service.datasets.ingest import DatasetIngestError, IngestLimits, ingest
from service.datasets.schemas import Capabilities, DatasetOut
from service.http.pagination import newest_first
from service.http.validation import reject_nul

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
    """Keeps the archive and queues its ingest; the row is ``ingesting`` until a worker has
    decoded it (the API process never decodes an upload). ``name`` defaults to the file's
    name without its extension. ``channels`` (1 or 3) converts every image when the worker
    decodes them; None keeps a grey dataset grey. The stored-bytes quota is checked before the
    archive is read and again with its size; the archive goes again unless the request's
    transaction commits (:func:`core.storage.upload`)."""
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
        enqueued_at=utcnow(),
    )
    session.add(row)
    try:
        session.flush()
    except IntegrityError as exc:  # the rollback removes the stored archive
        raise Conflict(f"you already have a dataset named {name!r}", field="name") from exc
    outbox.add(INGEST_TASK, str(dataset_id))
    return row


def archive_path(dataset_id: uuid.UUID) -> str:
    return f"datasets/{dataset_id}.upload"


def run_ingest(sessions: sessionmaker[Session], dataset_id: uuid.UUID, store: Store,
               work_dir: Path, limits: IngestLimits) -> str | None:
    """Decodes a queued upload into its canonical npz; the row becomes ``ready`` or ``failed``
    (with the ingest error's problem body, every bad row named). No transaction is held while
    the archive is decoded. The archive comes from the store (read in place where the store is
    a local folder, else fetched into ``work_dir/tmp``); the npz is written there and put in the
    store, its SHA-256 recorded (``info.content_sha256``) for the workers' caches. Returns the
    final status, or None when there is nothing to do (an unknown id, or an upload already
    ingested: a redelivered task)."""
    with sessions() as session:
        row = session.get(Dataset, dataset_id)
        if row is None or row.status != DatasetStatus.INGESTING:
            return None
        name, key = row.name, row.storage_path
        channels = (row.info or {}).get("requested_channels")
    tmp_dir = work_dir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    dest = tmp_dir / f"ingest-{dataset_id}-{uuid.uuid4().hex[:8]}.npz"
    fetched = tmp_dir / f"ingest-{dataset_id}-{uuid.uuid4().hex[:8]}.upload"
    status, info, error = DatasetStatus.FAILED, None, None
    try:
        archive = store.local_path(archive_path(dataset_id))
        if archive is None:
            store.download(archive_path(dataset_id), fetched)
            archive = fetched
        info = ingest(archive, dest, name=name, limits=limits, channels=channels).as_dict()
    except DatasetIngestError as exc:
        error = exc.problem()
    except (FileNotFoundError, StoreError):
        error = problem_body(422, "dataset-archive-missing", "Archive missing",
                             "the uploaded archive is no longer stored; upload it again")
    try:
        if info is not None:  # a store that fails here raises: the ingest is sent again
            info["content_sha256"] = file_sha256(dest)
            store.put_file(key, dest)
            status = DatasetStatus.READY
    finally:
        dest.unlink(missing_ok=True)
        fetched.unlink(missing_ok=True)
    with sessions() as session, session.begin():
        row = session.get(Dataset, dataset_id)
        if row is None:  # deleted meanwhile
            storage.remove(store, key)
            storage.remove(store, archive_path(dataset_id))
            return None
        # A redelivered task finished first; its file stays.
        if row.status != DatasetStatus.INGESTING:
            return None
        row.status, row.error, row.finished_at = status, error, utcnow()
        if info is not None:
            row.info = info
    storage.remove(store, archive_path(dataset_id))
    return status


def delete(session: Session, owner: str, ref: str, store: Store) -> None:
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


def upload_out(row: Dataset) -> DatasetOut:
    if row.status != DatasetStatus.READY:
        return DatasetOut(
            id=str(row.id), name=row.name, builtin=False, status=row.status, error=row.error,
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
    )
