"""The jail's processes: one bubblewrap'd engine child per job, started by the supervisor.

How a jail is built and what the child sees is :mod:`workers.sandbox.config`. The supervisor
enforces time and cancellation by killing the child; the memory cap is an address-space limit
the child sets on itself before it reads its job.

A child is started before its job (torch imported, blocked on stdin) so a job does not wait
for the import: :meth:`Jail.take` hands out the warm child and starts the next one.

Each child comes with a model server (:class:`ModelServer`), jailed apart and started with it:
an uploaded TorchScript or torch.export model is loaded and run there, never in the child.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from workers.sandbox.cgroup import Cgroup
from workers.sandbox.config import (
    CODE_ROOT,
    JailConfig,
    SandboxUnavailable,
    config_from_settings,
    probe,
)
from workers.sandbox.files import link_in
from workers.sandbox.protocol import (
    Decoder,
    EvaluateJob,
    ModelLink,
    ProtocolError,
    ServerJob,
    TrainJob,
    dump_job,
)


class Child:
    """One jailed engine process and its slot directory (``in/`` and ``scratch/``)."""

    def __init__(self, config: JailConfig) -> None:
        self.config = config
        self.slot = config.slot_root / uuid.uuid4().hex
        for sub in ("in", "scratch/home", "scratch/state", "scratch/artifacts", "scratch/out"):
            (self.slot / sub).mkdir(parents=True)
        self.cgroup: Cgroup | None = None
        self.server: ModelServer | None = None
        self.channel: tuple[int, ...] = ()  # the child's ends of its model server's channel
        read, write = os.pipe()
        try:
            if config.cgroup is not None:
                self.cgroup = Cgroup(config.cgroup, config.pids,
                                     None if config.gpu else config.memory_limit)
            if config.model_server:  # in the same cgroup: one budget for both processes
                self.server = ModelServer(config, self.slot / "server", cgroup=self.cgroup)
                self.channel = self.server.evaluator_fds
            with (self.slot / "child.log").open("wb") as log:
                self.proc = subprocess.Popen(
                    config.argv(self.slot, write), stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL, stderr=log, pass_fds=(write, *self.channel),
                    env={}, start_new_session=True,
                    preexec_fn=self.cgroup.join if self.cgroup is not None else None)
        except BaseException:
            os.close(read)
            if self.server is not None:
                self.server.close()
            if self.cgroup is not None:
                self.cgroup.remove()
            shutil.rmtree(self.slot, ignore_errors=True)
            raise
        finally:
            os.close(write)
            if self.server is not None:
                self.server.handed_over()
        self.fd = read
        self.decoder = Decoder()
        self.killed = False
        self.address_space: int | None = None  # after import, from its 'ready' message

    @property
    def inputs(self) -> Path:
        return self.slot / "in"

    @property
    def scratch(self) -> Path:
        return self.slot / "scratch"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def usable(self) -> bool:
        """Whether the child, and its model server if it has one, still wait for a job."""
        return self.alive() and (self.server is None or self.server.alive())

    def start(self, job: EvaluateJob | TrainJob) -> None:
        """Hand the child its job, with the limits it sets on itself before any of the model's
        code runs: the address-space cap where the jail has one, the process count where no
        cgroup holds the jail."""
        assert self.proc.stdin is not None
        self.decoder.kind = job.kind
        job = job.limited(memory_limit=self.config.address_space(),
                          pids_limit=self.config.pids if self.cgroup is None else None)
        try:
            self.proc.stdin.write(dump_job(job))
            self.proc.stdin.close()
        except BrokenPipeError:  # it died before its job: reported as a crash by read()
            pass

    def read(self, timeout: float) -> list[dict[str, Any]] | None:
        """Messages that arrived within ``timeout`` seconds, validated (typed, in protocol
        order); ``None`` once the child closed its end (it exited). Raises
        :class:`ProtocolError` on the first thing the evaluator does not write."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            self.decoder.close()
            return None
        out = []
        for message in self.decoder.feed(chunk):
            if message.t == "ready":
                self.address_space = message.address_space
            out.append(message.model_dump())
        return out

    @property
    def ready(self) -> bool:
        """Whether the child said it was ready (it started: the jail and the imports work)."""
        return self.decoder.ready

    def exit_status(self, timeout: float = 5.0) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_tail(self, limit: int = 2000) -> str:
        try:
            with (self.slot / "child.log").open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """Kill the jail and everything in it (the PID namespace dies with its first process)."""
        self.killed = True
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
        self.proc.wait()
        if self.server is not None:
            self.server.kill()

    def close(self) -> None:
        self.kill()
        if self.server is not None:
            self.server.close()
        os.close(self.fd)
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        if self.cgroup is not None:
            self.cgroup.remove()
        shutil.rmtree(self.slot, ignore_errors=True)


