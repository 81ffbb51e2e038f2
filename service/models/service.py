"""Model registration: validate the metadata and the bytes, then keep the file."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import BinaryIO

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from contract.jobs import ACTIVE_STATES
from core import storage
from core.errors import Conflict, Invalid, invalid
from core.objectstore import Store
from core.quotas import check_stored_bytes
from core.repository import owned, owned_rows
from core.settings import Settings
from core.tables import Evaluation, Model
from service.http.pagination import newest_first
from service.http.validation import check_depth, loads, reject_nul
from service.models.schemas import ModelMetadata, ModelOut
from service.models.sniff import check_architecture, sniff


def parse_metadata(raw: str | dict[str, object]) -> ModelMetadata:
    try:
        data = loads(raw, "metadata") if isinstance(raw, str) else raw
    except ValueError as exc:
        raise Invalid(f"metadata is not valid JSON: {exc}", field="metadata") from exc
    check_depth(data, "metadata")
    reject_nul(data, "metadata")
    try:
        return ModelMetadata.model_validate(data)
    except ValidationError as exc:
        raise invalid(exc, "metadata", "invalid model metadata") from exc


@dataclass(frozen=True)
class CheckpointUpload:
    """A checkpoint in a request, not read yet: its stream and its model's metadata."""

    file: BinaryIO
    metadata: ModelMetadata


def upload(session: Session, owner: str, file: BinaryIO, metadata: str,
           settings: Settings) -> Model:
    """``POST /models``: the metadata checked, then the stored-bytes quota before the body is
    read (a full quota costs no upload), then the checkpoint received and registered."""
    meta = parse_metadata(metadata)
    check_stored_bytes(session, owner, settings, 0)
    return receive(session, owner, CheckpointUpload(file, meta), settings)


def receive(session: Session, owner: str, checkpoint: CheckpointUpload,
            settings: Settings) -> Model:
    """A checkpoint streamed from a request: received (413 past its limit), counted against
    the owner's stored bytes and registered. Unless the request's transaction commits, the
    file goes again (:func:`core.storage.upload`)."""
    received = storage.receive(checkpoint.file, settings.data_dir,
                               settings.max_checkpoint_bytes, "checkpoint")
    with storage.upload(session, settings.store(), received) as up:
        check_stored_bytes(session, owner, settings, up.size)
        return register(session, owner, up, checkpoint.metadata)


def register(session: Session, owner: str, file: storage.Upload,
             meta: ModelMetadata) -> Model:
    """Check the uploaded file (already on disk), keep it and create the model row."""
    sniffed = sniff(file.path)
    if sniffed.format == "safetensors":
        if not meta.architecture:
            raise Invalid("a safetensors checkpoint needs metadata.architecture",
                          field="metadata.architecture")
        assert sniffed.tensors is not None
        check_architecture(sniffed.tensors, meta.architecture, meta.num_classes,
                           meta.input_shape[0])
    model_id = uuid.uuid4()
    suffix = {"safetensors": ".safetensors", "torchscript": ".pt", "torch_export": ".pt2"}
    rel = file.keep(f"models/{model_id}{suffix[sniffed.format]}")
    row = Model(
        id=model_id, owner=owner, name=meta.name, format=sniffed.format,
        architecture=meta.architecture if sniffed.format == "safetensors" else None,
        num_classes=meta.num_classes, input_shape=meta.input_shape,
        model_metadata=meta.model_dump(), sha256=file.sha256, size_bytes=file.size,
        storage_path=rel,
    )
    session.add(row)
    session.flush()
    return row


def get(session: Session, owner: str, model_id: uuid.UUID) -> Model:
    return owned(session, Model, owner, model_id, "model")


def list_page(session: Session, owner: str, *, sha256: str | None = None,
              name: str | None = None, cursor: str | None = None,
              limit: int = 50) -> tuple[list[Model], str | None]:
    """One page of the owner's models, newest first, optionally only those with these bytes
    (``sha256``) or this name."""
    q = owned_rows(Model, owner)
    if sha256 is not None:
        q = q.where(Model.sha256 == sha256)
    if name is not None:
        q = q.where(Model.name == name)
    return newest_first(session, q, Model, cursor, limit)


def delete(session: Session, owner: str, model_id: uuid.UUID, store: Store) -> None:
    row = get(session, owner, model_id)
    active = session.scalar(
        select(func.count()).select_from(Evaluation).where(
            Evaluation.model_id == model_id, Evaluation.status.in_(ACTIVE_STATES))
    )
    if active:
        raise Conflict(f"model {model_id} has {active} evaluation(s) queued or running; "
                       "cancel them first")
    session.delete(row)
    session.flush()
    storage.remove(store, row.storage_path)


def to_out(row: Model) -> ModelOut:
    meta = row.model_metadata
    return ModelOut(
        id=row.id, name=row.name, format=row.format, architecture=row.architecture,
        num_classes=row.num_classes, input_shape=row.input_shape, mean=meta.get("mean"),
        std=meta.get("std"), class_names=meta.get("class_names"), sha256=row.sha256,
        size_bytes=row.size_bytes, created_at=row.created_at,
    )
