from __future__ import annotations

import uuid
from pathlib import PurePosixPath
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, StreamingResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session, selectinload
from starlette.concurrency import run_in_threadpool

from contract.jobs import JobStatus
from core import storage
from core.errors import Conflict, Invalid, NotFound, invalid, problem_responses
from core.objectstore import check_key
from core.queue import Outbox
from core.quotas import check_active_jobs, check_stored_bytes
from core.settings import Settings
from core.tables import Evaluation
from core.webhook_policy import check_url
from service.evaluations import compare, compare_page, service
from service.evaluations import page as report
from service.evaluations.schemas import EvaluationIn, EvaluationOut, EvaluationPage
from service.http.deps import CurrentOwner, CurrentViewer, OutboxDep, SessionDep, SettingsDep
from service.http.validation import loads, reject_nul
from service.jobs.router import JobRoutes, accepted, add_job_routes
from service.models import service as models

router = APIRouter(prefix="/evaluations", tags=["evaluations"])
ERRORS = problem_responses(401, 404, 409, 413, 422, 429, 503)
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]


@router.post("", status_code=202, response_model=EvaluationOut, responses=ERRORS,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": {"$ref": "#/components/schemas/EvaluationIn"}},
                 "multipart/form-data": {
                     "schema": {"$ref": "#/components/schemas/EvaluationUpload"}}}}})
async def create_evaluation(
    request: Request, response: Response, session: SessionDep, owner: CurrentOwner,
    outbox: OutboxDep, settings: SettingsDep, idempotency_key: IdempotencyKey = None,
) -> EvaluationOut:
    """JSON ``{model_id, dataset, suite, ...}``, or multipart ``checkpoint`` + ``spec``."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form(max_part_size=1 << 20)
        checkpoint, spec = form.get("checkpoint"), form.get("spec")
        if not hasattr(checkpoint, "file") or not isinstance(spec, str):
            raise Invalid("a multipart evaluation needs a 'checkpoint' file and a 'spec' JSON "
                          "string", field="checkpoint")
        try:
            spec_obj = loads(spec, "spec")
        except ValueError as exc:
            raise Invalid(f"spec is not valid JSON: {exc}", field="spec") from exc
        if not isinstance(spec_obj, dict):
            raise Invalid("spec must be a JSON object", field="spec")
        reject_nul(spec_obj, "spec")
        meta_raw, fields = service.merge_spec(spec_obj)
        meta = models.parse_metadata(meta_raw)
        tmp, sha, size = await run_in_threadpool(
            storage.receive, checkpoint.file, settings.data_dir,  # type: ignore[union-attr]
            settings.max_checkpoint_bytes, "checkpoint")
        try:
            check_stored_bytes(session, owner, settings, size)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        model = await run_in_threadpool(models.register, session, owner, tmp, sha, size, meta,
                                        settings.store())
        uploaded = model.storage_path
        raw = {**fields, "model_id": str(model.id)}
    else:
        uploaded = None
        try:
            raw = await request.json()
        except ValueError as exc:
            raise Invalid(f"the body is not valid JSON: {exc}") from exc
    try:
        body = _parse_body(raw)
        row, created = await run_in_threadpool(_create, session, outbox, owner, body,
                                               idempotency_key, settings)
    except BaseException:
        if uploaded is not None:  # the transaction rolls back; the file must go too
            storage.remove(settings.store(), uploaded)
        raise
    accepted(response, "evaluations", row.id, created)
    return service.to_out(row)


def _create(session: Session, outbox: Outbox, owner: str, body: EvaluationIn,
            idempotency_key: str | None, settings: Settings) -> tuple[Evaluation, bool]:
    """The blocking part of a submission, in one thread hop: the webhook URL's check (it
    resolves the host), the job's creation and the active-jobs quota."""
    check_url(body.webhook_url, settings.webhook_allow_private)
    row, created = service.create(session, outbox, owner, body, idempotency_key, settings)
    if created:
        check_active_jobs(session, owner, settings, 0)
    return row, created


def _parse_body(raw: object) -> EvaluationIn:
    try:
        return EvaluationIn.model_validate(raw)
    except ValidationError as exc:
        raise invalid(exc) from exc


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
