"""Read-only, bounded access to an uploaded zip or tar(.gz) archive.

Nothing is ever extracted to a file system path taken from the archive: members are read
into memory one at a time, so zip-slip cannot write anywhere. Unsafe members (absolute
paths, ``..`` components, symlinks, hard links, devices) are still refused outright, because
an archive that carries them was not produced by a normal export and a user deserves to know
their upload is odd rather than have parts of it silently skipped.

Zip bombs are bounded by the sizes the archive declares (a zip member's declared size caps
what :mod:`zipfile` will ever return, and a tar header's size is the number of bytes stored),
checked against :class:`ArchiveLimits` before any member data is read. Only *stored* and
*deflate* zip members and plain or gzip tars are accepted: Python's bzip2/lzma decoders have
no output bound per call, so a tiny bz2/xz member could expand without limit in one step.
"""

from __future__ import annotations

import stat
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from service.datasets.ingest_errors import (
    ARCHIVE_INVALID,
    DatasetIngestError,
    too_large,
    unsafe,
)

#: Files read eagerly while listing (layout markers, manifests, class lists, label maps):
#: detection needs them before any image is decoded, and for a tar stream that means
#: catching them on the single listing pass.
METADATA_SUFFIXES = frozenset({".csv", ".jsonl", ".json", ".txt"})
MAX_METADATA_BYTES = 64 * 1024 * 1024

#: Operating-system litter that archivers add; it never belongs to a dataset.
_JUNK_DIRS = frozenset({"__MACOSX"})
_JUNK_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})

_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_UNSUPPORTED_MAGICS = {
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"7z\xbc\xaf\x27\x1c": "7z",
    b"Rar!": "rar",
    b"\x28\xb5\x2f\xfd": "zstd",
}


@dataclass(frozen=True)
class ArchiveLimits:
    max_uncompressed_bytes: int
    max_member_bytes: int
    max_members: int


@dataclass(frozen=True)
class Member:
    path: str
    size: int


