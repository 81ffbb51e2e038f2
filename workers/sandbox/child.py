"""The engine child: everything that touches a user's model happens in this process.

Started by the supervisor inside the jail (``python -m workers.sandbox.child FD``), it imports
torch and the engine first, then waits for one job as a JSON line on stdin, so that a child can
be started ahead of its job; the job is validated against its model
(:class:`~workers.sandbox.protocol.EvaluateJob` or :class:`~workers.sandbox.protocol.TrainJob`)
before anything runs. It reports on file descriptor ``FD`` in length-framed JSON
(:mod:`workers.sandbox.protocol`), each report built from the message model the supervisor
validates it with: ``ready``, then ``progress``, ``assets``, ``device``, ``entry`` (one
finished suite entry), ``epoch`` (training history after a checkpoint), ``trained``, then
``error`` or ``done``. It holds no secret, no database and no broker: the supervisor writes
everything. Model output on stdout/stderr never reaches the user.

With the sandbox off, the supervisor calls :func:`run_job` in its own process with the job it
built and the same reports, and may stop it by raising from ``emit``.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from contract.jobs import JobErrorType, job_error
from workers.engine import benchmarks
from workers.engine.data import DatasetFormatError, load_builtin, load_npz
from workers.engine.models import Format, ModelSpec
from workers.engine.models import load as load_model
from workers.engine.runner import merge_states
from workers.engine.scope import scoped
from workers.engine.training import (
    TrainingError,
    TrainSpec,
    train,
)
from workers.engine.types import (
    BenchmarkError,
    Check,
    CheckpointError,
    EvalData,
    MetricRow,
    RunContext,
)
from workers.sandbox.protocol import (
    Assets,
    CheckReport,
    Device,
    Done,
    EntryDone,
    Epoch,
    Error,
    EvaluateJob,
    Progress,
    ProtocolError,
    Ready,
    Report,
    Row,
    Trained,
    TrainJob,
    encode,
    parse_job,
    report_refused,
)
from workers.sandbox.remote import ModelChannel, RemoteFailure, RemoteModel

Emit = Callable[[Report], None]

_TYPED: tuple[tuple[type[Exception], JobErrorType], ...] = (
    (CheckpointError, JobErrorType.CHECKPOINT_ERROR),
    (BenchmarkError, JobErrorType.BENCHMARK_ERROR),
    (DatasetFormatError, JobErrorType.DATASET_ERROR),
    (TrainingError, JobErrorType.TRAINING_ERROR),
)
_OOM = re.compile(r"can't allocate memory|out of memory|std::bad_alloc|cannot allocate",
                  re.IGNORECASE)
_PATHS = re.compile(r"(/[\w.@+-]+)+/")


def classify(exc: BaseException) -> dict[str, str]:
    """A short, typed error for the user. Exceptions the engine raises on purpose keep their
    message; anything else came from the model (or crashed under it) and is reported by its
    type and last line, with directory names removed. Running out of memory is recognised
    wherever it happened (a model that exhausts memory while it is probed at load time). A job
    the child could not read, or a report it could not build, broke the protocol: a
    ``sandbox-error``, as a frame the supervisor refuses is."""
    cause: BaseException | None = exc
    while cause is not None:  # the model server's verdict (workers/sandbox/remote.py)
        if isinstance(cause, RemoteFailure):
            return job_error(JobErrorType(cause.error["type"]), _short(cause.error["detail"]))
        cause = cause.__cause__ or cause.__context__
    cause = exc
    while cause is not None:
        if isinstance(cause, MemoryError) or _OOM.search(str(cause)):
            return job_error(JobErrorType.OUT_OF_MEMORY,
                             "the model ran out of memory (its process has a memory cap)")
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, ProtocolError):
        return job_error(JobErrorType.SANDBOX_ERROR, f"the engine child was given {exc}")
    refused = report_refused(exc)
    if refused is not None:
        return job_error(JobErrorType.SANDBOX_ERROR,
                         f"the engine broke the report protocol: {refused}")
    for cls, typed in _TYPED:
        if isinstance(exc, cls):
            return job_error(typed, _short(str(exc)) or cls.__name__)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # TorchScript puts its interpreter traceback first and the raised message last.
    # (A message that already starts with its type's name keeps it once.)
    name = type(exc).__name__
    last = lines[-1] if lines else ""
    return job_error(JobErrorType.MODEL_CRASHED,
                     _short(last if last.startswith(f"{name}:") else
                            f"{name}: {last}" if last else name))


def strip_paths(text: str) -> str:
    """``text`` for a user: directory names removed, at most 500 characters."""
    return _short(text)


def _short(text: str) -> str:
    """At most 500 characters: the start (what failed) and the end (TorchScript's own
    traceback sits between them and the message that says why)."""
    text = _PATHS.sub("", text).strip()
    return text if len(text) <= 500 else f"{text[:200]} ... {text[-295:]}"


def run_job(job: EvaluateJob | TrainJob, emit: Emit) -> None:
    import resource

    if job.memory_limit:  # set before any of the model's code runs; never raised again
        resource.setrlimit(resource.RLIMIT_AS, (job.memory_limit, job.memory_limit))
    if job.pids_limit:  # where no cgroup holds the jail: counted in its user namespace
        resource.setrlimit(resource.RLIMIT_NPROC, (job.pids_limit, job.pids_limit))
    torch.set_num_threads(job.threads)
    if isinstance(job, EvaluateJob):
        _evaluate(job, emit)
    else:
        _train(job, emit)


def _data(job: EvaluateJob | TrainJob, split: str) -> EvalData:
    if job.dataset_path:
        return load_npz(Path(job.dataset_path), split)
    return load_builtin(job.dataset, split, **job.dataset_params)


def _progress(fraction: float, stage: str, message: str) -> Progress:
    return Progress(t="progress", fraction=fraction, stage=stage, message=message)


def _row(row: MetricRow) -> Row:
    """A metric row as reported: an accuracy's outcomes with it, packed (only when it has
    them: a row without writes neither ``n`` nor ``outcomes``)."""
    packed = row.packed_outcomes()
    if packed is None:
        return Row(benchmark=row.benchmark, metric=row.metric, value=float(row.value),
                   params=dict(row.params))
    n, outcomes = packed
    return Row(benchmark=row.benchmark, metric=row.metric, value=float(row.value),
               params=dict(row.params), n=n, outcomes=outcomes)


def _check(check: Check) -> CheckReport:
    return CheckReport(name=check.name, passed=check.passed, detail=check.detail,
                       params=dict(check.params))


def _evaluate(job: EvaluateJob, emit: Emit) -> None:
    device = torch.device(job.device)
    suite = [benchmarks.parse(entry) for entry in job.suite]  # the job boundary
    completed = set(job.completed)
    n = len(suite)
    emit(_progress(len(completed) / n, "loading", "loading the model and the data"))
    spec = ModelSpec.from_metadata(job.model_format, job.model_metadata)
    channel = None
    model: torch.nn.Module
    link = job.model_server
    if link is not None and spec.format is not Format.SAFETENSORS:
        # The model's code runs in its own jailed process; this one only asks it.
        channel = ModelChannel(link.request, link.reply, link.shm, link.shm_size,
                               spec.num_classes, timeout=link.timeout)
        model = RemoteModel(channel)
    else:
        model = load_model(Path(job.model_path), spec, device)
    data = _data(job, job.split)  # while the model server loads the model
    if channel is not None and link is not None:
        channel.wait_ready(link.timeout)
    if data.x.shape[1:] != tuple(spec.input_shape):
        raise BenchmarkError(f"the data has shape {list(data.x.shape[1:])} but the model takes "
                             f"{list(spec.input_shape)}")
    model, data = scoped(model, data, n_examples=job.n_examples, class_map=job.class_map,
                         seed=job.seed, device=device)
    offset = 0
    if job.shard is not None:  # a shard: its slice of the set, batched and seeded as in the whole
        offset, stop = job.shard
        data = data.subset(torch.arange(offset, min(stop, len(data))))
    emit(Device(t="device"))
    assets = getattr(data.source, "assets", None)
    if assets:
        emit(Assets(t="assets", assets=[list(a) for a in assets]))
    state_root, artifact_root = Path(job.state_dir), Path(job.artifact_dir)
    if job.shard_parts:  # a sharded evaluation's merge: the shards' states first
        parts = [Path(p) for p in job.shard_parts]
        bounds = list(job.shard_bounds or [])
        for i in range(n):
            if i not in completed:
                merge_states([p / f"entry-{i}" for p in parts], bounds,
                             state_root / f"entry-{i}", data.y.cpu())
    for i, entry in enumerate(suite):
        if i in completed:
            continue
        name = entry.benchmark

        def progress(fraction: float, message: str, i: int = i, name: str = name) -> None:
            emit(_progress((i + fraction) / n, name, message))

        progress(0.0, f"starting {name}")
        state_dir, artifact_dir = state_root / f"entry-{i}", artifact_root / f"entry-{i}"
        state_dir.mkdir(parents=True, exist_ok=True)
        artifact_dir.mkdir(parents=True, exist_ok=True)
        ctx = RunContext(device=device, seed=job.seed, batch_size=job.batch_size, amp=job.amp,
                         progress=progress, offset=offset, state_dir=state_dir,
                         artifact_dir=artifact_dir)
        start = time.perf_counter()
        try:
            result = benchmarks.run(model, data, entry, ctx)
        except Exception as exc:
            if channel is not None and channel.failure is not None:
                raise channel.failure from exc
            raise
        if channel is not None and channel.failure is not None:
            # A misbehaving model process was noticed (and possibly caught as the model's
            # own error on the way): nothing measured through it is reported.
            raise channel.failure
        emit(EntryDone(t="entry", index=i, seconds=time.perf_counter() - start,
                       rows=[_row(r) for r in result.rows],
                       checks=[_check(c) for c in result.checks],
                       artifacts={k: str(Path(p).relative_to(artifact_root))
                                  for k, p in result.artifacts.items()}))


def _train(job: TrainJob, emit: Emit) -> None:
    from safetensors.torch import save_file

    spec = TrainSpec.of(job.spec)  # the job boundary: the contract's typed spec
    emit(_progress(0.0, "loading", "loading the data"))
    try:
        data = _data(job, "train")
        held_out = _data(job, job.held_out_split)
    except ValueError as exc:
        if isinstance(exc, DatasetFormatError | BenchmarkError):
            raise
        raise TrainingError(str(exc)) from exc
    if job.train_examples is not None:
        data = data.subset(torch.arange(min(job.train_examples, len(data))))
    held_out = held_out.subset(torch.arange(min(job.eval_examples, len(held_out))))
    emit(Device(t="device"))

    def progress(fraction: float, message: str) -> None:
        emit(_progress(0.98 * fraction, "training", message))

    def on_epoch(history: list[dict[str, Any]]) -> None:
        emit(Epoch(t="epoch", history=history))

    trained = train(spec, data, held_out, device=torch.device(job.device),
                    progress=progress, checkpoint_path=Path(job.checkpoint),
                    on_epoch=on_epoch)
    weights = Path(job.weights)
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(trained.state, str(weights))
    emit(Trained(t="trained", history=trained.history, num_classes=len(data.class_names),
                 input_shape=[int(d) for d in data.x.shape[1:]],
                 class_names=list(data.class_names)))


def address_space(field: str = "VmSize") -> int:
    """This process's address space in bytes (``VmSize``, or ``VmPeak``), what RLIMIT_AS
    counts."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    fd = int(sys.argv[1])

    def emit(message: Report) -> None:
        frame = encode(message)
        while frame:  # the only writer of the channel: one frame after another
            frame = frame[os.write(fd, frame):]

    emit(Ready(t="ready", address_space=address_space()))  # torch and the engine are imported
    line = sys.stdin.readline()  # the child is started ahead of its job and waits here
    if not line:
        return
    try:
        run_job(parse_job(line), emit)  # the job boundary: validated before anything runs
    except Exception as exc:  # reported as data; the supervisor decides what the user sees
        # Its type is checked here: only the error types a child may report.
        emit(Error.model_validate({"t": "error", **classify(exc)}))
        return
    emit(Done(t="done", peak_address_space=address_space("VmPeak")))


if __name__ == "__main__":
    main()
