"""Datasets: the built-in catalogue, uploads (ingested once to the canonical npz), lookup."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import storage
from service.datasets.builtin import get_builtin, list_builtins, validate_params
from service.datasets.ingest import DatasetIngestError, IngestLimits, ingest
from service.datasets.schemas import DatasetOut
from service.errors import Conflict, DomainError, Invalid, NotFound
from service.evaluations.suite import Capabilities
from service.tables import Dataset

# Reasonable l_p budgets in [0,1] pixel units when an uploaded dataset names none.
DEFAULT_EPS = {"linf": 8 / 255, "l2": 0.5, "l1": 12.0}


class IngestFailed(DomainError):
    """An uploaded archive was refused; carries the ingest error's own type and rows."""

    def __init__(self, exc: DatasetIngestError) -> None:
        body = exc.problem()
        extra = {k: v for k, v in body.items() if k not in ("type", "title", "status", "detail")}
        super().__init__(exc.detail, **extra)
        self.status, self.type, self.title = exc.status, exc.type, exc.title


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
            capabilities=Capabilities(
                ref, builtin["has_masks"], builtin["has_groups"], True, dict(builtin["default_eps"])
            ),
        )
    row = _find(session, owner, ref)
    info = row.info
    return ResolvedDataset(
        name=str(row.id),
        id=row.id,
        num_classes=info["num_classes"],
        input_shape=list(info["input_shape"]),
        storage_path=row.storage_path,
        splits=list(info["splits"]),
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
    try:
        as_id: uuid.UUID | None = uuid.UUID(ref)
    except ValueError:
        as_id = None
    cond = Dataset.name == ref if as_id is None else or_(Dataset.id == as_id, Dataset.name == ref)
    row = session.scalar(select(Dataset).where(Dataset.owner == owner, cond))
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
    archive: Path,
    sha256: str,
    size: int,
    name: str,
    data_dir: Path,
    limits: IngestLimits,
    channels: int | None = None,
) -> Dataset:
    if get_builtin(name) is not None:
        archive.unlink(missing_ok=True)
        raise Conflict(f"{name!r} is the name of a built-in dataset; choose another")
    if session.scalar(select(Dataset.id).where(Dataset.owner == owner, Dataset.name == name)):
        archive.unlink(missing_ok=True)
        raise Conflict(f"you already have a dataset named {name!r}")
    dataset_id = uuid.uuid4()
    rel = f"datasets/{dataset_id}.npz"
    dest = data_dir / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        info = ingest(archive, dest, name=name, limits=limits, channels=channels)
    except DatasetIngestError as exc:
        raise IngestFailed(exc) from exc
    finally:
        archive.unlink(missing_ok=True)
    row = Dataset(
        id=dataset_id,
        owner=owner,
        name=name,
        info=info.as_dict(),
        sha256=sha256,
        size_bytes=size,
        storage_path=rel,
    )
    session.add(row)
    try:
        session.flush()
    except IntegrityError as exc:
        storage.remove(data_dir, rel)
        raise Conflict(f"you already have a dataset named {name!r}") from exc
    return row


def list_all(session: Session, owner: str) -> list[DatasetOut]:
    builtins = [builtin_out(b["name"]) for b in list_builtins()]
    uploads = session.scalars(
        select(Dataset).where(Dataset.owner == owner).order_by(Dataset.created_at.desc())
    )
    return builtins + [upload_out(r) for r in uploads]


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
    )