def normalize_member_name(raw: str) -> str | None:
    """The member's path relative to the archive root, or None for a directory entry.

    Raises for names that would escape the root if a naive tool extracted them; callers that
    only resolve *manifest* paths use :func:`safe_relative_path` instead, which returns None.
    """
    name = raw.replace("\\", "/")
    if "\x00" in name:
        raise unsafe(f"archive member {raw!r} has a NUL byte in its name")
    if name.startswith("/") or (len(name) >= 2 and name[1] == ":" and name[0].isalpha()):
        raise unsafe(f"archive member {raw!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise unsafe(f"archive member {raw!r} points outside the archive (..)")
    if not parts or name.endswith("/"):
        return None
    return "/".join(parts)


def safe_relative_path(raw: str) -> str | None:
    """A manifest path normalised like a member name, or None if it is absolute or escapes."""
    name = raw.strip().replace("\\", "/")
    if not name or "\x00" in name or name.startswith("/"):
        return None
    if len(name) >= 2 and name[1] == ":" and name[0].isalpha():
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return str(PurePosixPath(*parts))


def _is_junk(path: str) -> bool:
    parts = path.split("/")
    base = parts[-1]
    return bool(_JUNK_DIRS.intersection(parts[:-1])) or base in _JUNK_NAMES or base.startswith("._")


class SafeArchive:
    """The regular files of an archive, listed and checked once, then read on demand."""

    def __init__(self, path: Path, limits: ArchiveLimits) -> None:
        self.path = path
        self.limits = limits
        self.kind = _sniff(path)
        self.members: dict[str, Member] = {}
        self.metadata: dict[str, bytes] = {}
        self._metadata_bytes = 0
        self._zip: zipfile.ZipFile | None = None
        self._zip_infos: dict[str, zipfile.ZipInfo] = {}
        try:
            if self.kind == "zip":
                self._list_zip()
            else:
                self._list_tar()
        except BaseException:
            self.close()  # refused while listing: the caller never gets to close it
            raise

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __enter__(self) -> SafeArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- listing ---------------------------------------------------------------------------

    def _admit(self, raw_name: str, size: int, total: int) -> str | None:
        """Checks one regular file and returns its normalised path (None: junk, skip)."""
        name = normalize_member_name(raw_name)
        if name is None:
            return None
        if size > self.limits.max_member_bytes:
            raise too_large(
                f"archive member {name!r} is {size} bytes uncompressed; "
                f"the limit per member is {self.limits.max_member_bytes}"
            )
        if total + size > self.limits.max_uncompressed_bytes:
            raise too_large(
                "the archive holds more than "
                f"{self.limits.max_uncompressed_bytes} bytes uncompressed"
            )
        if name in self.members:
            raise unsafe(f"archive member {name!r} appears more than once")
        if _is_junk(name):
            return None
        self.members[name] = Member(name, size)
        if len(self.members) > self.limits.max_members:
            raise too_large(f"the archive has more than {self.limits.max_members} files")
        return name

    def _wants_metadata(self, name: str, size: int) -> bool:
        suffix = PurePosixPath(name).suffix.lower()
        if suffix not in METADATA_SUFFIXES or self._metadata_bytes + size > MAX_METADATA_BYTES:
            return False
        self._metadata_bytes += size
        return True

    def _list_zip(self) -> None:
        try:
            zf = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise DatasetIngestError(
                ARCHIVE_INVALID, f"the upload looks like a zip but cannot be read: {exc}"
            ) from exc
        self._zip = zf
        total = 0
        for info in zf.infolist():
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode)
            if kind == stat.S_IFLNK:
                raise unsafe(f"archive member {info.filename!r} is a symbolic link")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise unsafe(f"archive member {info.filename!r} is not a regular file")
            if info.is_dir() or kind == stat.S_IFDIR:
                normalize_member_name(info.filename)
                continue
            if info.flag_bits & 0x1:
                raise DatasetIngestError(
                    ARCHIVE_INVALID, f"archive member {info.filename!r} is encrypted"
                )
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise DatasetIngestError(
                    ARCHIVE_INVALID,
                    f"archive member {info.filename!r} uses compression method "
                    f"{info.compress_type}; only stored and deflate are accepted",
                )
            name = self._admit(info.filename, info.file_size, total)
            total += info.file_size
            if name is not None:
                self._zip_infos[name] = info
        for name, info in self._zip_infos.items():
            if self._wants_metadata(name, info.file_size):
                self.metadata[name] = self._read_zip(info)

    def _open_tar_stream(self) -> tarfile.TarFile:
        try:
            # Stream mode ("r|"): one forward pass, no seeking back through a gzip stream.
            return tarfile.open(self.path, mode="r|gz" if self.kind == "tar.gz" else "r|")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DatasetIngestError(
                ARCHIVE_INVALID, f"the upload is neither a zip nor a readable tar: {exc}"
            ) from exc

    def _tar_members(self, tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
        while True:
            try:
                info = tf.next()
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise DatasetIngestError(
                    ARCHIVE_INVALID, f"the tar archive is damaged: {exc}"
                ) from exc
            if info is None:
                return
            yield info

    def _list_tar(self) -> None:
        total = 0
        with self._open_tar_stream() as tf:
            for info in self._tar_members(tf):
                if info.issym() or info.islnk():
                    raise unsafe(f"archive member {info.name!r} is a link")
                if info.isdir():
                    normalize_member_name(info.name)
                    continue
                if not info.isreg():
                    raise unsafe(f"archive member {info.name!r} is not a regular file")
                name = self._admit(info.name, info.size, total)
                total += info.size
                if name is not None and self._wants_metadata(name, info.size):
                    self.metadata[name] = self._read_tar(tf, info)

    # -- reading ---------------------------------------------------------------------------

    def _read_zip(self, info: zipfile.ZipInfo) -> bytes:
        assert self._zip is not None
        try:
            with self._zip.open(info) as fh:
                data = fh.read(self.limits.max_member_bytes + 1)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise DatasetIngestError(
                ARCHIVE_INVALID, f"archive member {info.filename!r} cannot be read: {exc}"
            ) from exc
        if len(data) > info.file_size:
            raise too_large(f"archive member {info.filename!r} is larger than it declares")
        return data

    def _read_tar(self, tf: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
        fh: IO[bytes] | None = tf.extractfile(info)
        if fh is None:
            raise unsafe(f"archive member {info.name!r} is not a regular file")
        try:
            return fh.read(info.size)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DatasetIngestError(
                ARCHIVE_INVALID, f"archive member {info.name!r} cannot be read: {exc}"
            ) from exc

    def read(self, path: str) -> bytes:
        """One member's bytes; for tars only metadata files (cached while listing)."""
        if path in self.metadata:
            return self.metadata[path]
        if self._zip is not None and path in self._zip_infos:
            return self._read_zip(self._zip_infos[path])
        if path in self.members:
            raise too_large(
                f"{path} was not read: the archive's text files exceed {MAX_METADATA_BYTES} bytes"
            )
        raise KeyError(path)

    def iter_read(self, paths: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        """The requested members' bytes, in archive order, each member read once."""
        wanted = set(paths)
        if self._zip is not None:
            found = [(self._zip_infos[p], p) for p in wanted if p in self._zip_infos]
            found.sort(key=lambda pair: pair[0].header_offset)
            for info, name in found:
                yield name, self._read_zip(info)
            return
        with self._open_tar_stream() as tf:
            for tinfo in self._tar_members(tf):
                if not tinfo.isreg():
                    continue
                tname = normalize_member_name(tinfo.name)
                if tname is not None and tname in wanted:
                    wanted.discard(tname)
                    yield tname, self._read_tar(tf, tinfo)
                    if not wanted:
                        return


def _sniff(path: Path) -> str:
    """The container format, from the bytes: the file name is the user's, not evidence."""
    with path.open("rb") as fh:
        head = fh.read(512)
    if head.startswith(_ZIP_MAGICS):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    for magic, what in _UNSUPPORTED_MAGICS.items():
        if head.startswith(magic):
            raise DatasetIngestError(
                ARCHIVE_INVALID,
                f"the upload is a {what} file; upload a zip, a tar or a tar.gz archive",
            )
    if len(head) == 512 and head[257:262] == b"ustar":
        return "tar"
    if len(head) == 512 and _looks_like_v7_tar(head):
        return "tar"
    raise DatasetIngestError(
        ARCHIVE_INVALID,
        "the upload is not a zip, tar or tar.gz archive (its first bytes match none of them)",
    )


def _looks_like_v7_tar(header: bytes) -> bool:
    """Pre-POSIX tars have no magic; their header checksum is the only evidence."""
    try:
        stored = int(header[148:156].split(b"\x00", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
    return stored == computed
