"""The engine child: everything that touches a user's model happens in this process.

Started by the supervisor inside the jail (``python -m workers.sandbox.child FD``), it imports
torch and the engine first, then waits for one job as a JSON line on stdin, so that a child can
be started ahead of its job. It reports on file descriptor ``FD`` in length-framed JSON
(:mod:`workers.sandbox.protocol`): ``ready``, then ``progress``, ``assets``, ``device``,
``entry`` (one finished suite entry), ``epoch`` (training history after a checkpoint),
``trained``, then ``error`` or ``done``. It holds no secret, no database and no
broker: the supervisor writes everything. Model output on stdout/stderr never reaches the user.

With the sandbox off, the supervisor calls :func:`run_job` in its own process with the same
messages, and may stop it by raising from ``emit``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from contract.jobs import JobErrorType, job_error
from contract.training import TrainingSpec
from workers.engine import benchmarks
from workers.engine.data import DatasetFormatError, load_builtin, load_npz
from workers.engine.models import CheckpointError, Format, ModelSpec
from workers.engine.models import load as load_model
from workers.engine.runner import merge_states
from workers.engine.scope import scoped
from workers.engine.training import (
    TrainingError,
    TrainSpec,
    train,
)
from workers.engine.types import BenchmarkError, EvalData, RunContext
from workers.sandbox.protocol import encode
from workers.sandbox.remote import ModelChannel, RemoteFailure, RemoteModel

Emit = Callable[[dict[str, Any]], None]

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
    wherever it happened (a model that exhausts memory while it is probed at load time)."""
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


def run_job(job: dict[str, Any], emit: Emit) -> None:
    import resource

    if job.get("memory_limit"):  # set before any of the model's code runs; never raised again
        cap = int(job["memory_limit"])
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    if job.get("pids_limit"):  # where no cgroup holds the jail: counted in its user namespace
        pids = int(job["pids_limit"])
        resource.setrlimit(resource.RLIMIT_NPROC, (pids, pids))
    torch.set_num_threads(int(job["threads"]))
    if job["kind"] == "evaluate":
        _evaluate(job, emit)
    elif job["kind"] == "train":
        _train(job, emit)
    else:
        raise ValueError(f"unknown job kind {job['kind']!r}")


def _data(job: dict[str, Any], split: str) -> EvalData:
    if job.get("dataset_path"):
        return load_npz(Path(job["dataset_path"]), split)
    return load_builtin(job["dataset"], split, **job["dataset_params"])


