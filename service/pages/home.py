"""``GET /``: what robustscope is, where to go next, and (for a request with a key, or a
browser logged in at ``/login``) the caller's recent jobs."""

from __future__ import annotations

import html

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session

from core.repository import owned_rows
from core.tables import Evaluation, Training
from service.http.chrome import dataset_names, nav
from service.http.deps import CurrentViewer, SessionDep
from service.http.svg import page

router = APIRouter()

RECENT = 10

ABOUT = """
<h1>robustscope</h1>
<p>A REST evaluation service for image classifiers. Post a model checkpoint (safetensors,
TorchScript or torch.export), poll the job, and get back how the model stands on two axes,
measured side by side: <b>adversarial robustness</b> (FGSM, PGD, APGD, Square, an
AutoAttack-grade cascade under l_inf, l_2 and l_1) and <b>natural distributional
robustness</b> (reliance on backgrounds, foreground/background noise sensitivity, worst-group
accuracy, corruptions). It also trains models, standard and adversarial, so the trade-off
between the two axes can be seen in one table.</p>
"""


def _rows(session: Session, owner: str) -> str:
    e = html.escape
    evals = session.scalars(owned_rows(Evaluation, owner)
                            .order_by(Evaluation.created_at.desc()).limit(RECENT)).all()
    trainings = session.scalars(owned_rows(Training, owner)
                                .order_by(Training.created_at.desc()).limit(RECENT)).all()
    jobs = sorted([(ev.created_at, "evaluation", ev.id, ev.model_name, ev.dataset, ev.status,
                    f"/evaluations/{ev.id}/report") for ev in evals]
                  + [(t.created_at, "training", t.id, t.name or t.architecture, t.dataset,
                      t.status, f"/trainings/{t.id}") for t in trainings],
                  key=lambda j: j[0], reverse=True)[:RECENT]
    names = dataset_names(session, [j[4] for j in jobs])
    if not jobs:
        return ("<p class='note'>No jobs yet: the README's first example trains a model and "
                "evaluates it on both axes.</p>")
    body = "".join(
        f"<tr><td>{e(created.strftime('%Y-%m-%d %H:%M:%S'))}</td><td>{kind}</td>"
        f"<td>{e(name)}</td><td>{e(names[dataset])}</td><td>{e(status)}</td>"
        f"<td><a href='{e(link)}'>{'report' if kind == 'evaluation' else 'record'}</a></td>"
        f"</tr>" for created, kind, _id, name, dataset, status, link in jobs)
    return ("<table><tr><th>created (UTC)</th><th>job</th><th>model</th><th>dataset</th>"
            f"<th>status</th><th></th></tr>{body}</table>")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def home(session: SessionDep, viewer: CurrentViewer) -> HTMLResponse:
    """The landing page; with a key or a session, the owner's recent jobs too (a key that is
    not valid is a 401, as on every other route)."""
    if viewer.owner is None:
        jobs = ("<p class='note'>Your recent jobs are listed here once you <a href='/login'>log "
                "in</a> with an API key (the key <code>robustscope up</code> prints), or for a "
                "request that sends <code>Authorization: Bearer &lt;api key&gt;</code>.</p>")
    else:
        jobs = _rows(session, viewer.owner)
    top = nav(viewer.owner, "/", ("/docs", "API reference (/docs)"),
              ("/openapi.json", "OpenAPI schema"), ("/health", "health"))
    return HTMLResponse(page("robustscope", top + ABOUT + f"<h2>Recent jobs</h2>{jobs}"))
