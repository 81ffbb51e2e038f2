"""Running one training job: claim it, supervise it, train, register the model, queue its
evaluation.

The same guarantees as evaluations (``workers/jobs.py``): the claim counts the attempt and
fences every write; the engine checkpoints after each epoch (``state/trainings/<id>/``), so
a job whose worker was killed is re-sent by the reconciler and resumes after its last
finished epoch. Success is one transaction: the model row, the queued evaluation and the
job's final state are written together or not at all, so a model is never registered twice.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError

from service.evaluations import service as evaluations
from service.evaluations.schemas import EvaluationIn
from service.models import service as models
from service.models.schemas import ModelMetadata
from service.queue import Outbox
from service.tables import Dataset, Training, utcnow
from workers.engine import ENGINE_VERSION
from workers.engine.data import load_builtin, load_npz
from workers.engine.threats import Norm
from workers.engine.training import (
    LrSchedule,
    Method,
    Optimizer,
    ThreatSpec,
    TrainingError,
    TrainSpec,
    train,
)
from workers.engine.types import Cancelled, EvalData
from workers.jobs import _ERROR_TYPES, Superseded, Supervisor, _fail_exhausted, claim
from workers.runtime import Runtime

log = logging.getLogger("robustscope.worker")

_ERRORS: dict[type[Exception], str] = {**_ERROR_TYPES, TrainingError: "training-error"}
_JOB_ERRORS = tuple(_ERRORS)


@dataclass
class TrainingJob:
    id: uuid.UUID
    token: int
    owner: str
    name: str
    spec: TrainSpec
    dataset: str
    dataset_path: Path | None
    dataset_params: dict[str, Any]
    held_out_split: str
    train_examples: int | None
    eval_examples: int
    evaluate: list[dict[str, Any]] | None
    n_examples: int | None = None  # of the evaluation the training queues


def load_job(rt: Runtime, tid: uuid.UUID, token: int) -> TrainingJob:
    with rt.sessions() as s:
        row = s.get(Training, tid)
        assert row is not None
        dataset_path = None
        if row.dataset_id is not None:
            ds = s.get(Dataset, row.dataset_id)
            if ds is None:
                raise TrainingError("the dataset of this training was deleted")
            dataset_path = rt.settings.data_dir / ds.storage_path
        opts, threat = row.options or {}, row.threat
        spec = TrainSpec(
            architecture=row.architecture, method=Method(row.method),
            threat=ThreatSpec(Norm(threat["norm"]), float(threat["eps"]), int(threat["steps"]),
                              float(threat["step_size"])),
            epochs=row.epochs, batch_size=row.batch_size, lr=row.lr, seed=row.seed,
            optimizer=Optimizer(opts.get("optimizer", "sgd")),
            lr_schedule=LrSchedule(opts.get("lr_schedule", "cosine")),
            beta=float(opts.get("beta") or 6.0),
        )
        return TrainingJob(
            id=tid, token=token, owner=row.owner, name=row.name, spec=spec, dataset=row.dataset,
            dataset_path=dataset_path, dataset_params=dict(row.dataset_params or {}),
            held_out_split=row.held_out_split, train_examples=opts.get("train_examples"),
            eval_examples=int(opts.get("eval_examples") or 1000),
            evaluate=row.evaluate, n_examples=opts.get("n_examples"))


def run(rt: Runtime, tid: uuid.UUID, send_task: Any = None) -> str:
    """Run training ``tid`` if this worker can claim it; returns what happened."""
    token = claim(rt, tid, Training)
    if token is None:
        _fail_exhausted(rt, tid, Training)
        return "skipped"
    try:
        job = load_job(rt, tid, token)
    except _JOB_ERRORS as exc:
        _finish(rt, tid, token, "failed", _error(exc))
        return "failed"
    with Supervisor(rt, job, Training) as sup:
        try:
            _train(rt, job, sup, send_task)
            return "succeeded"
        except Superseded:
            log.warning("training %s was taken over by another worker; stopping", tid)
            return "superseded"
        except DBAPIError:
            log.warning("database error during training %s; it will be resumed", tid,
                        exc_info=True)
            raise
        except Cancelled:
            status, error = "cancelled", None
        except _JOB_ERRORS as exc:
            status, error = "failed", _error(exc)
        except Exception as exc:  # a crash in the engine is reported, not lost
            log.exception("training %s crashed", tid)
            status, error = "failed", {"type": "internal-error",
                                       "detail": f"{type(exc).__name__}: {exc}"}
    _finish(rt, tid, token, status, error)
    return status


def _error(exc: BaseException) -> dict[str, str]:
    for cls, name in _ERRORS.items():
        if isinstance(exc, cls):
            return {"type": name, "detail": str(exc) or cls.__name__}
    return {"type": "internal-error", "detail": str(exc)}


def describe_device(rt: Runtime) -> str:
    """Training runs in fp32 (no autocast), whatever precision the attack search uses."""
    if rt.device.type == "cuda":
        return f"{rt.device} ({torch.cuda.get_device_name(rt.device)}, fp32)"
    return f"cpu ({torch.get_num_threads()} threads, fp32)"


def checkpoint_path(rt: Runtime, tid: uuid.UUID) -> Path:
    return rt.settings.data_dir / "state" / "trainings" / str(tid) / "checkpoint.safetensors"


def _load(job: TrainingJob, split: str) -> EvalData:
    if job.dataset_path is not None:
        return load_npz(job.dataset_path, split)
    try:
        return load_builtin(job.dataset, split, **job.dataset_params)
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc


def _train(rt: Runtime, job: TrainingJob, sup: Supervisor, send_task: Any) -> None:
    sup.progress(0.0, "loading", "loading the data")
    data = _load(job, "train")
    if job.train_examples is not None:
        data = data.subset(torch.arange(min(job.train_examples, len(data))))
    held_out = _load(job, job.held_out_split)
    held_out = held_out.subset(torch.arange(min(job.eval_examples, len(held_out))))
    with rt.sessions.begin() as s:
        s.execute(update(Training).where(Training.id == job.id, Training.attempts == job.token)
                  .values(device=describe_device(rt), engine_version=ENGINE_VERSION)
                  .execution_options(synchronize_session=False))

    def progress(fraction: float, message: str) -> None:
        sup.progress(0.98 * fraction, "training", message)

    def on_epoch(history: list[dict[str, Any]]) -> None:
        with rt.sessions.begin() as s:
            res = s.execute(update(Training).where(
                Training.id == job.id, Training.attempts == job.token,
                Training.status == "running").values(history=history)
                .execution_options(synchronize_session=False))
            if res.rowcount != 1:  # type: ignore[attr-defined]
                raise Superseded("the job changed hands during training")

    trained = train(job.spec, data, held_out, device=rt.device, progress=progress,
                    checkpoint_path=checkpoint_path(rt, job.id), on_epoch=on_epoch)
    sup.progress(0.99, "registering", "registering the trained model")
    _succeed(rt, job, trained.state, trained.history, data, send_task)


def _succeed(rt: Runtime, job: TrainingJob, state: dict[str, torch.Tensor],
             history: list[dict[str, Any]], data: EvalData, send_task: Any) -> None:
    """Register the weights as the owner's model and queue its evaluation, in the same
    transaction that marks the job succeeded (fenced by the attempt)."""
    from safetensors.torch import save_file

    tmp_dir = rt.settings.data_dir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"training-{job.id}-{job.token}.safetensors"
    save_file(state, str(tmp))
    sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
    meta = ModelMetadata(name=job.name, architecture=job.spec.architecture,
                         num_classes=len(data.class_names),
                         input_shape=[int(d) for d in data.x.shape[1:]],
                         class_names=list(data.class_names))
    outbox = Outbox(_Sender(send_task))
    try:
        with rt.sessions.begin() as s:
            row = s.scalar(select(Training).where(Training.id == job.id).with_for_update())
            if row is None or row.attempts != job.token or row.status != "running":
                raise Superseded("the job changed hands before its model was registered")
            model = models.register(s, job.owner, tmp, sha, tmp.stat().st_size, meta,
                                    rt.settings.data_dir)
            if job.evaluate is not None:
                ev, _ = evaluations.create(s, outbox, job.owner, EvaluationIn(
                    model_id=model.id, dataset=job.dataset, dataset_params=job.dataset_params,
                    suite=job.evaluate, seed=job.spec.seed, n_examples=job.n_examples), None)
                row.evaluation_id = ev.id
            row.model_id, row.history = model.id, history
            row.status, row.finished_at, row.error = "succeeded", utcnow(), None
            row.progress_fraction, row.progress_stage = 1.0, "succeeded"
            row.progress_message = "done"
    except BaseException:
        tmp.unlink(missing_ok=True)
        outbox.discard()
        raise
    outbox.flush()  # a send that fails is re-sent by the reconciler (the row stays queued)
    shutil.rmtree(checkpoint_path(rt, job.id).parent, ignore_errors=True)


class _Sender:
    def __init__(self, send_task: Any) -> None:
        self._send = send_task

    def send_task(self, name: str, args: list[Any]) -> Any:
        if self._send is None:
            return None
        return self._send(name, args=args)


def _finish(rt: Runtime, tid: uuid.UUID, token: int, status: str,
            error: dict[str, str] | None) -> None:
    with rt.sessions.begin() as s:
        row = s.get(Training, tid)
        if row is None or row.attempts != token:
            return
        row.status, row.error, row.finished_at = status, error, utcnow()
        row.progress_stage = status
        row.progress_message = ("cancelled by the user" if status == "cancelled"
                                else (error or {}).get("detail", status)[:500])
    shutil.rmtree(checkpoint_path(rt, tid).parent, ignore_errors=True)  # never resumed now
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
