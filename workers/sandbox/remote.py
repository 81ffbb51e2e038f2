"""The model as the evaluator sees it when the model runs alone (docs/SECURITY.md).

An uploaded TorchScript or torch.export model runs in a process of its own, the model server
(:mod:`workers.sandbox.model_server`), in a jail of its own under a seccomp filter. The
evaluator (the engine child, which runs attacks, metrics, checks and the report channel)
never loads the model's code: it holds a :class:`RemoteModel`, an ``nn.Module`` whose forward
asks the server.

The channel is two pipes of small length-framed JSON messages (4-byte big-endian length, at
most :data:`MAX_FRAME` bytes) and one shared memory file of fixed size (a sealed memfd the
supervisor creates: neither side can grow or shrink it) through which tensors cross as float32.
Requests and answers:

- ``forward``: ``x`` in the shared memory; the answer puts ``[n, num_classes]`` logits there.
  With ``keep`` the server keeps that call's autograd graph (one graph per "generation", a
  forward call of the evaluator, which may span several chunks) and answers a ``handle``;
- ``vjp``: ``grad_logits`` in the shared memory; the answer is the input gradient of
  ``sum(grad_logits * logits)`` of the kept call, so an attack step costs one forward and one
  backward in the server. A handle of an older generation is answered ``stale`` and the
  evaluator computes that chunk's forward again.

The request carries the evaluator's autocast state and the input's memory layout, and the
server runs the model in them, so :class:`~workers.engine.attacks.base.Forward` (bf16 search,
channels_last, its probe and its fp32 re-checks) works on a remote model as on a local one.

Nothing from the server is believed: every answer must carry the request's sequence number,
and the tensor it points at is copied out of the shared memory first and then checked
(shape as requested, float32, all finite). A model's own exception or non-finite output,
reported as data by the server, raises :class:`RemoteModelError` (``model-crashed`` or
``out-of-memory``); a malformed or unexpected frame, an unreported bad tensor, a late answer
(:attr:`ModelChannel.timeout`) or a closed channel raises :class:`SandboxViolation`, and
every later call raises it again, so no number is computed from a channel that misbehaved once.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import select
import struct
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from contract.jobs import MODEL_ERRORS, JobErrorType, job_error

MAX_FRAME = 1 << 16
"""The largest control message, in bytes (tensors never cross the pipes)."""

# MODEL_ERRORS (contract.jobs): the error types a server may report for its model; anything
# else is a violation.


class RemoteFailure(RuntimeError):
    """The job fails with ``error`` (``{"type", "detail"}``)."""

    def __init__(self, error: dict[str, str]) -> None:
        super().__init__(error["detail"])
        self.error = error


class RemoteModelError(RemoteFailure):
    """The model raised, or returned something that is not finite logits of the right shape,
    and its server said so."""


class SandboxViolation(RemoteFailure):
    """The model server broke the protocol (``sandbox-error``), answered late
    (``time-limit``), or went away (``model-crashed``)."""

    def __init__(self, detail: str,
                 kind: JobErrorType = JobErrorType.SANDBOX_ERROR) -> None:
        super().__init__(job_error(kind, detail))


SERVER_EXITED = "the model's process exited"


# --- framing (both sides) ---------------------------------------------------------------

def write_frame(fd: int, message: dict[str, Any]) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_FRAME:
        raise ValueError(f"a control message of {len(data)} bytes is over {MAX_FRAME}")
    view = memoryview(struct.pack(">I", len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def read_exact(fd: int, n: int, deadline: float | None) -> bytes | None:
    """``n`` bytes, or ``None`` at end of file; raises ``TimeoutError`` past ``deadline``
    (``time.monotonic()``; ``None`` waits)."""
    out = b""
    while len(out) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, n - len(out))
        if not chunk:
            return None
        out += chunk
    return out


def read_frame(fd: int, deadline: float | None) -> dict[str, Any] | None:
    """One control message; ``None`` at end of file. Raises ``TimeoutError`` past
    ``deadline`` and ``ValueError`` on a frame that is too long, not JSON or not an object."""
    head = read_exact(fd, 4, deadline)
    if head is None:
        return None
    (size,) = struct.unpack(">I", head)
    if size > MAX_FRAME:
        raise ValueError(f"a frame of {size} bytes (at most {MAX_FRAME})")
    body = read_exact(fd, size, deadline)
    if body is None:
        raise ValueError("the channel closed inside a frame")
    message = json.loads(body)
    if not isinstance(message, dict):
        raise ValueError("a frame that is not a JSON object")
    return message


def shared_memory(size: int) -> int:
    """A memfd of ``size`` bytes sealed against growing and shrinking (a side that shrank it
    would make the other's reads fault); the supervisor creates it and passes it to both."""
    import fcntl

    fd = os.memfd_create("robustscope-model", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    return fd


def put(mm: mmap.mmap, t: Tensor) -> None:
    """``t`` as contiguous float32 at the start of the shared memory."""
    flat = t.detach().to("cpu", torch.float32).contiguous().view(-1).numpy()
    np.frombuffer(mm, np.float32, flat.size)[:] = flat


def finite(t: Tensor) -> bool:
    """Whether every value of ``t`` is finite. Its smallest and largest values in one pass
    (a NaN anywhere makes both NaN, an infinity is one of them): a tenth of the CPU of
    ``isfinite(t).all()``, which writes a mask first and is checked on every answer. Read
    detached: the server checks logits it keeps for the VJP, and the check is no part of it."""
    if not t.numel():
        return True
    low, high = torch.aminmax(t.detach())
    return math.isfinite(float(low)) and math.isfinite(float(high))


def take(mm: mmap.mmap, shape: Sequence[int]) -> Tensor:
    """A private float32 copy of ``shape`` from the start of the shared memory."""
    count = int(np.prod(shape)) if len(shape) else 1
    return torch.from_numpy(np.frombuffer(mm, np.float32, count).copy()).view(*shape)


# --- the evaluator's side ----------------------------------------------------------------

class ModelChannel:
    """The evaluator's end of one model server's channel."""

    def __init__(self, request_fd: int, reply_fd: int, shm_fd: int, shm_size: int,
                 num_classes: int, timeout: float = 300.0) -> None:
        self.request_fd, self.reply_fd = request_fd, reply_fd
        self.mm = mmap.mmap(shm_fd, shm_size)
        os.close(shm_fd)
        self.size, self.num_classes, self.timeout = shm_size, int(num_classes), float(timeout)
        self.seq = 0
        self.generation = 0
        self.failure: RemoteFailure | None = None  # a violation, raised by every later call
        self.requests = 0

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """The server's first message: the model is loaded and checked, or why it is not
        (``checkpoint-error``, ``out-of-memory``...)."""
        answer = self._answer(0, timeout)
        if answer.get("ok") is not True:
            raise self._model_error(answer, (*MODEL_ERRORS, JobErrorType.SANDBOX_ERROR))
        info = answer.get("model", {})
        return info if isinstance(info, dict) else {}

    def rows_per_chunk(self, row_shape: Sequence[int]) -> int:
        row = max(int(np.prod(row_shape)), self.num_classes) * 4
        rows = self.size // row
        if rows < 1:
            raise SandboxViolation(f"one example ({row} bytes) does not fit the model channel "
                                   f"({self.size} bytes)")
        return rows

    def forward(self, x: Tensor, *, keep: bool, generation: int | None = None,
                autocast: str | None = None, channels_last: bool = False,
                ) -> tuple[Tensor, int | None]:
        """Logits ``[n, num_classes]`` (float32, CPU) of one chunk, and its handle if kept."""
        put(self.mm, x)
        answer = self._call({"op": "forward", "shape": list(x.shape), "keep": keep,
                             "generation": generation, "autocast": autocast,
                             "channels_last": channels_last})
        handle = answer.get("handle")
        if keep != isinstance(handle, int) or isinstance(handle, bool):
            raise self._violate("an answer without the handle of the kept call")
        return self._tensor([x.shape[0], self.num_classes]), handle

    def vjp(self, handle: int, grad_logits: Tensor, x_shape: Sequence[int]) -> Tensor | None:
        """The input gradient of ``sum(grad_logits * logits)`` of a kept call; ``None`` where
        the server no longer keeps it."""
        put(self.mm, grad_logits)
        answer = self._call({"op": "vjp", "handle": handle,
                             "shape": list(grad_logits.shape)})
        if answer.get("stale") is True:
            return None
        return self._tensor(list(x_shape))

    def new_generation(self) -> int:
        self.generation += 1
        return self.generation

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.failure is not None:
            raise self.failure
        self.seq += 1
        self.requests += 1
        try:
            write_frame(self.request_fd, {**request, "seq": self.seq})
        except OSError:
            raise self._violate(SERVER_EXITED, JobErrorType.MODEL_CRASHED) from None
        answer = self._answer(self.seq, self.timeout)
        if answer.get("ok") is True:
            return answer
        if answer.get("ok") is False and answer.get("stale") is True and request["op"] == "vjp":
            return answer
        raise self._model_error(answer)

    def _answer(self, seq: int, timeout: float) -> dict[str, Any]:
        if self.failure is not None:
            raise self.failure
        try:
            answer = read_frame(self.reply_fd, time.monotonic() + timeout)
        except TimeoutError:
            raise self._violate(f"the model did not answer within {timeout:g} s",
                                JobErrorType.TIME_LIMIT) from None
        except (ValueError, RecursionError) as exc:  # (UnicodeDecodeError is a ValueError)
            raise self._violate(f"a malformed message from the model's process ({exc})"
                                ) from None
        if answer is None:
            raise self._violate(SERVER_EXITED, JobErrorType.MODEL_CRASHED)
        if answer.get("seq") != seq or not isinstance(answer.get("ok"), bool):
            raise self._violate("an answer that was not asked for")
        return answer

    def _model_error(self, answer: dict[str, Any],
                     allowed: tuple[JobErrorType, ...] = MODEL_ERRORS) -> RemoteFailure:
        error = answer.get("error")
        if (answer.get("ok") is not False or not isinstance(error, dict)
                or error.get("type") not in allowed
                or not isinstance(error.get("detail"), str)):
            return self._violate("a malformed answer from the model's process")
        return RemoteModelError(job_error(error["type"], error["detail"]))

    def _tensor(self, shape: list[int]) -> Tensor:
        out = take(self.mm, shape)  # copied first: the server cannot change it after the check
        if not finite(out):
            raise self._violate("the model's process answered values that are not finite")
        return out

    def _violate(self, detail: str,
                 kind: JobErrorType = JobErrorType.SANDBOX_ERROR) -> SandboxViolation:
        if self.failure is None:
            self.failure = SandboxViolation(detail, kind)
        assert isinstance(self.failure, SandboxViolation)
        return self.failure

    def close(self) -> None:
        for fd in (self.request_fd, self.reply_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.mm.close()


class _Kept(torch.autograd.Function):
    """Logits whose backward is the server's VJP of the same call."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, model: RemoteModel, flags: dict[str, Any]
                ) -> Tensor:
        logits, handles = model.call(x, keep=True, **flags)
        ctx.model, ctx.flags, ctx.handles = model, flags, handles
        ctx.save_for_backward(x)
        return logits

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        (x,) = ctx.saved_tensors
        return ctx.model.vjp(x, grad, ctx.handles, ctx.flags), None, None


class RemoteModel(nn.Module):
    """A model served by another process: ``forward(x)`` gives its logits (float32, on
    ``x``'s device), differentiable w.r.t. ``x`` through the server's VJP. It is in eval mode
    for good; ``train()`` only records the flag (the model server's model stays as loaded)."""

    def __init__(self, channel: ModelChannel) -> None:
        super().__init__()
        self.channel = channel
        self.train(False)

    def forward(self, x: Tensor) -> Tensor:
        device = x.device.type
        flags: dict[str, Any] = {
            "autocast": (str(torch.get_autocast_dtype(device)).removeprefix("torch.")
                         if torch.is_autocast_enabled(device) else None),
            "channels_last": x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)}
        if torch.is_grad_enabled() and x.requires_grad:
            out: Tensor = _Kept.apply(x, self, flags)
            return out
        logits, _ = self.call(x, keep=False, **flags)
        return logits

    def call(self, x: Tensor, *, keep: bool, autocast: str | None, channels_last: bool
             ) -> tuple[Tensor, list[int | None]]:
        """The logits of ``x`` in chunks that fit the shared memory, and each chunk's handle."""
        rows = self.channel.rows_per_chunk(x.shape[1:])
        generation = self.channel.new_generation() if keep else None
        parts, handles = [], []
        for s in range(0, max(x.shape[0], 1), rows):
            logits, handle = self.channel.forward(x[s:s + rows], keep=keep,
                                                  generation=generation, autocast=autocast,
                                                  channels_last=channels_last)
            parts.append(logits)
            handles.append(handle)
        return torch.cat(parts).to(x.device), handles

    def vjp(self, x: Tensor, grad: Tensor, handles: list[int | None],
            flags: dict[str, Any]) -> Tensor:
        rows = self.channel.rows_per_chunk(x.shape[1:])
        parts = []
        for k, s in enumerate(range(0, max(x.shape[0], 1), rows)):
            chunk, g = x[s:s + rows], grad[s:s + rows]
            handle = handles[k]
            assert handle is not None
            got = self.channel.vjp(handle, g, chunk.shape)
            if got is None:  # the server dropped this graph for a newer one: compute it again
                _, (fresh,) = self.call(chunk, keep=True, **flags)
                assert fresh is not None
                got = self.channel.vjp(fresh, g, chunk.shape)
                if got is None:
                    raise self.channel._violate("the model's process dropped a graph it had "
                                                "just kept")
            parts.append(got)
        return torch.cat(parts).to(device=x.device, dtype=x.dtype)

    def train(self, mode: bool = True) -> RemoteModel:
        self.training = mode
        return self
