"""The model server: an uploaded TorchScript or torch.export model, alone in its process.

``python -m workers.sandbox.model_server REQUEST REPLY SHM`` is started by the supervisor in a
jail of its own (:class:`workers.sandbox.jail.ModelServer`): it sees the checkpoint read-only
at ``/job/model`` and nothing writable it shares with anyone, in its own PID namespace. It
imports torch and then waits for its job, one JSON line on stdin from the supervisor (a
:class:`~workers.sandbox.protocol.ServerJob`, validated on receipt: the checkpoint's format
and metadata, threads, device, memory cap). It then caps its address
space, installs the seccomp filter (:mod:`workers.sandbox.seccomp`: no exec, no new
processes, no sockets, no ptrace), and only then loads the model, through the engine's own
loaders (:func:`workers.engine.models.load`, which also checks its output on a probe).

From then on it only answers the evaluator's requests on the pipes ``REQUEST``/``REPLY``, with
tensors in the shared memory ``SHM`` (the protocol is described in
:mod:`workers.sandbox.remote`): logits of a batch, optionally keeping that call's autograd
graph, and the VJP of a kept call. The model's own exceptions and outputs that are not finite
logits of ``[n, num_classes]`` are answered as errors; the evaluator checks every answer again,
since whatever runs here may have been subverted by the model.
"""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from contract.jobs import JobErrorType, job_error
from workers.sandbox import seccomp
from workers.sandbox.child import classify
from workers.sandbox.protocol import ProtocolError, parse_server_job
from workers.sandbox.remote import finite, put, read_frame, take, write_frame


class _BadOutput(Exception):
    """The model's output is not finite logits of the asked shape (reported as the model's)."""


class Server:
    """The request loop around one loaded model."""

    def __init__(self, model: nn.Module, num_classes: int, device: torch.device,
                 mm: mmap.mmap, request_fd: int, reply_fd: int) -> None:
        self.model, self.num_classes, self.device = model, num_classes, device
        self.mm, self.request_fd, self.reply_fd = mm, request_fd, reply_fd
        self.kept: dict[int, tuple[Tensor, Tensor]] = {}
        self.generation: int | None = None
        self.next_handle = 1

    def serve(self) -> None:
        while True:
            request = read_frame(self.request_fd, None)
            if request is None:  # the evaluator is done (or gone)
                return
            seq = request.get("seq")
            try:
                if request.get("op") == "forward":
                    answer = self.forward(request)
                elif request.get("op") == "vjp":
                    answer = self.vjp(request)
                else:
                    raise ValueError(f"unknown request {request.get('op')!r}")
            except _BadOutput as exc:
                answer = {"ok": False,
                          "error": job_error(JobErrorType.MODEL_CRASHED, str(exc))}
            except Exception as exc:  # the model's own exception, reported as data
                answer = {"ok": False, "error": classify(exc)}
            write_frame(self.reply_fd, {**answer, "seq": seq})

    def forward(self, request: dict[str, Any]) -> dict[str, Any]:
        shape = [int(d) for d in request["shape"]]
        x = take(self.mm, shape).to(self.device)
        if request.get("channels_last") and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        keep = bool(request.get("keep"))
        if keep and request.get("generation") != self.generation:
            self.kept.clear()  # the graphs of an older forward call are given up
            self.generation = request.get("generation")
        dtype = request.get("autocast")
        with torch.set_grad_enabled(keep), torch.autocast(
                self.device.type, dtype=getattr(torch, dtype) if dtype else None,
                enabled=bool(dtype)):
            if keep:
                x.requires_grad_(True)
            out = self.model(x)
        if not isinstance(out, Tensor) or tuple(out.shape) != (shape[0], self.num_classes):
            got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise _BadOutput(f"the model returned {got} for {shape[0]} inputs, not logits of "
                             f"shape [{shape[0]}, {self.num_classes}]")
        logits = out.float()
        if not finite(logits):
            raise _BadOutput("the model returned logits that are not finite")
        put(self.mm, logits)
        if not keep:
            return {"ok": True, "handle": None}
        handle, self.next_handle = self.next_handle, self.next_handle + 1
        self.kept[handle] = (x, logits)
        return {"ok": True, "handle": handle}

    def vjp(self, request: dict[str, Any]) -> dict[str, Any]:
        kept = self.kept.get(int(request["handle"]))
        if kept is None:
            return {"ok": False, "stale": True}
        x, logits = kept
        grad = take(self.mm, [int(d) for d in request["shape"]]).to(self.device)
        if grad.shape != logits.shape:
            raise ValueError(f"a gradient of shape {list(grad.shape)} for logits of shape "
                             f"{list(logits.shape)}")
        gx = input_gradient(logits, x, grad)
        if not finite(gx):
            raise _BadOutput("the model's input gradient is not finite")
        put(self.mm, gx)
        return {"ok": True}


def input_gradient(logits: Tensor, x: Tensor, grad: Tensor) -> Tensor:
    """The gradient w.r.t. ``x`` of ``sum(grad * logits)``, keeping the graph for more.

    Taken as a scalar's gradient, the way the evaluator's own losses are differentiated: the
    same numbers as passing ``grad`` as the output gradient (the sum's backward multiplies
    ``grad`` by 1), but ``torch.autograd.grad`` with an output gradient imports torch's
    symbolic shapes, and sympy with them, on its first call: seconds of CPU in every job.
    """
    (gx,) = torch.autograd.grad((logits * grad).sum(), x, retain_graph=True)
    return gx


def main() -> None:
    request_fd, reply_fd, shm_fd = (int(a) for a in sys.argv[1:4])
    line = sys.stdin.readline()  # started ahead of its job, like the engine child
    if not line:
        return
    try:
        job = parse_server_job(line)
    except ProtocolError as exc:
        write_frame(reply_fd, {"seq": 0, "ok": False, "error": job_error(
            JobErrorType.SANDBOX_ERROR, f"the model server was given {exc}")})
        return
    mm = mmap.mmap(shm_fd, os.fstat(shm_fd).st_size)
    os.close(shm_fd)
    torch.set_num_threads(job.threads)
    try:
        if job.memory_limit:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (job.memory_limit, job.memory_limit))
        seccomp.install()
    except (OSError, ValueError, seccomp.SeccompUnavailable) as exc:
        write_frame(reply_fd, {"seq": 0, "ok": False,
                               "error": job_error(JobErrorType.SANDBOX_ERROR, str(exc))})
        return
    from workers.engine.models import ModelSpec, load

    try:
        spec = ModelSpec.from_metadata(job.model_format, job.model_metadata)
        device = torch.device(job.device)
        model = load(Path(job.model_path), spec, device)
    except Exception as exc:  # refused or broken checkpoint: reported as data, as in the child
        write_frame(reply_fd, {"seq": 0, "ok": False, "error": classify(exc)})
        return
    write_frame(reply_fd, {"seq": 0, "ok": True,
                           "model": {"num_classes": spec.num_classes}})
    Server(model, spec.num_classes, device, mm, request_fd, reply_fd).serve()


if __name__ == "__main__":
    main()
