"""Per-job cgroups: the pids and memory limits that hold across every process of a jail.

cgroup v2 where this worker's own cgroup delegates the ``pids`` and ``memory`` controllers,
else v1 (one directory per controller); where neither is writable a jail falls back to
``RLIMIT_NPROC`` and the per-process address-space cap (:meth:`JailConfig.limits` says which).
"""

from __future__ import annotations

import errno
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path


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
