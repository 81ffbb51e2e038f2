from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile

from core.errors import problem_responses
from service.http.deps import CurrentOwner, SessionDep, SettingsDep
from service.models import service
from service.models.schemas import ModelList, ModelOut

router = APIRouter(prefix="/models", tags=["models"])
ERRORS = problem_responses(401, 404, 409, 413, 422, 429, 503)


@router.post("", status_code=201, response_model=ModelOut, responses=ERRORS)
def upload_model(
    session: SessionDep, owner: CurrentOwner, settings: SettingsDep,
    file: UploadFile = File(..., description="the checkpoint: safetensors, TorchScript or "
                                             "torch.export"),
    metadata: str = Form(..., description="JSON: the model's metadata (`ModelMetadata`), e.g. "
                                          "{\"name\": \"net\", \"num_classes\": 10, "
                                          "\"input_shape\": [3, 32, 32]}"),
) -> ModelOut:
    row = service.upload(session, owner, file.file, metadata, settings)
    return service.to_out(row)


@router.get("", response_model=ModelList, responses=ERRORS)
def list_models(
    session: SessionDep, owner: CurrentOwner,
    sha256: Annotated[str | None, Query(pattern="^[0-9a-f]{64}$",
                                        description="only models with these exact bytes")] = None,
    name: Annotated[str | None, Query(max_length=200)] = None,
    cursor: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 50,
) -> ModelList:
    rows, next_cursor = service.list_page(session, owner, sha256=sha256, name=name,
                                          cursor=cursor, limit=limit)
    return ModelList(items=[service.to_out(m) for m in rows], next_cursor=next_cursor)


@router.get("/{model_id}", response_model=ModelOut, responses=ERRORS)
def get_model(model_id: uuid.UUID, session: SessionDep, owner: CurrentOwner) -> ModelOut:
    return service.to_out(service.get(session, owner, model_id))


@router.delete("/{model_id}", status_code=204, responses=ERRORS)
def delete_model(model_id: uuid.UUID, session: SessionDep, owner: CurrentOwner,
                 settings: SettingsDep) -> Response:
    service.delete(session, owner, model_id, settings.store())
    return Response(status_code=204)


