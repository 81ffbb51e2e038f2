"""The engine child's job and its report channel: typed models on both sides of the jail.

The supervisor hands the child one job as a JSON line (:data:`Job`: an :class:`EvaluateJob` or a
:class:`TrainJob`), built through those models; the child validates it on receipt
(:func:`parse_job`) and reads it by attribute. The child builds each report from the message
models below, so a report it cannot build (a value its model refuses) is a
:func:`report_refused` error in the child, never a frame.

A frame is a 4-byte big-endian length followed by that many bytes of one JSON object, at most
:data:`MAX_FRAME` bytes. The child writes frames only from its own reporting code
(:func:`encode`); the supervisor believes none of them until they decode, validate against the
message models below and arrive in an order the job allows: ``ready`` first, then the job's own
reports, then exactly one ``error`` or ``done``, then nothing. Anything else -- bytes that are
not a frame, a frame over the limit, an unknown ``t``, a field of the wrong type, an extra
field, a message after the end -- is a :class:`ProtocolError`, which fails the job as
``sandbox-error``. Nothing is skipped.
"""

from __future__ import annotations

import json
import struct
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from contract.jobs import JobErrorType
from contract.stats import decode_outcomes
from contract.training import TrainingSpec

MAX_FRAME = 8 << 20  # one suite entry's rows and checks fit many times over
_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """The channel carried something the evaluator does not write."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Ready(_Message):
    t: Literal["ready"]
    address_space: int = Field(ge=0)  # VmSize once torch and the engine are imported


class Progress(_Message):
    t: Literal["progress"]
    fraction: float
    stage: str = Field(max_length=200)
    message: str = Field(max_length=2000)


class Device(_Message):
    t: Literal["device"]


class Assets(_Message):
    t: Literal["assets"]
    assets: list[list[str]] = Field(max_length=100)


class Row(_Message):
    benchmark: str
    metric: str
    value: float
    params: dict[str, Any]
    n: int | None = Field(None, ge=0)
    outcomes: str | None = Field(None, max_length=4 << 20)

    @model_validator(mode="after")
    def _outcomes_match(self) -> Row:
        """An accuracy's outcomes are ``n`` packed flags whose share is its value."""
        if (self.n is None) != (self.outcomes is None):
            raise ValueError("a row carries both n and outcomes or neither")
        if self.n is not None and self.outcomes is not None:
            k = decode_outcomes(self.outcomes, self.n).bit_count()
            if self.n and abs(k / self.n - self.value) > 1e-6:
                raise ValueError(f"outcomes count {k} of {self.n}, not the value {self.value}")
        return self


class CheckReport(_Message):
    name: str
    passed: bool
    detail: str
    params: dict[str, Any]


class EntryDone(_Message):
    t: Literal["entry"]
    index: int = Field(ge=0)
    seconds: float = Field(ge=0)
    rows: list[Row]
    checks: list[CheckReport]
    artifacts: dict[str, str]


class Epoch(_Message):
    t: Literal["epoch"]
    history: list[dict[str, Any]]


class Trained(_Message):
    t: Literal["trained"]
    history: list[dict[str, Any]]
    num_classes: int = Field(ge=1)
    input_shape: list[int]
    class_names: list[str]


#: What the child may report a job failed of: the job error types less those only the
#: supervisor decides (disk quota, a lost worker, storage).
ChildError = Literal[
    JobErrorType.OUT_OF_MEMORY, JobErrorType.CHECKPOINT_ERROR, JobErrorType.BENCHMARK_ERROR,
    JobErrorType.DATASET_ERROR, JobErrorType.TRAINING_ERROR, JobErrorType.MODEL_CRASHED,
    JobErrorType.SANDBOX_ERROR, JobErrorType.TIME_LIMIT]


class Error(_Message):
    t: Literal["error"]
    type: ChildError
    detail: str = Field(max_length=2000)


class Done(_Message):
    t: Literal["done"]
    peak_address_space: int = Field(ge=0)  # VmPeak at the end of the job


# --- the job: what the supervisor hands the child --------------------------------------------


