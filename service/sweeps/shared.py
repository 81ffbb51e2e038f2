"""``GET /shared/{token}``: a private report opened read-only through a share link (made at
``POST /share-links`` or with the report page's form). A link that was revoked, has expired
or was never issued opens nothing (404)."""

from __future__ import annotations

from fastapi import APIRouter, Path
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import selectinload

from core import sessions
from core.errors import NotFound
from core.tables import Evaluation, Sweep
from service.evaluations import page as report
from service.evaluations import service as evaluations
from service.http.deps import SessionDep
from service.sweeps import page as sweep_page
from service.sweeps import service as sweeps

router = APIRouter(include_in_schema=False)


@router.get("/shared/{token}", response_class=HTMLResponse)
def shared_report(session: SessionDep,
                  token: str = Path(min_length=16, max_length=100)) -> HTMLResponse:
    link = sessions.shared(session, token)
    if link is None:
        raise NotFound("this share link is not valid: it was revoked, it expired, or it was "
                       "never issued")
    if link.kind == "evaluation":
        row = session.get(Evaluation, link.target_id, options=[selectinload(Evaluation.results)])
        if row is None:
            raise NotFound("the shared evaluation was deleted")
        return HTMLResponse(report.render(evaluations.to_out(row),
                                          report.context(session, row, None, shared=True)))
    sweep = session.get(Sweep, link.target_id)
    if sweep is None:
        raise NotFound("the shared sweep was deleted")
    return HTMLResponse(sweep_page.render(sweeps.to_out(session, sweep), shared=True))