class ModelServer:
    """The model server of one child (:mod:`workers.sandbox.model_server`), jailed apart.

    It sees only ``server/in`` of the child's slot as ``/job`` (read-only: the checkpoint is
    linked there when a job needs it) and an empty, read-only ``/scratch``, in a PID namespace
    of its own. The channel (two pipes and a sealed memfd) is created here; the evaluator's
    ends (:attr:`evaluator_fds`: request, reply, shared memory) are passed to the child when
    it starts and then closed here, so each side sees end of file when the other is gone.
    Started with its child and killed with it; a job that does not need it closes it.
    ``jailed=False`` runs it without bubblewrap (tests of the protocol, nothing else).
    """

    MODULE = "workers.sandbox.model_server"

    def __init__(self, config: JailConfig, slot: Path, jailed: bool = True,
                 cgroup: Cgroup | None = None) -> None:
        from workers.sandbox.remote import shared_memory

        self.slot, self.shm_size, self.jailed = slot, config.model_shm, jailed
        for sub in ("in", "scratch"):
            (slot / sub).mkdir(parents=True)
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        shm = shared_memory(self.shm_size)
        ends = (request_r, reply_w, shm)
        try:
            argv = (config.argv(slot, *ends, module=self.MODULE, writable=False) if jailed
                    else [sys.executable, "-m", self.MODULE, *map(str, ends)])
            env = {} if jailed else {"PYTHONPATH": str(CODE_ROOT)}
            with (slot / "server.log").open("wb") as log:
                self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                             stdout=subprocess.DEVNULL, stderr=log,
                                             pass_fds=ends, env=env, start_new_session=True,
                                             preexec_fn=cgroup.join if cgroup else None)
        except BaseException:
            for fd in (*ends, request_w, reply_r):
                os.close(fd)
            raise
        os.close(request_r)
        os.close(reply_w)
        self.evaluator_fds: tuple[int, ...] = (request_w, reply_r, shm)

    def handed_over(self) -> None:
        """The child has its ends of the channel: this process lets go of them."""
        for fd in self.evaluator_fds:
            os.close(fd)
        self.evaluator_fds = ()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def start(self, checkpoint: Path, job: ServerJob, channel: tuple[int, ...],
              timeout: float) -> ModelLink:
        """Give the server its model; returns the child's ``model_server`` job field (the
        numbers of its ends of the channel, ``channel``, as it was started with them)."""
        link = self.slot / "in" / "model"
        link_in(checkpoint, link)
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(dump_job(job if self.jailed else job.at(str(link))))
            self.proc.stdin.close()
        except BrokenPipeError:  # died before its job: the evaluator sees its channel close
            pass
        request, reply, shm = channel
        return ModelLink(request=request, reply=reply, shm=shm, shm_size=self.shm_size,
                         timeout=timeout)

    def exit_status(self, timeout: float = 5.0) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def close(self) -> None:
        self.kill()
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        for fd in self.evaluator_fds:
            os.close(fd)
        self.evaluator_fds = ()


class Jail:
    """Hands out jailed children, keeping one started ahead of the next job."""

    def __init__(self, config: JailConfig, prewarm: bool = True) -> None:
        self.config, self.prewarm = config, prewarm
        self._warm: Child | None = None
        self._lock = threading.Lock()

    def take(self) -> Child:
        with self._lock:
            child, self._warm = self._warm, None
            if child is None or not child.usable():
                if child is not None:
                    child.close()
                child = Child(self.config)
            if self.prewarm:
                self._warm = Child(self.config)
            return child

    def close(self) -> None:
        with self._lock:
            if self._warm is not None:
                self._warm.close()
                self._warm = None