class _Job(BaseModel):
    """Fields every job has. The supervisor builds a job through these models; the child
    validates the line it receives against them (:func:`parse_job`)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    threads: int = Field(ge=1)  # torch's intra-op threads
    device: str  # a torch device: "cpu", "cuda", "cuda:1"
    dataset: str  # a built-in's name (or an uploaded dataset's, with dataset_path)
    dataset_path: str | None  # an uploaded dataset's decoded npz, as the child sees it
    dataset_params: dict[str, Any]  # a built-in's generator parameters
    # Set by the jail just before the job is handed over (:meth:`limited`).
    memory_limit: int | None = None  # RLIMIT_AS, before any of the model's code runs
    pids_limit: int | None = None  # RLIMIT_NPROC, where no cgroup holds the jail

    def limited(self, memory_limit: int | None, pids_limit: int | None) -> Self:
        """This job with the limits the child sets on itself before it reads the model."""
        return self.model_copy(update={"memory_limit": memory_limit, "pids_limit": pids_limit})


class ModelLink(BaseModel):
    """The evaluator's ends of its model server's channel (file descriptors it was started
    with) and the shared memory's size; ``timeout``: seconds an answer may take."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    request: int = Field(ge=0)
    reply: int = Field(ge=0)
    shm: int = Field(ge=0)
    shm_size: int = Field(ge=1)
    timeout: float = Field(gt=0)


class ServerJob(BaseModel):
    """What a model server is handed: the model to load and how to run it. Validated by the
    server on receipt, like the child's job."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    model_format: str
    model_metadata: dict[str, Any]
    threads: int = Field(ge=1)
    device: str
    memory_limit: int | None = None  # RLIMIT_AS, set before the model is loaded
    model_path: str = "/job/model"  # the checkpoint, as the server sees it

    def at(self, model_path: str) -> ServerJob:
        """This job with the checkpoint at ``model_path`` (a server run without a jail)."""
        return self.model_copy(update={"model_path": model_path})


class EvaluateJob(_Job):
    """Run a suite (or the part of it not yet ``completed``) on a model and report each
    entry."""

    kind: Literal["evaluate"]
    suite: list[dict[str, Any]]  # the contract's entries as stored; parsed again in the child
    completed: list[int]  # entries finished by an earlier attempt (or run by no shard)
    seed: int
    batch_size: int = Field(ge=1)  # the block: shards and whole runs batch alike
    amp: bool  # the bf16 attack search
    model_path: str
    model_format: str
    model_metadata: dict[str, Any]
    split: str
    n_examples: int | None
    class_map: str | list[int] | None
    state_dir: str
    artifact_dir: str
    # A shard: its examples, start to stop, of the whole set.
    shard: tuple[int, int] | None = None
    # A sharded evaluation's merge: each shard's state folder and its bounds, in order.
    shard_parts: list[str] | None = None
    shard_bounds: list[tuple[int, int]] | None = None
    # Where the model runs in a server of its own (TorchScript and torch.export uploads).
    model_server: ModelLink | None = None

    def server_job(self, memory_limit: int | None) -> ServerJob:
        """What this job's model server is handed (``memory_limit``: its address-space cap)."""
        return ServerJob(model_format=self.model_format, model_metadata=self.model_metadata,
                         threads=self.threads, device=self.device, memory_limit=memory_limit)

    def served(self, link: ModelLink) -> EvaluateJob:
        """This job with its model in the server at the other end of ``link``."""
        return self.model_copy(update={"model_server": link})

    def sliced(self, start: int, stop: int, completed: list[int]) -> EvaluateJob:
        """This job as the shard that runs examples ``start`` to ``stop`` of the entries not
        ``completed``."""
        return self.model_copy(update={"shard": (start, stop), "completed": completed})


class TrainJob(_Job):
    """Train a model on the dataset's train split, checkpointing as it goes; report each
    epoch and the trained model."""

    kind: Literal["train"]
    spec: TrainingSpec  # the contract's typed spec
    held_out_split: str
    train_examples: int | None  # the first examples of the train split; None: all of them
    eval_examples: int  # the first examples of the held-out split, measured each epoch
    checkpoint: str  # the resumable checkpoint, in the child's state
    weights: str  # where the trained weights go, in the child's out folder


Job = Annotated[EvaluateJob | TrainJob, Field(discriminator="kind")]
_JOB_ADAPTER: TypeAdapter[Job] = TypeAdapter(Job)


