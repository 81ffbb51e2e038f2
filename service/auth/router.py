"""An owner's own keys: list, create (the key is shown once), revoke."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from service.auth import keys
from service.deps import CurrentOwner, SessionDep
from service.errors import problem_responses

router = APIRouter(prefix="/keys", tags=["keys"])
ERRORS = problem_responses(401, 404, 422, 503)


class KeyOut(BaseModel):
    prefix: str
    name: str | None
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(KeyOut):
    key: str = Field(description="the key itself; shown only in this answer")


class KeyIn(BaseModel):
    name: str | None = Field(None, max_length=200)


class KeyList(BaseModel):
    items: list[KeyOut]


@router.get("", response_model=KeyList, responses=ERRORS)
def list_keys(session: SessionDep, owner: CurrentOwner) -> KeyList:
    return KeyList(items=[KeyOut.model_validate(k, from_attributes=True)
                          for k in keys.list_keys(session, owner)])


@router.post("", status_code=201, response_model=KeyCreated, responses=ERRORS)
def create_key(body: KeyIn, session: SessionDep, owner: CurrentOwner) -> KeyCreated:
    key = keys.create_key(session, owner, name=body.name)
    session.flush()
    row = next(k for k in keys.list_keys(session, owner) if k.prefix == keys.key_prefix(key))
    return KeyCreated(key=key, prefix=row.prefix, name=row.name, created_at=row.created_at,
                      revoked_at=None)


@router.delete("/{prefix}", status_code=204, responses=ERRORS)
def revoke_key(prefix: str, request: Request, session: SessionDep,
               owner: CurrentOwner) -> Response:
    """Revoke one of your keys; it is refused from the next request on."""
    keys.revoke(session, prefix, owner)
    request.app.state.keys.forget(prefix)
    return Response(status_code=204)
