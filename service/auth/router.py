"""An owner's own keys: list, create (the key is shown once), revoke."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from core import keys
from core.errors import problem_responses
from service.http.deps import CurrentOwner, SessionDep

router = APIRouter(prefix="/keys", tags=["keys"])
ERRORS = problem_responses(401, 404, 422, 503)


class KeyOut(BaseModel):
    """One of your API keys (never the key itself)."""

    prefix: str = Field(description="the key's first characters; identifies it, e.g. to revoke")
    name: str | None = Field(description="the name given at creation")
    created_at: datetime = Field(description="when it was created (UTC)")
    revoked_at: datetime | None = Field(description="when it was revoked (UTC); null if live")


class KeyCreated(KeyOut):
    key: str = Field(description="the key itself; shown only in this answer")


class KeyIn(BaseModel):
    """A new key for the calling owner."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "ci"}]})

    name: str | None = Field(None, max_length=200, description="a name to tell the key by")


class KeyList(BaseModel):
    """Your keys, revoked ones included."""

    items: list[KeyOut] = Field(description="the keys")


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