def parse_job(line: str | bytes) -> EvaluateJob | TrainJob:
    """The child's job from the line the supervisor wrote, or :class:`ProtocolError`."""
    try:
        return _JOB_ADAPTER.validate_json(line)
    except ValidationError as exc:
        raise ProtocolError(f"an invalid job ({_first_error(exc)})") from None


def parse_server_job(line: str | bytes) -> ServerJob:
    """A model server's job from the line the supervisor wrote, or :class:`ProtocolError`."""
    try:
        return ServerJob.model_validate_json(line)
    except ValidationError as exc:
        raise ProtocolError(f"an invalid job ({_first_error(exc)})") from None


def dump_job(job: EvaluateJob | TrainJob | ServerJob) -> bytes:
    """The job as the one line the child (or the model server) reads."""
    return job.model_dump_json().encode() + b"\n"


#: A report the child writes; :data:`Message` is the same union as the supervisor reads it.
Report = Ready | Progress | Device | Assets | EntryDone | Epoch | Trained | Error | Done
Message = Annotated[Report, Field(discriminator="t")]
_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)
#: The models a report is built from, by the name a :class:`ValidationError` of theirs carries.
_REPORT_MODELS = frozenset(m.__name__ for m in (Ready, Progress, Device, Assets, Row, CheckReport,
                                                  EntryDone, Epoch, Trained, Error, Done))

# What each job kind may report between ``ready`` and its end.
REPORTS: dict[str, frozenset[str]] = {
    "evaluate": frozenset({"progress", "device", "assets", "entry"}),
    "train": frozenset({"progress", "device", "epoch", "trained"}),
}


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


def validate(raw: Any) -> Message:
    """One message (a decoded JSON value) as its typed model, or :class:`ProtocolError`."""
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as exc:
        raise ProtocolError(f"invalid message ({_first_error(exc)})") from None


def report_refused(exc: BaseException) -> ProtocolError | None:
    """``exc`` as a protocol violation where it is a report model refusing what the child
    built (the engine broke the protocol, as a frame the supervisor refuses would), else
    None."""
    if isinstance(exc, ValidationError) and exc.title in _REPORT_MODELS:
        return ProtocolError(f"invalid message ({_first_error(exc)})")
    return None


def encode(message: Report | dict[str, Any]) -> bytes:
    """One frame: a report as its model dumps it (a field not given when it was built, such
    as the ``n`` of a row without outcomes, is not written), or a raw JSON object."""
    if isinstance(message, BaseModel):
        message = message.model_dump(exclude_unset=True)
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ValueError(f"a report of {len(body)} bytes is over the frame limit")
    return _HEADER.pack(len(body)) + body


class Decoder:
    """Frames out of a byte stream, validated; :meth:`feed` raises on the first bad one."""

    def __init__(self, kind: str | None = None) -> None:
        self._buffer = bytearray()
        self.kind = kind
        self.ready = False
        self.ended = False

    def feed(self, data: bytes) -> list[Message]:
        self._buffer += data
        out: list[Message] = []
        while len(self._buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer)
            if size > MAX_FRAME:
                raise ProtocolError(f"a frame of {size} bytes (the limit is {MAX_FRAME})")
            if len(self._buffer) < _HEADER.size + size:
                break
            body = bytes(self._buffer[_HEADER.size:_HEADER.size + size])
            del self._buffer[:_HEADER.size + size]
            try:
                raw = json.loads(body)
            except ValueError as exc:
                raise ProtocolError(f"a frame that is not JSON ({exc})") from None
            out.append(self.accept(validate(raw)))
        return out

    def accept(self, message: Message) -> Message:
        """Check that ``message`` may come now (the order of the protocol)."""
        if self.ended:
            raise ProtocolError(f"a {message.t!r} message after the end of the job")
        if not self.ready:
            if message.t != "ready":
                raise ProtocolError(f"a {message.t!r} message before 'ready'")
            self.ready = True
        elif message.t == "ready":
            raise ProtocolError("a second 'ready' message")
        elif message.t in ("error", "done"):
            self.ended = True
        elif self.kind is not None and message.t not in REPORTS.get(self.kind, ()):
            raise ProtocolError(f"a {message.t!r} message in a {self.kind!r} job")
        return message

    def close(self) -> None:
        """At the end of the stream: a partial frame left over is an error."""
        if self._buffer:
            raise ProtocolError(f"the channel closed inside a frame ({len(self._buffer)} "
                                "bytes left over)")
