"""Share links of private reports: made and revoked with the API key (``/share-links``, or
the form on a report page, which asks for the key), opened by anyone holding the link
(``GET /shared/{token}``, in ``service.sweeps.shared``)."""

from __future__ import annotations

import html
import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field, model_validator
from sqlalchemy.orm import Session

from core import keys, sessions
from core.errors import Invalid, Unauthorized, problem_responses
from core.repository import owned
from core.settings import Settings
from core.tables import Evaluation, ShareLink, Sweep
from service.auth.login import refuse_cross_site
from service.http.deps import CurrentOwner, SessionDep, SettingsDep
from service.http.svg import page

router = APIRouter(tags=["share links"])
ERRORS = problem_responses(401, 404, 422)


class ShareIn(BaseModel):
    """A read-only link to one of your private reports: name one evaluation or one sweep."""

    evaluation_id: uuid.UUID | None = Field(None, description="an evaluation's report to share")
    sweep_id: uuid.UUID | None = Field(None, description="a sweep's report to share")
    days: float = Field(7.0, gt=0, description="how long the link is valid (at most the "
                                               "deployment's `share_link_max_days`, 90 by "
                                               "default)")

    @model_validator(mode="after")
    def _one_target(self) -> ShareIn:
        if (self.evaluation_id is None) == (self.sweep_id is None):
            raise ValueError("name exactly one of evaluation_id and sweep_id")
        return self


class ShareOut(BaseModel):
    """A share link (never its token, except in the answer that made it)."""

    id: uuid.UUID = Field(description="the link's id, to revoke it")
    kind: str = Field(description="`evaluation` or `sweep`")
    target_id: uuid.UUID = Field(description="the shared evaluation's or sweep's id")
    created_at: datetime = Field(description="when it was made (UTC)")
    expires_at: datetime = Field(description="when it stops opening the report (UTC)")
    revoked_at: datetime | None = Field(description="when it was revoked (UTC); null if live")


class ShareCreated(ShareOut):
    url: str = Field(description="the link; shown only in this answer")


class ShareList(BaseModel):
    items: list[ShareOut] = Field(description="your share links, oldest first")


def _out(row: ShareLink) -> ShareOut:
    return ShareOut(id=row.id, kind=row.kind, target_id=row.target_id, created_at=row.created_at,
                    expires_at=row.expires_at, revoked_at=row.revoked_at)


def _create(session: Session, settings: Settings, owner: str, kind: str,
            target_id: uuid.UUID, days: float) -> tuple[ShareLink, str]:
    if days > settings.share_link_max_days:
        raise Invalid(f"a share link is valid for at most {settings.share_link_max_days} days",
                      field="days")
    if kind == "evaluation":
        owned(session, Evaluation, owner, target_id, kind, field="evaluation_id")
    else:
        owned(session, Sweep, owner, target_id, kind, field="sweep_id")
    return sessions.create_share(session, owner, kind, target_id, days)


def _url(request: Request, token: str) -> str:
    return f"{str(request.base_url).rstrip('/')}/shared/{token}"


@router.post("/share-links", status_code=201, response_model=ShareCreated, responses=ERRORS)
def create_share_link(body: ShareIn, request: Request, session: SessionDep,
                      settings: SettingsDep, owner: CurrentOwner) -> ShareCreated:
    """A link to one private report that anyone holding it can read (not change)
    until it expires or you revoke it."""
    kind, target = (("evaluation", body.evaluation_id) if body.evaluation_id
                    else ("sweep", body.sweep_id))
    assert target is not None
    row, token = _create(session, settings, owner, kind, target, body.days)
    return ShareCreated(**_out(row).model_dump(), url=_url(request, token))


@router.get("/share-links", response_model=ShareList, responses=ERRORS)
def list_share_links(session: SessionDep, owner: CurrentOwner) -> ShareList:
    return ShareList(items=[_out(r) for r in sessions.list_shares(session, owner)])


@router.delete("/share-links/{share_id}", status_code=204, responses=ERRORS)
def revoke_share_link(share_id: uuid.UUID, session: SessionDep,
                      owner: CurrentOwner) -> Response:
    """Revoke a link: it opens nothing from the next request on."""
    sessions.revoke_share(session, owner, share_id)
    return Response(status_code=204)


@router.post("/share-links/form", response_class=HTMLResponse, include_in_schema=False)
def share_form(request: Request, session: SessionDep, settings: SettingsDep,
               api_key: Annotated[str, Form(max_length=500)] = "",
               action: Annotated[str, Form(pattern="^(create|revoke)$")] = "create",
               kind: Annotated[str, Form(pattern="^(evaluation|sweep)$")] = "evaluation",
               target_id: Annotated[uuid.UUID | None, Form()] = None,
               share_id: Annotated[uuid.UUID | None, Form()] = None,
               days: Annotated[float, Form(gt=0)] = 7.0) -> HTMLResponse:
    """The report page's share form: the API key typed into the form authorises it (a
    session cookie authorises no write)."""
    refuse_cross_site(request)
    e = html.escape
    try:
        owner = keys.authenticate(session, api_key.strip()).owner
    except Unauthorized:
        return HTMLResponse(page("robustscope: share", "<h1>Share</h1><p class='flag'>That API "
                                 "key is not valid (or it was revoked); nothing was shared."
                                 "</p>"), status_code=401)
    if action == "revoke":
        if share_id is None:
            raise Invalid("name the link to revoke", field="share_id")
        row = sessions.revoke_share(session, owner, share_id)
        body = (f"<h1>Link revoked</h1><p>The link to {e(row.kind)} {row.target_id} opens "
                "nothing from now on.</p>")
        return HTMLResponse(page("robustscope: share", body))
    if target_id is None:
        raise Invalid("name the report to share", field="target_id")
    row, token = _create(session, settings, owner, kind, target_id, days)
    url = _url(request, token)
    back = (f"/evaluations/{target_id}/report" if kind == "evaluation"
            else f"/sweeps/{target_id}/report")
    body = f"""
<nav><a href='{e(back)}'>back to the report</a></nav>
<h1>Share link made</h1>
<p>Anyone with this link can read the report (not change it) until
{row.expires_at:%Y-%m-%d %H:%M} UTC. It is shown once; copy it now.</p>
<p><input class='share-url' readonly size='90' value='{e(url)}'></p>
<form method='post' action='/share-links/form'><input type='hidden' name='action' value='revoke'>
<input type='hidden' name='share_id' value='{row.id}'>
<label>API key <input type='password' name='api_key' required size='40'></label>
<button type='submit'>Revoke this link</button></form>
<p class='note'>Or later: <code>DELETE /share-links/{row.id}</code> with your key.</p>"""
    return HTMLResponse(page("robustscope: share", body), status_code=201)
