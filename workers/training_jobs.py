"""Training jobs: train in the engine child, register the model, queue its evaluation.

The same job machinery as evaluations (:mod:`workers.jobs`): the claim counts the attempt and
fences every write; the child checkpoints after each epoch into its scratch ``state/``, which
the supervisor copies to ``state/trainings/<id>/`` before it records the epoch, so a job whose
worker was killed is re-sent by the reconciler and resumes after its last finished epoch.
Success is one transaction: the model row, the queued evaluation and the job's final state are
written together or not at all, so a model is never registered twice.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from contract.jobs import JobErrorType, JobStatus, job_error
from contract.training import BETA, Threat, TrainingSpec
from core import storage
from core.errors import DomainError
from core.objectstore import StoreError, file_sha256
from core.queue import Outbox
from core.tables import JobTable, Training, utcnow
from service.evaluations import service as evaluations
from service.evaluations.schemas import EvaluationIn
from service.models import service as models
from service.models.schemas import ModelMetadata
from workers.engine import ENGINE_VERSION
from workers.execute import state_mirror
from workers.jobs import device_info, run_work
from workers.runtime import Runtime
from workers.sandbox.protocol import TrainJob
from workers.work import JobFailed, Scratch, Sender, StoredFile, Superseded, claimed, fetch

log = logging.getLogger("robustscope.worker")


def run(rt: Runtime, tid: uuid.UUID, send_task: Any = None) -> str:
    """Run training ``tid`` if this worker can claim it; returns what happened."""
    return run_work(rt, Training, tid,
                    lambda rt, tid, token: TrainingWork.load(rt, tid, token, send_task))


def describe_device(rt: Runtime) -> str:
    """Training runs in fp32 (no autocast), whatever precision the attack search uses."""
    if rt.device.type == "cuda":
        base = f"{rt.device} ({torch.cuda.get_device_name(rt.device)}, fp32)"
    else:
        base = f"cpu ({torch.get_num_threads()} threads, fp32)"
    return device_info(rt, base)


def checkpoint_path(rt: Runtime, tid: uuid.UUID) -> Path:
    return rt.settings.data_dir / "state" / "trainings" / str(tid) / "checkpoint.safetensors"


@dataclass
class TrainingWork:
    rt: Runtime
    id: uuid.UUID
    token: int
    owner: str
    name: str
    spec: TrainingSpec  # the contract's typed spec, read once from the job's row
    dataset: str
    dataset_file: StoredFile | None
    dataset_params: dict[str, Any]
    held_out_split: str
    train_examples: int | None
    eval_examples: int
    evaluate: list[dict[str, Any]] | None
    n_examples: int | None = None  # of the evaluation the training queues
    public: bool = False  # whether that evaluation is public
    send_task: Any = None
    table: JobTable = Training
    records_own_success = True
    _inputs: dict[str, Path] | None = None

    @classmethod
    def load(cls, rt: Runtime, tid: uuid.UUID, token: int,
             send_task: Any = None) -> TrainingWork:
        with rt.sessions() as s:
            row = claimed(s, Training, tid)
            dataset_file = StoredFile.of_dataset(s, row.dataset_id,
                                                      JobErrorType.TRAINING_ERROR, "training")
            opts = row.options or {}
            try:
                spec = TrainingSpec(
                    architecture=row.architecture, method=row.method,
                    threat=Threat.model_validate(row.threat), epochs=row.epochs,
                    batch_size=row.batch_size, lr=row.lr, seed=row.seed,
                    optimizer=opts.get("optimizer", "sgd"),
                    lr_schedule=opts.get("lr_schedule", "cosine"),
                    beta=float(opts.get("beta") or BETA))
            except ValidationError as exc:  # stored before the contract changed
                raise JobFailed(job_error(JobErrorType.TRAINING_ERROR,
                                          f"the stored training spec is invalid: {exc}")
                                ) from exc
            return cls(
                rt=rt, id=tid, token=token, owner=row.owner, name=row.name, spec=spec,
                dataset=row.dataset, dataset_file=dataset_file,
                dataset_params=dict(row.dataset_params or {}),
                held_out_split=row.held_out_split, train_examples=opts.get("train_examples"),
                eval_examples=int(opts.get("eval_examples") or 1000), evaluate=row.evaluate,
                n_examples=opts.get("n_examples"), public=bool(opts.get("public")),
                send_task=send_task)

    @property
    def state_dir(self) -> Path:
        return checkpoint_path(self.rt, self.id).parent

    def inputs(self) -> dict[str, Path]:
        if self._inputs is None:
            self._inputs = {} if self.dataset_file is None else {
                "dataset.npz": fetch(self.rt, self.dataset_file,
                                          JobErrorType.TRAINING_ERROR)}
        return self._inputs

    def describe(self, files: dict[str, str], scratch: Scratch, threads: int,
                 device: str) -> TrainJob:
        return TrainJob(kind="train", spec=self.spec, dataset=self.dataset,
                        dataset_path=files.get("dataset.npz"),
                        dataset_params=self.dataset_params,
                        held_out_split=self.held_out_split, train_examples=self.train_examples,
                        eval_examples=self.eval_examples,
                        checkpoint=str(scratch.state / "checkpoint.safetensors"),
                        weights=str(scratch.out / "weights.safetensors"),
                        threads=threads, device=device)

    def handle(self, message: dict[str, Any], scratch: Scratch) -> None:
        kind = message.get("t")
        if kind == "device":
            with self.rt.sessions.begin() as s:
                s.execute(update(Training).where(Training.id == self.id,
                                                 Training.attempts == self.token)
                          .values(device=describe_device(self.rt),
                                  engine_version=ENGINE_VERSION)
                          .execution_options(synchronize_session=False))
        elif kind == "epoch":
            with self.rt.sessions.begin() as s:
                res = s.execute(update(Training).where(
                    Training.id == self.id, Training.attempts == self.token,
                    Training.status == JobStatus.RUNNING).values(history=message["history"])
                    .execution_options(synchronize_session=False))
                if res.rowcount != 1:  # type: ignore[attr-defined]
                    raise Superseded("the job changed hands during training")
        elif kind == "trained":
            self.progress_registering()
            self._succeed(message, scratch)

    def progress_registering(self) -> None:
        with self.rt.sessions.begin() as s:
            s.execute(update(Training).where(Training.id == self.id,
                                             Training.attempts == self.token)
                      .values(progress_fraction=0.99, progress_stage="registering",
                              progress_message="registering the trained model")
                      .execution_options(synchronize_session=False))

    def finished(self, status: str, error: dict[str, str] | None) -> None:
        if status != "superseded":  # never resumed now
            shutil.rmtree(self.state_dir, ignore_errors=True)
            try:
                state_mirror(self.rt, self.state_dir).clear()
            except StoreError:
                log.warning("could not remove the stored state of training %s", self.id,
                            exc_info=True)

    def _succeed(self, trained: dict[str, Any], scratch: Scratch) -> None:
        """Register the weights as the owner's model and queue its evaluation, in the same
        transaction that marks the job succeeded (fenced by the attempt). The weights are
        copied out of the child's scratch as a regular file, no link followed; unless that
        transaction commits, the copy and the stored checkpoint are removed again."""
        meta = ModelMetadata(name=self.name, architecture=self.spec.architecture,
                             num_classes=int(trained["num_classes"]),
                             input_shape=[int(d) for d in trained["input_shape"]],
                             class_names=[str(c) for c in trained["class_names"]])
        tmp_dir = self.rt.settings.data_dir / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = tmp_dir / f"training-{self.id}-{self.token}.safetensors"
        size = scratch.copy_out(scratch.host_out, "weights.safetensors", tmp,
                                self.rt.settings.max_checkpoint_bytes)
        received = storage.Received(tmp, file_sha256(tmp), size)
        outbox = Outbox(Sender(self.send_task))
        try:
            with (self.rt.sessions.begin() as s,
                  storage.upload(s, self.rt.store, received) as weights):
                row = s.scalar(select(Training).where(Training.id == self.id).with_for_update())
                if row is None or row.attempts != self.token or row.status != JobStatus.RUNNING:
                    raise Superseded("the job changed hands before its model was registered")
                model = models.register(s, self.owner, weights, meta)
                if self.evaluate is not None:
                    row.evaluation_id = self._queue_evaluation(s, outbox, model.id)
                row.model_id, row.history = model.id, trained["history"]
                row.status, row.error = JobStatus.SUCCEEDED.value, None
                row.finished_at = utcnow()
                row.progress_fraction, row.progress_stage = 1.0, JobStatus.SUCCEEDED.value
                row.progress_message = "done"
        except BaseException:
            outbox.discard()
            raise
        outbox.flush()  # a send that fails is re-sent by the reconciler (the row stays queued)

    def _queue_evaluation(self, s: Session, outbox: Outbox, model_id: uuid.UUID) -> uuid.UUID:
        """The trained model's evaluation, queued in the registering transaction; a request
        the API would refuse now (its dataset deleted meanwhile) fails the training, and the
        rollback removes the model's stored file with its row."""
        try:
            ev, _ = evaluations.create(s, outbox, self.owner, EvaluationIn(
                model_id=model_id, dataset=self.dataset, dataset_params=self.dataset_params,
                suite=self.evaluate, seed=self.spec.seed, n_examples=self.n_examples,
                public=self.public), None)
        except DomainError as exc:
            raise JobFailed(job_error(JobErrorType.TRAINING_ERROR,
                                      f"its evaluation could not be queued: {exc.detail}")
                            ) from exc
        return ev.id
