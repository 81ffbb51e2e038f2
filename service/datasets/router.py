from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile

from core.errors import problem_responses
from service.datasets import service
from service.datasets.schemas import DatasetList, DatasetOut
from service.http.deps import CurrentOwner, OutboxDep, SessionDep, SettingsDep

router = APIRouter(prefix="/datasets", tags=["datasets"])
ERRORS = problem_responses(401, 404, 409, 413, 422, 429, 503)


@router.post("", status_code=202, response_model=DatasetOut, responses=ERRORS)
def upload_dataset(
    response: Response,
    session: SessionDep,
    owner: CurrentOwner,
    settings: SettingsDep,
    outbox: OutboxDep,
    file: UploadFile = File(..., description="the archive: zip, tar or gzipped tar"),
    name: str | None = Form(None, description="a name for the dataset (default: the file's "
                                              "name without its extension)"),
    channels: int | None = Form(None, description="convert every image to 1 (grey) or 3 (RGB) "
                                                  "channels; leave out to keep each image's"),
) -> DatasetOut:
    """A zip or tar archive: a manifest, or an ImageFolder / ImageNet-9 / Waterbirds / RIVAL10
    tree. The archive is kept and decoded by a worker (queue ``ingest``) into the canonical
    array file the workers read; the dataset is ``ingesting`` until then (poll
    ``GET /datasets/{id}``: its ``ingest`` is the job's state and progress)."""
    row = service.upload(session, owner, file.file, file.filename, name, channels, settings,
                         outbox)
    response.headers["Location"] = f"/datasets/{row.id}"
    return service.upload_out(row)


@router.get("", response_model=DatasetList, responses=ERRORS)
def list_datasets(session: SessionDep, owner: CurrentOwner, cursor: str | None = None,
                  limit: Annotated[int, Query(ge=1, le=100)] = 50) -> DatasetList:
    """The built-ins on the first page, then your uploads, newest first."""
    items, next_cursor = service.list_page(session, owner, cursor=cursor, limit=limit)
    return DatasetList(items=items, next_cursor=next_cursor)


@router.get("/{ref}", response_model=DatasetOut, responses=ERRORS)
def get_dataset(ref: str, session: SessionDep, owner: CurrentOwner) -> DatasetOut:
    """A built-in by name, or an upload by id or name, with its ingest ``status``."""
    return service.get_out(session, owner, ref)


@router.delete("/{ref}", status_code=204, responses=ERRORS)
def delete_dataset(ref: str, session: SessionDep, owner: CurrentOwner,
                   settings: SettingsDep) -> Response:
    service.delete(session, owner, ref, settings.store())
    return Response(status_code=204)