def _evaluate(job: dict[str, Any], emit: Emit) -> None:
    device = torch.device(job["device"])
    suite = [benchmarks.parse(entry) for entry in job["suite"]]  # the job boundary
    completed = set(job["completed"])
    n = len(suite)
    emit({"t": "progress", "fraction": len(completed) / n, "stage": "loading",
          "message": "loading the model and the data"})
    spec = ModelSpec.from_metadata(job["model_format"], job["model_metadata"])
    channel = None
    model: torch.nn.Module
    if job.get("model_server") and spec.format is not Format.SAFETENSORS:
        # The model's code runs in its own jailed process; this one only asks it.
        link = job["model_server"]
        channel = ModelChannel(int(link["request"]), int(link["reply"]), int(link["shm"]),
                               int(link["shm_size"]), spec.num_classes,
                               timeout=float(link["timeout"]))
        model = RemoteModel(channel)
    else:
        model = load_model(Path(job["model_path"]), spec, device)
    data = _data(job, job["split"])  # while the model server loads the model
    if channel is not None:
        channel.wait_ready(float(job["model_server"]["timeout"]))
    if data.x.shape[1:] != tuple(spec.input_shape):
        raise BenchmarkError(f"the data has shape {list(data.x.shape[1:])} but the model takes "
                             f"{list(spec.input_shape)}")
    model, data = scoped(model, data, n_examples=job.get("n_examples"),
                         class_map=job.get("class_map"), seed=int(job["seed"]), device=device)
    offset = 0
    if job.get("shard"):  # a shard: its slice of the set, batched and seeded as in the whole
        offset, stop = (int(v) for v in job["shard"])
        data = data.subset(torch.arange(offset, min(stop, len(data))))
    emit({"t": "device"})
    assets = getattr(data.source, "assets", None)
    if assets:
        emit({"t": "assets", "assets": [list(a) for a in assets]})
    state_root, artifact_root = Path(job["state_dir"]), Path(job["artifact_dir"])
    if job.get("shard_parts"):  # a sharded evaluation's merge: the shards' states first
        parts = [Path(p) for p in job["shard_parts"]]
        bounds = [(int(a), int(b)) for a, b in job["shard_bounds"]]
        for i in range(n):
            if i not in completed:
                merge_states([p / f"entry-{i}" for p in parts], bounds,
                             state_root / f"entry-{i}", data.y.cpu())
    for i, entry in enumerate(suite):
        if i in completed:
            continue
        name = entry.benchmark

        def progress(fraction: float, message: str, i: int = i, name: str = name) -> None:
            emit({"t": "progress", "fraction": (i + fraction) / n, "stage": name,
                  "message": message})

        progress(0.0, f"starting {name}")
        ctx = RunContext(device=device, seed=int(job["seed"]), batch_size=int(job["batch_size"]),
                         amp=bool(job["amp"]), progress=progress, offset=offset,
                         state_dir=state_root / f"entry-{i}",
                         artifact_dir=artifact_root / f"entry-{i}")
        ctx.state_dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
        ctx.artifact_dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
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
        emit({"t": "entry", "index": i, "seconds": time.perf_counter() - start,
              "rows": [r.as_dict() for r in result.rows],
              "checks": [c.as_dict() for c in result.checks],
              "artifacts": {k: str(Path(p).relative_to(artifact_root))
                            for k, p in result.artifacts.items()}})


def _train(job: dict[str, Any], emit: Emit) -> None:
    from safetensors.torch import save_file

    try:  # the job boundary: the contract's typed spec
        spec = TrainSpec.of(TrainingSpec.model_validate(job["spec"]))
    except ValidationError as exc:
        raise TrainingError(f"invalid training spec: {exc}") from exc
    emit({"t": "progress", "fraction": 0.0, "stage": "loading", "message": "loading the data"})
    try:
        data = _data(job, "train")
        held_out = _data(job, job["held_out_split"])
    except ValueError as exc:
        if isinstance(exc, DatasetFormatError | BenchmarkError):
            raise
        raise TrainingError(str(exc)) from exc
    if job.get("train_examples") is not None:
        data = data.subset(torch.arange(min(int(job["train_examples"]), len(data))))
    held_out = held_out.subset(torch.arange(min(int(job["eval_examples"]), len(held_out))))
    emit({"t": "device"})

    def progress(fraction: float, message: str) -> None:
        emit({"t": "progress", "fraction": 0.98 * fraction, "stage": "training",
              "message": message})

    def on_epoch(history: list[dict[str, Any]]) -> None:
        emit({"t": "epoch", "history": history})

    trained = train(spec, data, held_out, device=torch.device(job["device"]),
                    progress=progress, checkpoint_path=Path(job["checkpoint"]),
                    on_epoch=on_epoch)
    weights = Path(job["weights"])
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(trained.state, str(weights))
    emit({"t": "trained", "history": trained.history, "num_classes": len(data.class_names),
          "input_shape": [int(d) for d in data.x.shape[1:]],
          "class_names": list(data.class_names)})


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

    def emit(message: dict[str, Any]) -> None:
        frame = encode(message)
        while frame:  # the only writer of the channel: one frame after another
            frame = frame[os.write(fd, frame):]

    emit({"t": "ready", "address_space": address_space()})  # torch and the engine are imported
    line = sys.stdin.readline()  # the child is started ahead of its job and waits here
    if not line:
        return
    try:
        run_job(json.loads(line), emit)
    except Exception as exc:  # reported as data; the supervisor decides what the user sees
        emit({"t": "error", **classify(exc)})
        return
    emit({"t": "done", "peak_address_space": address_space("VmPeak")})


if __name__ == "__main__":
    main()
