"""Evaluation jobs: run a suite in the engine child and record each entry's results.

The same job machinery as trainings (:mod:`workers.jobs`): the claim counts the attempt and
fences every write. Each suite entry's rows, checks, artifacts and completion are written in one
transaction, so a job resumed after a killed worker starts after its last finished entry and no
result is written twice.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from contract.jobs import JobErrorType, JobStatus, job_error
from contract.suite import Entry, dump_entry
from core.queue import WEBHOOK_TASK
from core.tables import Evaluation, EvaluationShard, JobTable, Model, Result
from workers.engine import ENGINE_VERSION, benchmarks
from workers.engine.types import BenchmarkError
from workers.execute import state_mirror
from workers.jobs import device_info, run_work
from workers.runtime import Runtime
from workers.sandbox.protocol import EvaluateJob
from workers.work import (
    JobFailed,
    Scratch,
    StoredFile,
    Superseded,
    claimed,
    fetch,
    keep_output,
    sandbox_error,
)

log = logging.getLogger("robustscope.worker")
MAX_ARTIFACT_BYTES = 64 << 20  # one artifact (a picture, a small table) copied out of a job
#: The share of a sharded evaluation's progress its shards fill; its merge fills the rest.
SHARDS_SHARE = 0.9


def run(rt: Runtime, eid: uuid.UUID, send_task: Any = None) -> str:
    """Run evaluation ``eid`` if this worker can claim it; returns what happened."""
    return run_work(rt, Evaluation, eid,
                    lambda rt, eid, token: EvaluationWork.load(rt, eid, token, send_task))


@dataclass
class EvaluationWork:
    rt: Runtime
    id: uuid.UUID
    token: int  # the attempt number that owns the job
    suite: list[Entry]  # the contract's typed entries, parsed once from the stored JSON
    completed: set[int]
    seed: int
    model_file: StoredFile
    model_format: str
    model_metadata: dict[str, Any]
    dataset: str
    dataset_file: StoredFile | None
    dataset_params: dict[str, Any]
    split: str
    options: dict[str, Any] = field(default_factory=dict)  # n_examples, class_map
    send_task: Any = None
    table: JobTable = Evaluation
    records_own_success = False
    # A sharded evaluation's merge: its shards (id, start, stop), in order, and when it
    # started (its time limit counts from then); None for one run as one job.
    shards: list[tuple[uuid.UUID, int, int]] = field(default_factory=list)
    started: datetime | None = None
    _inputs: dict[str, Path] | None = None
    _parts: dict[str, Path] | None = None

    @classmethod
    def load(cls, rt: Runtime, eid: uuid.UUID, token: int,
             send_task: Any = None) -> EvaluationWork:
        with rt.sessions() as s:
            ev = claimed(s, Evaluation, eid)
            model = s.get(Model, ev.model_id) if ev.model_id else None
            if model is None:
                raise JobFailed(job_error(JobErrorType.CHECKPOINT_ERROR,
                                          "the model of this evaluation was deleted"))
            dataset_file = StoredFile.of_dataset(s, ev.dataset_id, JobErrorType.BENCHMARK_ERROR,
                                                 "evaluation")
            try:
                suite = [benchmarks.parse(entry) for entry in ev.suite]
            except BenchmarkError as exc:  # stored before the contract changed
                raise JobFailed(job_error(JobErrorType.BENCHMARK_ERROR, str(exc))) from exc
            shards = [] if ev.shards <= 1 else [
                (sh.id, sh.start, sh.stop) for sh in s.scalars(
                    select(EvaluationShard).where(EvaluationShard.evaluation_id == eid)
                    .order_by(EvaluationShard.index))]
            return cls(
                rt=rt, id=eid, token=token, suite=suite,
                completed=set(ev.completed_entries or []), seed=ev.seed,
                model_file=StoredFile(model.storage_path, model.sha256),
                model_format=model.format,
                model_metadata=dict(model.model_metadata), dataset=ev.dataset,
                dataset_file=dataset_file, dataset_params=dict(ev.dataset_params or {}),
                split=ev.split, options=dict(ev.options or {}), send_task=send_task,
                shards=shards, started=ev.started_at if shards else None)

    @property
    def state_dir(self) -> Path:
        return self.rt.settings.data_dir / "state" / str(self.id)

    def inputs(self) -> dict[str, Path]:
        if self._inputs is None:
            files = {"model": fetch(self.rt, self.model_file, JobErrorType.CHECKPOINT_ERROR)}
            if self.dataset_file is not None:
                files["dataset.npz"] = fetch(self.rt, self.dataset_file,
                                             JobErrorType.BENCHMARK_ERROR)
            self._inputs = files
        return self._inputs

    @property
    def progress_span(self) -> tuple[float, float]:
        """A merge runs after the shards, which fill the first :data:`SHARDS_SHARE`."""
        return (SHARDS_SHARE, 1 - SHARDS_SHARE) if self.shards else (0.0, 1.0)

    def scratch_dirs(self) -> dict[str, Path]:
        """A merge's input: each shard's state, from the store (or in place where the store
        is this data folder)."""
        if self._parts is None:
            self._parts = {}
            for k, (sid, _, _) in enumerate(self.shards):
                local = self.rt.settings.data_dir / "state" / str(sid)
                mirror = state_mirror(self.rt, local)
                if mirror.active:
                    mirror.local = self._parts_root / str(k)
                    mirror.pull()
                self._parts[f"part-{k}"] = mirror.local
        return self._parts

    @property
    def _parts_root(self) -> Path:
        return self.rt.settings.data_dir / "tmp" / f"parts-{self.id}-{self.token}"

    def describe(self, files: dict[str, str], scratch: Scratch, threads: int,
                 device: str) -> EvaluateJob:
        merge = bool(self.shards and scratch.dirs)  # a sharded evaluation's merge
        batch = self.options.get("block") or self.rt.settings.batch_size
        return EvaluateJob(
            kind="evaluate", suite=[dump_entry(e) for e in self.suite],
            completed=sorted(self.completed), seed=self.seed, batch_size=int(batch),
            amp=self.rt.bf16_search, model_path=files["model"],
            model_format=self.model_format, model_metadata=self.model_metadata,
            dataset=self.dataset, dataset_path=files.get("dataset.npz"),
            dataset_params=self.dataset_params, split=self.split,
            n_examples=self.options.get("n_examples"),
            class_map=self.options.get("class_map"),
            state_dir=str(scratch.state), artifact_dir=str(scratch.artifacts),
            shard_parts=[str(scratch.dirs[f"part-{k}"]) for k in range(len(self.shards))]
            if merge else None,
            shard_bounds=[(a, b) for _, a, b in self.shards] if merge else None,
            threads=threads, device=device)

    def handle(self, message: dict[str, Any], scratch: Scratch) -> None:
        kind = message.get("t")
        if kind == "device":
            self._set_device_info()
        elif kind == "assets":
            self._record_data_source([tuple(a) for a in message["assets"]])
        elif kind == "entry":
            self._write_entry(message, scratch)

    def finished(self, status: str, error: dict[str, str] | None) -> None:
        shutil.rmtree(self._parts_root, ignore_errors=True)
        with self.rt.sessions() as s:
            ev = s.get(Evaluation, self.id)
            webhook = ev.webhook_url if ev is not None and ev.attempts == self.token else None
        if webhook and self.send_task is not None:
            try:
                self.send_task(WEBHOOK_TASK, args=[str(self.id)])
            except Exception:
                log.warning("could not enqueue the webhook for %s", self.id, exc_info=True)

    def _set_device_info(self) -> None:
        with self.rt.sessions.begin() as s:
            s.execute(update(Evaluation).where(Evaluation.id == self.id,
                                               Evaluation.attempts == self.token)
                      .values(device=device_info(self.rt, self.rt.describe_device()),
                              engine_version=ENGINE_VERSION)
                      .execution_options(synchronize_session=False))

    def _record_data_source(self, assets: list[tuple[Any, ...]]) -> None:
        """Say what drew a built-in's pictures (installed art or the procedural fallback):
        the API cannot know what a worker has installed, and results are comparable only
        within one."""
        detail = ", ".join(f"{part}: {kind}" for part, kind in assets)
        note = {"name": "dataset_assets", "passed": True, "detail": f"{self.dataset} {detail}",
                "params": {str(part): kind for part, kind in assets}, "entry": None}
        with self.rt.sessions.begin() as s:
            ev = s.get(Evaluation, self.id)
            if ev is not None and ev.attempts == self.token and not any(
                    c.get("name") == "dataset_assets" for c in ev.checks):
                ev.checks = [*ev.checks, note]

    def _write_entry(self, message: dict[str, Any], scratch: Scratch) -> None:
        """Rows, checks, artifacts and the entry's completion in one transaction, fenced by
        the attempt."""
        index = int(message["index"])
        if index >= len(self.suite) or index in self.completed:
            raise JobFailed(sandbox_error(f"the engine child reported entry {index}, which "
                                          "is not one it was asked to run"))
        artifacts: dict[str, str] = {}
        for name, rel in message["artifacts"].items():
            # Copied from the descriptor it checked (a regular file, no link followed), then
            # stored under its content hash: the child's names never become keys.
            key = keep_output(self.rt, scratch, scratch.host_artifacts, rel,
                              f"artifacts/{self.id}", MAX_ARTIFACT_BYTES)
            artifacts[f"entry-{index}/{name}"] = key
        with self.rt.sessions.begin() as s:
            ev = s.scalar(select(Evaluation).where(Evaluation.id == self.id).with_for_update())
            if ev is None or ev.attempts != self.token or ev.status != JobStatus.RUNNING:
                raise Superseded("the job changed hands before its results were written")
            for row in message["rows"]:
                params = dict(row["params"])
                s.add(Result(evaluation_id=self.id, entry_index=index,
                             benchmark=row["benchmark"], metric=row["metric"],
                             value=float(row["value"]), params=params,
                             params_key=json.dumps(params, sort_keys=True),
                             n=row.get("n"), outcomes=row.get("outcomes")))
            ev.checks = [*ev.checks, *[{**c, "entry": index} for c in message["checks"]]]
            ev.artifacts = {**ev.artifacts, **artifacts}
            ev.completed_entries = sorted({*ev.completed_entries, index})
            ev.timings = {**ev.timings, f"{index}:{self.suite[index].benchmark}":
                          round(float(message["seconds"]), 3)}
        self.completed.add(index)
