from __future__ import annotations

import uuid
from pathlib import PurePosixPath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, StreamingResponse
from sqlalchemy.orm import selectinload
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from contract.jobs import JobStatus
from core.errors import Conflict, Invalid, NotFound, problem_responses
from core.objectstore import check_key
from core.tables import Evaluation
from service.evaluations import compare, compare_page, service
from service.evaluations import page as report
from service.evaluations.schemas import EvaluationOut, EvaluationPage
from service.evaluations.service import Submission
from service.http.deps import CurrentOwner, CurrentViewer, OutboxDep, SessionDep, SettingsDep
from service.http.validation import loads, reject_nul
from service.jobs.router import JobRoutes, accepted, add_job_routes
from service.models import service as models
from service.models.service import CheckpointUpload

router = APIRouter(prefix="/evaluations", tags=["evaluations"])
ERRORS = problem_responses(401, 404, 409, 413, 422, 429, 503)
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]


async def read_submission(request: Request,
                          idempotency_key: IdempotencyKey = None) -> Submission:
    """The request's body as a submission (its ``Idempotency-Key`` checked first): JSON, or
    multipart ``checkpoint`` + ``spec`` (the spec's model metadata checked; the checkpoint is
    read by :func:`service.submit`)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        try:
            raw = await request.json()
        except ValueError as exc:
            raise Invalid(f"the body is not valid JSON: {exc}") from exc
        return Submission(raw, idempotency_key)
    form = await request.form(max_part_size=1 << 20)
    checkpoint, spec = form.get("checkpoint"), form.get("spec")
    if not isinstance(checkpoint, UploadFile) or not isinstance(spec, str):
        raise Invalid("a multipart evaluation needs a 'checkpoint' file and a 'spec' JSON "
                      "string", field="checkpoint")
    try:
        spec_obj = loads(spec, "spec")
    except ValueError as exc:
        raise Invalid(f"spec is not valid JSON: {exc}", field="spec") from exc
    if not isinstance(spec_obj, dict):
        raise Invalid("spec must be a JSON object", field="spec")
    reject_nul(spec_obj, "spec")
    meta, fields = service.merge_spec(spec_obj)
    return Submission(fields, idempotency_key,
                      CheckpointUpload(checkpoint.file, models.parse_metadata(meta)))


@router.post("", status_code=202, response_model=EvaluationOut, responses=ERRORS,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": {"$ref": "#/components/schemas/EvaluationIn"}},
                 "multipart/form-data": {
                     "schema": {"$ref": "#/components/schemas/EvaluationUpload"}}}}})
async def create_evaluation(
    response: Response, session: SessionDep, owner: CurrentOwner, outbox: OutboxDep,
    settings: SettingsDep, submission: Annotated[Submission, Depends(read_submission)],
) -> EvaluationOut:
    """JSON ``{model_id, dataset, suite, ...}``, or multipart ``checkpoint`` + ``spec``."""
    row, created = await run_in_threadpool(service.submit, session, outbox, owner, submission,
                                           settings)
    accepted(response, "evaluations", row.id, created)
    return service.to_out(row)


def _filters(
    status: JobStatus | None = None, model_id: uuid.UUID | None = None,
    dataset: str | None = None,
    model_name: Annotated[str | None, Query(max_length=200,
                                            description="the model's name at upload")] = None,
) -> dict[str, Any]:
    return {"status": status, "model_id": model_id, "dataset": dataset, "model_name": model_name}


add_job_routes(router, JobRoutes(
    path="evaluations", name="evaluation", record=EvaluationOut, page=EvaluationPage,
    errors=ERRORS, get=service.get, cancel=service.cancel,
    out=lambda _session, row: service.to_out(row), list_page=service.list_page,
    filters=_filters, docs={
        "get": "The evaluation's record, with an ``ETag``; pollers send it back in "
               "``If-None-Match``\nand get 304 with no body until the job changes "
               "(``service/http/polling.py``). A browser\nlogged in at ``/login`` (a link on a "
               "page) reads it through its session.",
        "events": "Server-sent events: a ``progress`` event on every change, ``end`` at a "
                  "final state."}))


@router.get("/{evaluation_id}/compare", response_model=compare.Comparison, responses=ERRORS)
def compare_evaluation(
    evaluation_id: uuid.UUID, session: SessionDep, owner: CurrentOwner,
    baseline: Annotated[uuid.UUID, Query(description="the evaluation to compare with")],
) -> compare.Comparison:
    """Each metric beside the baseline's, on the same examples: the difference with its 95%
    interval and McNemar's exact p-value (docs/METRICS.md, Uncertainty). 409 while either
    is unfinished or when they measured other examples (dataset, dataset_params, split,
    seed, n_examples)."""
    return compare.compare(session, owner, evaluation_id, baseline)


@router.get("/{evaluation_id}/compare/page", response_class=HTMLResponse, responses=ERRORS)
def compare_evaluation_page(
    evaluation_id: uuid.UUID, session: SessionDep, viewer: CurrentViewer,
    baseline: Annotated[uuid.UUID, Query(description="the evaluation to compare with")],
) -> HTMLResponse:
    """The comparison as a page: every metric of both, the difference and which is better.
    Either evaluation may be the viewer's own or public."""
    rows = []
    for eid in (evaluation_id, baseline):
        row = session.get(Evaluation, eid)
        viewer.may_read(row, bool(row and row.public), f"evaluation {eid}")
        assert row is not None
        rows.append(row)
    ev, base = rows
    try:
        result = compare.between(session, ev, base)
    except Conflict as exc:
        return HTMLResponse(compare_page.render(viewer.owner, ev, base, None, exc.detail,
                                                exc.extra.get("differences")))
    return HTMLResponse(compare_page.render(viewer.owner, ev, base, result, None))


