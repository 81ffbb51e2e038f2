"""Sweeps: one training per grid point (each queues its evaluation when it succeeds), and the
trade-off table read back from their results."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from contract.jobs import FINAL_STATES, JobStatus
from contract.stats import interval
from core import jobs
from core.errors import Conflict
from core.queue import Outbox
from core.repository import owned, owned_rows
from core.settings import Settings
from core.tables import Evaluation, Sweep, Training
from service.datasets.service import resolve
from service.evaluations import service as evaluations
from service.http.pagination import newest_first
from service.jobs.schemas import Progress
from service.jobs.service import within_quota
from service.sweeps.schemas import SweepIn, SweepOut, SweepRow
from service.trainings import service as trainings
from service.trainings.schemas import Method, ThreatIn, TrainingIn


def default_suite(session: Session, owner: str, body: SweepIn) -> list[dict[str, Any]]:
    """Both axes: clean and APGD-CE robust accuracy at the grid's threats, and, where the
    dataset has foreground masks, the backgrounds benchmark (BG-gap) and RFS, and where it
    has groups, worst-group accuracy."""
    caps = resolve(session, owner, body.dataset).capabilities
    suite: list[dict[str, Any]] = [{"benchmark": "clean"}]
    threats: dict[str, list[float]] = {str(n): v for n, v in body.threats.items()} or {
        "linf": [caps.default_eps["linf"]]}
    suite += [{"benchmark": "adversarial", "attack": "apgd-ce", "norm": norm,
               "eps": sorted(values)} for norm, values in threats.items()]
    if caps.has_masks:
        suite += [{"benchmark": "backgrounds"}, {"benchmark": "fg_bg_noise"}]
    if caps.has_groups:
        suite.append({"benchmark": "groups"})
    return suite


def create(session: Session, outbox: Outbox, owner: str, body: SweepIn,
           idempotency_key: str | None = None) -> tuple[Sweep, bool]:
    """Queue the grid's trainings (or return the sweep this Idempotency-Key made, so a retried
    request never queues the grid twice)."""
    return jobs.create(session, outbox, Sweep, owner, body, idempotency_key,
                       lambda: _build(session, outbox, owner, body))


def submit(session: Session, outbox: Outbox, owner: str, body: SweepIn,
           idempotency_key: str | None, settings: Settings) -> tuple[Sweep, bool]:
    """``POST /sweeps``: the create, within the active-jobs quota."""
    return within_quota(session, owner, settings,
                        create(session, outbox, owner, body, idempotency_key))


def _build(session: Session, outbox: Outbox, owner: str, body: SweepIn) -> Sweep:
    """The sweep for a valid request, its trainings queued."""
    suite = body.suite if body.suite is not None else default_suite(session, owner, body)
    ids: list[str] = []
    for method, norm, eps in body.grid():
        threat = None
        if norm is not None and eps is not None:
            threat = ThreatIn(norm=norm, eps=eps,
                              steps=None if method is Method.FGSM_RS else body.steps)
        name = f"{body.architecture}-{method.value}" + (
            f"-{norm.value}-{eps:.4g}" if norm is not None and eps is not None else "")
        spec = TrainingIn(
            dataset=body.dataset, dataset_params=body.dataset_params,
            architecture=body.architecture, method=method, threat=threat, epochs=body.epochs,
            batch_size=body.batch_size, lr=body.lr, seed=body.seed, evaluate=suite, name=name,
            optimizer=body.optimizer, lr_schedule=body.lr_schedule,
            train_examples=body.train_examples, eval_examples=body.eval_examples,
            n_examples=body.n_examples, public=body.public)
        row, _ = trainings.create(session, outbox, owner, spec, None)
        ids.append(str(row.id))
    return Sweep(spec={**body.model_dump(mode="json"), "suite": suite}, training_ids=ids)


def list_page(session: Session, owner: str, *, cursor: str | None,
              limit: int) -> tuple[list[Sweep], str | None]:
    return newest_first(session, owned_rows(Sweep, owner), Sweep, cursor, limit)


def get(session: Session, owner: str, sweep_id: uuid.UUID) -> Sweep:
    return owned(session, Sweep, owner, sweep_id, "sweep")


def _members(session: Session, sweep: Sweep) -> tuple[list[Training],
                                                       dict[uuid.UUID, Evaluation]]:
    ids = [uuid.UUID(i) for i in sweep.training_ids]
    by_id = {t.id: t for t in session.scalars(select(Training).where(Training.id.in_(ids)))}
    runs = [by_id[i] for i in ids if i in by_id]
    eval_ids = [t.evaluation_id for t in runs if t.evaluation_id is not None]
    evals = {e.id: e for e in session.scalars(
        select(Evaluation).where(Evaluation.id.in_(eval_ids))
        .options(selectinload(Evaluation.results)))} if eval_ids else {}
    return runs, evals


def cancel(session: Session, owner: str, sweep_id: uuid.UUID) -> Sweep:
    sweep = get(session, owner, sweep_id)
    runs, evals = _members(session, sweep)
    live = [t for t in runs if t.status not in FINAL_STATES]
    live_evals = [e for e in evals.values() if e.status not in FINAL_STATES]
    if not live and not live_evals:
        raise Conflict(f"sweep {sweep_id} has nothing left to cancel")
    for t in live:
        trainings.cancel(session, owner, t.id)
    for e in live_evals:
        evaluations.cancel(session, owner, e.id)
    return sweep


def to_out(session: Session, sweep: Sweep) -> SweepOut:
    runs, evals = _members(session, sweep)
    rows = [_row(t, evals.get(t.evaluation_id) if t.evaluation_id else None) for t in runs]
    return SweepOut(id=sweep.id, status=_status(runs, evals),
                    progress=_progress(runs, evals), spec=sweep.spec,
                    training_ids=[uuid.UUID(i) for i in sweep.training_ids],
                    created_at=sweep.created_at, table=rows)


def _row(t: Training, ev: Evaluation | None) -> SweepRow:
    standard = t.method == Method.STANDARD.value
    row = SweepRow(
        training_id=t.id, method=t.method, norm=None if standard else t.threat["norm"],
        eps=None if standard else t.threat["eps"], training_status=t.status,
        model_id=t.model_id, evaluation_id=t.evaluation_id,
        evaluation_status=ev.status if ev else None, clean_accuracy=None, robust_accuracy={},
        bg_gap=None, mixed_rand_accuracy=None, rfs=None, name=t.name,
        degenerate=None if ev is None or ev.status != JobStatus.SUCCEEDED else any(
            c.get("name") == "degenerate_predictions" and not c.get("passed")
            for c in ev.checks or []),
        failed_checks=sorted({str(c.get("name")) for c in (ev.checks or []) if ev is not None
                              and not c.get("passed")}) if ev is not None else [])
    for r in ev.results if ev else []:
        field = None  # the table's name for an accuracy, whose interval it shows
        if (r.benchmark, r.metric) == ("clean", "accuracy"):
            row.clean_accuracy = r.value
            field = "clean_accuracy"
        elif (r.benchmark, r.metric) == ("adversarial", "robust_accuracy"):
            threat = f"{r.params['norm']}:{r.params['eps']:.4g}"
            row.robust_accuracy[threat] = r.value
            field = f"robust_accuracy:{threat}"
        elif (r.benchmark, r.metric) == ("adversarial", "zero_gradient_fraction"):
            row.zero_gradient_fraction[str(r.params["norm"])] = r.value
        elif (r.benchmark, r.metric) == ("backgrounds", "bg_gap"):
            row.bg_gap = r.value
        elif (r.benchmark, r.metric) == ("backgrounds", "accuracy") and \
                r.params.get("variant") == "mixed_rand":
            row.mixed_rand_accuracy = r.value
            field = "mixed_rand_accuracy"
        elif (r.benchmark, r.metric) == ("fg_bg_noise", "rfs") and r.params.get("sigma") == "mean":
            row.rfs = r.value
        elif (r.benchmark, r.metric) == ("groups", "worst_group_accuracy"):
            row.worst_group_accuracy = r.value
            field = "worst_group_accuracy"
        ci = interval(r.value, r.n)
        if field is not None and ci is not None:
            row.intervals[field] = ci
    return row


def _pending(runs: list[Training], evals: dict[uuid.UUID, Evaluation]) -> list[str]:
    """The states of every job the sweep still has or will have (a training's evaluation
    counts as queued until the training makes it)."""
    states = [t.status for t in runs]
    for t in runs:
        if t.evaluate is None:
            continue
        ev = evals.get(t.evaluation_id) if t.evaluation_id else None
        if ev is not None:
            states.append(ev.status)
        elif t.status not in FINAL_STATES:
            states.append(JobStatus.QUEUED)
    return states


def _status(runs: list[Training], evals: dict[uuid.UUID, Evaluation]) -> str:
    states = _pending(runs, evals)
    if all(s == JobStatus.QUEUED for s in states):
        return JobStatus.QUEUED
    if any(s not in FINAL_STATES for s in states):
        return JobStatus.RUNNING
    if all(s == JobStatus.SUCCEEDED for s in states):
        return JobStatus.SUCCEEDED
    return JobStatus.FAILED if JobStatus.FAILED in states else JobStatus.CANCELLED


def _progress(runs: list[Training], evals: dict[uuid.UUID, Evaluation]) -> Progress:
    fractions = []
    for t in runs:
        ev = evals.get(t.evaluation_id) if t.evaluation_id else None
        if t.evaluate is None:
            fractions.append(t.progress_fraction)
        else:
            fractions.append(0.5 * t.progress_fraction + 0.5 * (ev.progress_fraction if ev
                                                                 else 0.0))
    trained = sum(t.status == JobStatus.SUCCEEDED for t in runs)
    evaluated = sum(e.status == JobStatus.SUCCEEDED for e in evals.values())
    message = f"{trained} of {len(runs)} trainings and {evaluated} evaluations succeeded"
    fraction = sum(fractions) / len(fractions) if fractions else 1.0
    return Progress(fraction=fraction, stage=_status(runs, evals), message=message)
