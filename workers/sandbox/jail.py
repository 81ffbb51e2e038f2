"""The jail: one bubblewrap'd child process per job, started by the supervisor.

The child sees (docs/SECURITY.md): the system's ``/usr`` and libraries, the Python environment
and the ``workers`` package read-only; ``/job`` read-only, where the supervisor links this job's
checkpoint and dataset; ``/scratch``, its only writable directory, from which the supervisor
collects state and artifacts; a private ``/tmp``, ``/proc`` and ``/dev``. It has no network (a
new, empty network namespace), no environment beyond a few fixed variables, no view of other
processes, no capabilities (it is user 65534 in its own user namespace), and dies with the
process that started it. The supervisor enforces time and cancellation by killing it; the
memory cap is an address-space limit the child sets on itself before it reads its job.

A child is started before its job (torch imported, blocked on stdin) so a job does not wait
for the import: :meth:`Jail.take` hands out the warm child and starts the next one.

Each child comes with a model server (:class:`ModelServer`), jailed apart and started with it:
an uploaded TorchScript or torch.export model is loaded and run there, never in the child.
"""

from __future__ import annotations

import glob
import json
import os
import select
import shutil
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import contract
import workers

_SYSTEM = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/ld.so.cache",
           "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives", "/etc/fonts")
_NOBODY = "65534"


class SandboxUnavailable(RuntimeError):
    """This machine cannot build the jail (no bubblewrap, or no user namespaces)."""


@dataclass(frozen=True)
class JailConfig:
    slot_root: Path
    gpu: bool = False
    model_server: bool = True  # start a model server with every child (ModelServer)
    model_shm: int = 256 << 20  # the model channel's shared memory, in bytes
    bwrap: str = field(default_factory=lambda: shutil.which("bwrap") or "")

    def readonly_paths(self) -> list[str]:
        code = str(Path(workers.__file__).resolve().parent)
        shared = str(Path(contract.__file__).resolve().parent)  # the API/engine contract
        env = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
        env.add(os.path.dirname(os.path.realpath(sys.executable)))
        paths = [p for p in _SYSTEM if os.path.exists(p)]
        return paths + sorted(env - set(paths)) + [code, shared]

    def argv(self, slot: Path, *fds: int, module: str = "workers.sandbox.child",
             writable: bool = True) -> list[str]:
        """bubblewrap's command line for ``python -m module *fds`` jailed in ``slot``;
        ``writable=False`` mounts the slot's scratch read-only (the model server's)."""
        if not self.bwrap:
            raise SandboxUnavailable("bubblewrap (bwrap) is not installed")
        code_root = str(Path(workers.__file__).resolve().parent.parent)
        args = [self.bwrap, "--unshare-all", "--die-with-parent", "--new-session",
                "--uid", _NOBODY, "--gid", _NOBODY, "--clearenv",
                "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/scratch/home",
                "--setenv", "PYTHONPATH", code_root, "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
                "--setenv", "PYTHONNOUSERSITE", "1",
                # glibc gives each thread a 64 MB arena; few arenas keep the address space
                # (what the memory cap counts) close to what is really used.
                "--setenv", "MALLOC_ARENA_MAX", "2"]
        for p in self.readonly_paths():
            args += ["--ro-bind", p, p]
        # The CPU topology and cache sizes: kernels pick their blocking (and so their exact
        # float results) from them, and a jailed run must compute what an unjailed one does.
        args += ["--ro-bind-try", "/sys/devices/system/cpu", "/sys/devices/system/cpu"]
        args += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
                 "--ro-bind", str(slot / "in"), "/job",
                 "--bind" if writable else "--ro-bind", str(slot / "scratch"),
                 "/scratch", "--chdir", "/scratch"]
        if self.gpu:
            for dev in sorted(glob.glob("/dev/nvidia*")):
                args += ["--dev-bind", dev, dev]
            args += ["--ro-bind-try", "/sys", "/sys"]
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible is not None:
                args += ["--setenv", "CUDA_VISIBLE_DEVICES", visible]
        return [*args, "--", sys.executable, "-m", module, *map(str, fds)]


