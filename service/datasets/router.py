from __future__ import annotations

from fastapi import APIRouter, File, Form, UploadFile

from service import storage
from service.datasets import service
from service.datasets.ingest import IngestLimits
from service.datasets.schemas import DatasetList, DatasetOut
from service.deps import CurrentOwner, SessionDep, SettingsDep
from service.errors import Invalid, problem_responses

router = APIRouter(prefix="/datasets", tags=["datasets"])
ERRORS = problem_responses(401, 404, 409, 413, 422)


@router.post("", status_code=201, response_model=DatasetOut, responses=ERRORS)
def upload_dataset(
    session: SessionDep,
    owner: CurrentOwner,
    settings: SettingsDep,
    file: UploadFile = File(...),
    name: str | None = Form(None),
    channels: int | None = Form(None),
) -> DatasetOut:
    """A zip or tar archive: a manifest, or an ImageFolder / ImageNet-9 / Waterbirds / RIVAL10
    tree. Images are decoded once, here, into the canonical array file the workers read."""
    name = (name or (file.filename or "dataset").rsplit(".", 1)[0]).strip()
    if channels not in (None, 1, 3):
        raise Invalid("channels must be 1 (grey) or 3 (RGB); leave it out to keep each "
                      "dataset's own", field="channels")
    if not name or len(name) > 200:
        raise Invalid("name must be 1 to 200 characters", field="name")
    tmp, sha, size = storage.receive(
        file.file, settings.data_dir, settings.max_dataset_bytes, "dataset archive"
    )
    limits = IngestLimits(max_archive_bytes=settings.max_dataset_bytes)
    row = service.upload(session, owner, tmp, sha, size, name, settings.data_dir, limits,
                         channels=channels)
    return service.upload_out(row)


@router.get("", response_model=DatasetList, responses=ERRORS)
def list_datasets(session: SessionDep, owner: CurrentOwner) -> DatasetList:
    return DatasetList(items=service.list_all(session, owner))
