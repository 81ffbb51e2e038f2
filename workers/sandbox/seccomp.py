"""A seccomp filter for the model server: the second wall behind the jail.

The filter is classic BPF built here and installed with ``seccomp(2)`` on every thread of the
process at once (``SECCOMP_FILTER_FLAG_TSYNC``: torch's thread pools already run when it is
installed), after ``no_new_privs``. Once installed it cannot be removed, by the process or
anything it starts. It refuses, with ``EPERM``:

- ``execve``, ``execveat``: no other program runs;
- ``fork``, ``vfork``, and ``clone`` without ``CLONE_THREAD``: no new processes, only threads
  (torch's thread pools need them);
- ``socket``, ``socketpair``, ``connect``: no sockets, not even in the jail's empty network;
- ``ptrace``, ``process_vm_readv``, ``process_vm_writev``: no reading or writing another
  process's memory.

``clone3`` fails with ``ENOSYS`` (its flags sit in memory a filter cannot read), so glibc
falls back to ``clone``, whose flags the filter checks. A system call of another ABI (x32 on
x86-64) fails; one made under another architecture's calling convention kills the process.
Every other system call is allowed: the jail (no network, no capabilities, read-only files)
is the first wall.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

# Classic BPF (linux/bpf_common.h, linux/filter.h) and seccomp (linux/seccomp.h) constants.
_LD_W_ABS = 0x00 | 0x00 | 0x20
_JEQ_K = 0x05 | 0x10 | 0x00
_JGE_K = 0x05 | 0x30 | 0x00
_JSET_K = 0x05 | 0x40 | 0x00
_RET_K = 0x06 | 0x00
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_RET_ALLOW = 0x7FFF0000
_OFF_NR, _OFF_ARCH, _OFF_ARG0 = 0, 4, 16  # struct seccomp_data (little-endian low word)
_CLONE_THREAD = 0x00010000
_PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1
_X32_BIT = 0x40000000


class _Abi:
    def __init__(self, audit_arch: int, seccomp: int, denied: dict[str, int], clone: int,
                 clone3: int, x32: bool) -> None:
        self.audit_arch, self.seccomp, self.denied = audit_arch, seccomp, denied
        self.clone, self.clone3, self.x32 = clone, clone3, x32


_ABIS = {
    "x86_64": _Abi(0xC000003E, 317, {
        "execve": 59, "execveat": 322, "fork": 57, "vfork": 58, "socket": 41,
        "socketpair": 53, "connect": 42, "ptrace": 101, "process_vm_readv": 310,
        "process_vm_writev": 311}, clone=56, clone3=435, x32=True),
    "aarch64": _Abi(0xC00000B7, 277, {  # no fork/vfork system calls on arm64
        "execve": 221, "execveat": 281, "socket": 198, "socketpair": 199, "connect": 203,
        "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271},
        clone=220, clone3=435, x32=False),
}

DENIED = ("execve", "execveat", "fork", "vfork", "clone without CLONE_THREAD", "clone3 (ENOSYS)",
          "socket", "socketpair", "connect", "ptrace", "process_vm_readv", "process_vm_writev")
"""What :func:`install` refuses, for documentation and reports."""


class SeccompUnavailable(RuntimeError):
    """The filter cannot be installed on this machine (architecture or kernel)."""


def _abi() -> _Abi:
    machine = platform.machine()
    if machine not in _ABIS:
        raise SeccompUnavailable(f"no seccomp filter for the {machine} architecture")
    return _ABIS[machine]


def program(abi: _Abi | None = None) -> bytes:
    """The filter as ``struct sock_filter`` records."""
    abi = abi or _abi()
    eperm, enosys = _RET_ERRNO | errno.EPERM, _RET_ERRNO | errno.ENOSYS
    # (code, jump-if-true label, jump-if-false label, k); labels are resolved below.
    ops: list[tuple[int, str | None, str | None, int]] = [
        (_LD_W_ABS, None, None, _OFF_ARCH),
        (_JEQ_K, "nr", "kill", abi.audit_arch),
    ]
    body: list[tuple[str | None, tuple[int, str | None, str | None, int]]] = [
        ("nr", (_LD_W_ABS, None, None, _OFF_NR))]
    if abi.x32:
        body.append((None, (_JGE_K, "eperm", None, _X32_BIT)))
    for nr in abi.denied.values():
        body.append((None, (_JEQ_K, "eperm", None, nr)))
    body.append((None, (_JEQ_K, "enosys", None, abi.clone3)))
    body.append((None, (_JEQ_K, "clone", None, abi.clone)))
    body += [("allow", (_RET_K, None, None, _RET_ALLOW)),
             ("clone", (_LD_W_ABS, None, None, _OFF_ARG0)),
             (None, (_JSET_K, "thread", "eperm", _CLONE_THREAD)),
             ("thread", (_RET_K, None, None, _RET_ALLOW)),
             ("eperm", (_RET_K, None, None, eperm)),
             ("enosys", (_RET_K, None, None, enosys)),
             ("kill", (_RET_K, None, None, _RET_KILL_PROCESS))]
    labelled: list[tuple[str | None, tuple[int, str | None, str | None, int]]] = [
        (None, op) for op in ops] + body
    where = {label: i for i, (label, _) in enumerate(labelled) if label is not None}
    out = b""
    for i, (_, (code, jt, jf, k)) in enumerate(labelled):
        def offset(label: str | None, i: int = i) -> int:
            if label is None:
                return 0
            delta = where[label] - i - 1
            assert 0 <= delta < 256
            return delta
        out += struct.pack("=HBBI", code, offset(jt), offset(jf), k)
    return out


def install() -> None:
    """Install the filter on every thread of this process; raises :class:`SeccompUnavailable`
    where the kernel refuses it."""
    abi = _abi()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise SeccompUnavailable(f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(err)}")
    code = program(abi)
    buf = ctypes.create_string_buffer(code, len(code))

    class _Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = _Prog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
    libc.syscall.restype = ctypes.c_long
    res = libc.syscall(ctypes.c_long(abi.seccomp), ctypes.c_long(_SECCOMP_SET_MODE_FILTER),
                       ctypes.c_long(_SECCOMP_FILTER_FLAG_TSYNC), ctypes.byref(prog))
    if res != 0:
        err = ctypes.get_errno()
        detail = os.strerror(err) if res < 0 else f"thread {res} could not be synchronised"
        raise SeccompUnavailable(f"seccomp(SET_MODE_FILTER) failed: {detail}")