@router.get("/{evaluation_id}/report", response_class=HTMLResponse, responses=ERRORS)
def evaluation_report(evaluation_id: uuid.UUID, session: SessionDep,
                      viewer: CurrentViewer) -> HTMLResponse:
    """The report as a page: the owner's, or anyone's when the evaluation is public (a
    browser without a session is sent to ``/login`` for a private one)."""
    row = session.get(Evaluation, evaluation_id, options=[selectinload(Evaluation.results)])
    viewer.may_read(row, bool(row and row.public),
                    f"evaluation {evaluation_id}")
    assert row is not None
    return HTMLResponse(report.render(service.to_out(row),
                                      report.context(session, row, viewer.owner)))


@router.get("/{evaluation_id}/artifacts/{name:path}", response_class=Response,
            responses={**ERRORS, 200: {"description": "the file's bytes", "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
def evaluation_artifact(evaluation_id: uuid.UUID, name: str, session: SessionDep,
                        owner: CurrentOwner, settings: SettingsDep) -> Response:
    """A file a benchmark kept with its results, e.g. per-example robust flags (``.npz``),
    from the store (streamed where it is an object store)."""
    row = service.get(session, owner, evaluation_id)
    key = (row.artifacts or {}).get(name)
    store = settings.store()
    missing = NotFound(f"evaluation {evaluation_id} has no artifact {name!r}")
    try:
        if not key or not key.startswith(f"artifacts/{evaluation_id}/"):
            raise missing
        check_key(key)
    except ValueError as exc:
        raise missing from exc
    filename = PurePosixPath(name).name
    path = store.local_path(key)
    if path is not None:
        if not path.is_file():
            raise missing
        return FileResponse(path, filename=filename, media_type="application/octet-stream")
    if not store.exists(key):
        raise missing
    return StreamingResponse(store.iter_bytes(key), media_type="application/octet-stream",
                             headers={"Content-Disposition":
                                      f"attachment; filename=\"{filename}\""})
