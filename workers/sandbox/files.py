"""Files leaving the jail: regular files only, opened without following any link.

The jail can write anything under its ``/scratch``, including symbolic links, FIFOs and
directories swapped for links between a check and a use. So the supervisor never resolves a
path the jail could have touched: it opens a directory it made itself (the slot's ``scratch``)
and walks down from it one component at a time with ``O_NOFOLLOW`` (``dir_fd``), opens the
last component with ``O_NOFOLLOW | O_NONBLOCK``, checks with ``fstat`` on that descriptor that
it is a regular file no larger than the cap, and copies from the descriptor. What it copies is
what it checked; a link anywhere on the path is refused, never followed.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
MAX_FILES = 10_000  # in one walk of a state directory


class UnsafeFile(Exception):
    """A path from the jail that is not a plain relative path to a regular file within its
    cap (a link, a FIFO, a device, ``..``, too large, ...)."""


def _parts(rel: str | PurePosixPath) -> list[str]:
    text = str(rel)
    parts = text.split("/")
    if any(p in ("..", ".", "") for p in parts) or "\0" in text:
        raise UnsafeFile(f"{text!r} is not a plain relative path")
    return list(parts)


def _open_dir(root: Path, parts: list[str]) -> int:
    """A descriptor of ``root/parts...``, every component a real directory (no link)."""
    fd = os.open(root, _DIR)
    try:
        for part in parts:
            try:
                nxt = os.open(part, _DIR, dir_fd=fd)
            except FileNotFoundError:
                raise
            except OSError as exc:
                raise UnsafeFile(f"{part!r} is not a directory ({exc.strerror})") from None
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(root: Path, rel: str | PurePosixPath, max_bytes: int) -> int:
    """An open descriptor of the regular file ``root/rel``, never through a link; raises
    :class:`UnsafeFile` (or ``FileNotFoundError`` where nothing is there). ``root`` itself
    is trusted (a directory the supervisor made)."""
    *dirs, name = _parts(rel)
    parent = _open_dir(root, dirs)
    try:
        try:
            fd = os.open(name, _FILE, dir_fd=parent)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise UnsafeFile(f"{rel} cannot be opened as a file ({exc.strerror})") from None
    finally:
        os.close(parent)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeFile(f"{rel} is not a regular file")
    if st.st_size > max_bytes:
        os.close(fd)
        raise UnsafeFile(f"{rel} is {st.st_size} bytes, over the limit of {max_bytes}")
    return fd


def copy_out(root: Path, rel: str | PurePosixPath, dst: Path, max_bytes: int) -> int:
    """Copy the regular file ``root/rel`` to ``dst`` (through a temporary file, then
    renamed); returns its size. At most ``max_bytes`` are read, whatever the file grows to."""
    fd = open_regular(root, rel, max_bytes)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.part")
    size = 0
    try:
        with os.fdopen(fd, "rb") as src, tmp.open("wb") as out:
            while True:
                chunk = src.read(min(1 << 20, max_bytes + 1 - size))
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise UnsafeFile(f"{rel} grew past the limit of {max_bytes} bytes")
                out.write(chunk)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size


def regular_files(root: Path, rel_dir: str | PurePosixPath = "",
                  ) -> Iterator[tuple[PurePosixPath, os.stat_result]]:
    """Every entry under ``root/rel_dir`` (relative to it) with its ``lstat``, walking real
    directories only. A link, FIFO, socket or device anywhere raises :class:`UnsafeFile`:
    the engine writes none, so one there was put there by something else."""
    start = _parts(rel_dir) if str(rel_dir) not in ("", ".") else []
    try:
        top = _open_dir(root, start)
    except FileNotFoundError:  # a missing directory has no files
        return
    count = 0
    stack: list[tuple[int, PurePosixPath]] = [(top, PurePosixPath())]
    try:
        while stack:
            fd, prefix = stack.pop()
            try:
                for entry in os.scandir(fd):
                    count += 1
                    if count > MAX_FILES:
                        raise UnsafeFile(f"more than {MAX_FILES} files")
                    st = entry.stat(follow_symlinks=False)
                    rel = prefix / entry.name
                    if stat.S_ISDIR(st.st_mode):
                        try:
                            sub = os.open(entry.name, _DIR, dir_fd=fd)
                        except OSError as exc:
                            raise UnsafeFile(f"{rel} ({exc.strerror})") from None
                        stack.append((sub, rel))
                    elif stat.S_ISREG(st.st_mode):
                        yield rel, st
                    else:
                        raise UnsafeFile(f"{rel} is not a regular file or directory")
            finally:
                os.close(fd)
    finally:
        for fd, _ in stack:
            os.close(fd)


def usage(root: Path, limit: int = MAX_FILES * 10) -> int:
    """Bytes of disk the tree under ``root`` holds (allocated blocks, so a sparse file counts
    what it uses), walked with ``lstat`` only: links are counted, never followed."""
    total, seen = 0, 0
    stack = [root]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            seen += 1
            if seen > limit:
                return total
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            total += st.st_blocks * 512
            if stat.S_ISDIR(st.st_mode):
                stack.append(Path(entry.path))
    return total


def link_in(src: Path, dst: Path) -> None:
    """Put a host file (a checkpoint, a dataset) into a jail's read-only input folder: a hard
    link, or a copy on another file system. Nothing here comes out of a jail."""
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copyfile(src, dst)
