"""The engine child's report channel: length-framed JSON, validated by typed models.

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
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from contract.jobs import JobErrorType
from contract.stats import decode_outcomes

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


Message = Annotated[Ready | Progress | Device | Assets | EntryDone | Epoch | Trained | Error
                    | Done, Field(discriminator="t")]
_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)

# What each job kind may report between ``ready`` and its end.
REPORTS: dict[str, frozenset[str]] = {
    "evaluate": frozenset({"progress", "device", "assets", "entry"}),
    "train": frozenset({"progress", "device", "epoch", "trained"}),
}


def validate(raw: Any) -> Message:
    """One message (a decoded JSON value) as its typed model, or :class:`ProtocolError`."""
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ProtocolError(f"invalid message ({where}: {first['msg']})") from None


def encode(message: dict[str, Any]) -> bytes:
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