class Child:
    """One jailed engine process and its slot directory (``in/`` and ``scratch/``)."""

    def __init__(self, config: JailConfig) -> None:
        self.slot = config.slot_root / uuid.uuid4().hex
        for sub in ("in", "scratch/home", "scratch/state", "scratch/artifacts", "scratch/out"):
            (self.slot / sub).mkdir(parents=True)
        self.server: ModelServer | None = None
        self.channel: tuple[int, ...] = ()  # the child's ends of its model server's channel
        read, write = os.pipe()
        try:
            if config.model_server:
                self.server = ModelServer(config, self.slot / "server")
                self.channel = self.server.evaluator_fds
            with (self.slot / "child.log").open("wb") as log:
                self.proc = subprocess.Popen(
                    config.argv(self.slot, write), stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL, stderr=log, pass_fds=(write, *self.channel),
                    env={}, start_new_session=True)
        except BaseException:
            os.close(read)
            if self.server is not None:
                self.server.close()
            shutil.rmtree(self.slot, ignore_errors=True)
            raise
        finally:
            os.close(write)
            if self.server is not None:
                self.server.handed_over()
        self.fd, self._buffer = read, b""
        self.killed = False

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

    def start(self, job: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(job).encode() + b"\n")
            self.proc.stdin.close()
        except BrokenPipeError:  # it died before its job: reported as a crash by read()
            pass

    def read(self, timeout: float) -> list[dict[str, Any]] | None:
        """Messages that arrived within ``timeout`` seconds; ``None`` once the child closed
        its end (it exited)."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            return None
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        out = []
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict):
                out.append(message)
        return out

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

    def __init__(self, config: JailConfig, slot: Path, jailed: bool = True) -> None:
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
            env = {} if jailed else {"PYTHONPATH": str(Path(workers.__file__).resolve()
                                                       .parent.parent)}
            with (slot / "server.log").open("wb") as log:
                self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                             stdout=subprocess.DEVNULL, stderr=log,
                                             pass_fds=ends, env=env, start_new_session=True)
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

    def start(self, checkpoint: Path, job: dict[str, Any], channel: tuple[int, ...],
              timeout: float) -> dict[str, Any]:
        """Give the server its model; returns the child's ``model_server`` job field (the
        numbers of its ends of the channel, ``channel``, as it was started with them)."""
        link = self.slot / "in" / "model"
        try:
            os.link(checkpoint, link)
        except OSError:  # another file system
            shutil.copyfile(checkpoint, link)
        assert self.proc.stdin is not None
        try:
            path = "/job/model" if self.jailed else str(link)
            self.proc.stdin.write(json.dumps({**job, "model_path": path}).encode()
                                  + b"\n")
            self.proc.stdin.close()
        except BrokenPipeError:  # died before its job: the evaluator sees its channel close
            pass
        request, reply, shm = channel
        return {"request": request, "reply": reply, "shm": shm, "shm_size": self.shm_size,
                "timeout": timeout}

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


def probe(config: JailConfig) -> None:
    """Build a jail once and run a trivial command in it; raises :class:`SandboxUnavailable`."""
    if not config.bwrap:
        raise SandboxUnavailable("bubblewrap (bwrap) is not installed; install it "
                                 "(Debian: apt-get install bubblewrap) or set "
                                 "ROBUSTSCOPE_SANDBOX=off for a single trusted user")
    slot = config.slot_root / f"probe-{uuid.uuid4().hex}"
    (slot / "in").mkdir(parents=True)
    (slot / "scratch").mkdir()
    try:
        argv = config.argv(slot, 0)
        argv = argv[:argv.index("--") + 1] + ["/bin/true"]
        res = subprocess.run(argv, capture_output=True, timeout=30, env={}, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxUnavailable(f"bubblewrap failed to start: {exc}") from exc
    finally:
        shutil.rmtree(slot, ignore_errors=True)
    if res.returncode != 0:
        raise SandboxUnavailable("bubblewrap cannot build the jail here: "
                                 + res.stderr.decode(errors="replace").strip()[:300])


def main() -> int:
    """``python -m workers.sandbox.jail``: exit 0 where this machine can build the jail,
    else print why and exit 2 (``robustscope worker`` and ``up`` ask before they start)."""
    slot_root = Path(os.environ.get("ROBUSTSCOPE_DATA_DIR", "var")) / "sandbox"
    try:
        probe(JailConfig(slot_root=slot_root))
    except SandboxUnavailable as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