def probe_engine(config: JailConfig, timeout: float = 300.0) -> dict[str, int]:
    """Run the real engine child in a jail end to end: import torch and the engine, load a
    tiny TorchScript model, evaluate it on a few images, answer on the framed channel. Raises
    :class:`SandboxUnavailable` with the real reason (bubblewrap's message, the child's log
    tail, its error) where that fails, or where the memory budget is below what the job
    needed (measured here: the child's peak address space plus the jail's tmpfs sizes).
    Returns what it measured: ``address_space`` after import and ``peak_address_space``."""
    import io

    import torch
    from torch import nn

    probe(config)
    cap = config.address_space()
    if cap is not None and cap <= 0:
        raise SandboxUnavailable(
            f"the memory budget ({config.memory_limit} bytes) does not even hold the jail's "
            f"tmpfs mounts ({config.tmp_size + config.shm_size} bytes)")
    # Measured without a cap, then compared with it: a cap too small fails with its number.
    measure = JailConfig(**{**config.__dict__, "memory_limit": None})
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 4)).eval()
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(net), buf)
    child = Child(measure)
    try:
        (child.inputs / "model").write_bytes(buf.getvalue())
        job = EvaluateJob(
            kind="evaluate", suite=[{"benchmark": "clean"}], completed=[], seed=0,
            batch_size=8, amp=False, model_path="/job/model", model_format="torchscript",
            model_metadata={"name": "probe", "num_classes": 4, "input_shape": [3, 32, 32]},
            dataset="shapes-32", dataset_path=None, dataset_params={}, split="test",
            n_examples=8, class_map=None, state_dir="/scratch/state",
            artifact_dir="/scratch/artifacts", threads=1, device="cuda" if config.gpu else "cpu")
        if child.server is not None:  # the model runs in its server, as in a real job
            job = job.served(child.server.start(child.inputs / "model", job.server_job(None),
                                                child.channel, timeout))
        child.start(job)
        deadline = time.monotonic() + timeout
        end: dict[str, Any] | None = None
        while end is None:
            if time.monotonic() > deadline:
                raise SandboxUnavailable(f"the engine child gave no answer within {timeout:g} s;"
                                         f" its log ends: {child.log_tail(600).strip()}")
            try:
                messages = child.read(0.5)
            except ProtocolError as exc:
                raise SandboxUnavailable(f"the engine child broke the protocol: {exc}") from exc
            if messages is None:
                status = child.exit_status()
                raise SandboxUnavailable(
                    f"the engine child exited (status {status}) "
                    f"{'after' if child.ready else 'before'} it was ready; its log ends: "
                    f"{child.log_tail(600).strip() or '(empty)'}")
            end = next((m for m in messages if m["t"] in ("done", "error")), None)
        if end["t"] == "error":
            raise SandboxUnavailable(f"the engine child failed its probe job: {end['type']}: "
                                     f"{end['detail']}; its log ends: "
                                     f"{child.log_tail(600).strip()}")
    finally:
        child.close()
    measured = {"address_space": int(child.address_space or 0),
                "peak_address_space": int(end["peak_address_space"])}
    if cap is not None and cap < measured["peak_address_space"]:
        floor = measured["peak_address_space"] + (config.memory_limit or 0) - cap
        raise SandboxUnavailable(
            f"the memory budget ROBUSTSCOPE_SANDBOX_MEMORY_LIMIT={config.memory_limit} bytes "
            f"leaves {cap} bytes of address space per process after /tmp, /dev/shm and the "
            f"model channel's shared memory, but a "
            f"benign job needs {measured['peak_address_space']} bytes (measured: importing "
            f"torch and the engine maps {measured['address_space']}); set at least {floor}")
    return measured


def main() -> int:
    """``python -m workers.sandbox.jail``: run the engine child in a jail end to end
    (:func:`probe_engine`); exit 0 and print which limits hold where it works, else print
    why not and exit 2 (``robustscope worker`` and ``up`` ask before they start)."""
    from core.settings import get_settings

    settings = get_settings()
    gpu = settings.device.startswith("cuda")
    if settings.device == "auto":
        import torch

        gpu = torch.cuda.is_available()
    config = config_from_settings(settings, gpu=gpu)
    try:
        measured = probe_engine(config)
    except SandboxUnavailable as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    sys.stdout.write(f"sandbox: {config.bwrap}; {config.limits()}; the probe job's peak "
                     f"address space {measured['peak_address_space']} bytes\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
