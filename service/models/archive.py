"""A zip archive read as torch's ``PyTorchStreamReader`` reads it, without torch.

What torch does (``caffe2/serialize/inline_container.cc`` over miniz), and what follows here:

- The archive's root is the first central-directory entry's name up to its first ``/``; every
  record torch reads is looked up as ``<root>/<name>``, and an entry outside the root makes
  ``get_all_records`` fail.
- A lookup (``get_record``, ``has_record``) calls miniz's ``mz_zip_reader_locate_file`` with no
  flags: names are compared without regard to ASCII case, byte for byte otherwise (no ``..``
  or ``/`` normalisation), and when two entries match, which one is returned depends on
  miniz's sort. So here every entry's name must be plain ASCII from ``[A-Za-z0-9_.-/]``, no two
  names may be equal when ASCII case is ignored, and a name torch asks for must be stored with
  exactly that spelling: then torch and this reader see the same bytes under the same name.
- miniz and Python's zipfile find the central directory from the end-of-central-directory
  record; they disagree when data precedes the archive or a zip64 locator points elsewhere,
  so an archive must begin with its first entry's local header at offset 0 (which also rules
  out TorchScript's flatbuffer format, told apart by bytes 4-8) and its central directory must
  end where its end records begin.
- Entries are stored or deflated, unencrypted.
"""

from __future__ import annotations

import io
import pickletools
import re
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from core.errors import CheckpointRefused

_NAME = re.compile(r"[A-Za-z0-9_.\-/]+")
MAX_ENTRIES = 100_000


def refuse_entries(message: str, entries: list[str],
                   reason: str = "archive-entry-refused") -> CheckpointRefused:
    return CheckpointRefused(f"{message}: {', '.join(entries[:5])}", reason=reason,
                             entries=entries[:20])


@dataclass
class Archive:
    """The records of a torch zip archive, by their name below the root."""

    root: str
    records: dict[str, zipfile.ZipInfo]
    zf: zipfile.ZipFile

    def full(self, name: str) -> str:
        return f"{self.root}/{name}"

    def read(self, name: str) -> bytes:
        return self.zf.read(self.records[name])

    def lookup(self, name: str) -> str | None:
        """The stored name torch's case-blind lookup of ``name`` finds, if any."""
        want = name.lower()
        for stored in self.records:
            if stored.lower() == want:
                return stored
        return None


def open_archive(fp: BinaryIO, label: str = "") -> Archive:
    """Open ``fp`` as torch would and check that both readers agree on what it holds."""
    try:
        head = fp.read(8)
        fp.seek(0, 2)
        size = fp.tell()
        fp.seek(max(0, size - 98))
        tail = fp.read()
        fp.seek(0)
        _check_layout(head, tail, size, label)
        zf = zipfile.ZipFile(fp)
    except zipfile.BadZipFile as exc:
        raise CheckpointRefused(f"the zip archive{label} is damaged: {exc}",
                                reason="archive-damaged") from exc
    infos = zf.infolist()
    if not infos or len(infos) > MAX_ENTRIES:
        raise CheckpointRefused(f"the zip archive{label} holds {len(infos)} entries",
                                reason="archive-damaged")
    if infos[0].header_offset != 0:
        raise refuse_entries(f"the zip archive{label} does not start with its first entry",
                             [infos[0].filename])
    bad = [i.filename for i in infos if not _NAME.fullmatch(i.filename)]
    if bad:
        raise refuse_entries(f"the archive{label} holds entries whose names are not plain "
                             "ASCII paths", bad)
    root = infos[0].filename.split("/", 1)[0]
    if "/" not in infos[0].filename or root in ("", ".", ".."):
        raise refuse_entries(f"the archive{label} has no root folder", [infos[0].filename])
    outside = [i.filename for i in infos if not i.filename.startswith(root + "/")]
    if outside:
        raise refuse_entries(f"the archive{label} holds entries outside its root {root}/",
                             outside)
    seen: dict[str, str] = {}
    twins: list[str] = []
    for info in infos:
        key = info.filename.lower()
        if key in seen:
            twins += [seen[key], info.filename]
        seen[key] = info.filename
    if twins:
        raise refuse_entries(f"the archive{label} holds entries torch cannot tell apart "
                             "(the same name, ignoring case)", twins)
    odd = [i.filename for i in infos
           if i.flag_bits & 0x1 or i.compress_type not in (zipfile.ZIP_STORED,
                                                           zipfile.ZIP_DEFLATED)]
    if odd:
        raise refuse_entries(f"the archive{label} holds encrypted or unusually compressed "
                             "entries", odd)
    records = {i.filename[len(root) + 1:]: i for i in infos}
    return Archive(root=root, records=records, zf=zf)


def _check_layout(head: bytes, tail: bytes, size: int, label: str) -> None:
    if head[:4] != b"PK\x03\x04" or head[4:8] == b"PTMF":
        raise CheckpointRefused(f"the archive{label} does not begin with a zip entry",
                                reason="archive-damaged")
    if len(tail) < 22 or tail[-22:-18] != b"PK\x05\x06" or tail[-2:] != b"\x00\x00":
        raise CheckpointRefused(f"the archive{label} does not end with its zip directory "
                                "(trailing bytes or a comment)", reason="archive-damaged")
    eocd = tail[-22:]
    cd_size, cd_offset = struct.unpack("<II", eocd[12:20])
    end = size - 22
    if len(tail) >= 98 and tail[-42:-38] == b"PK\x06\x07":
        (z64_offset,) = struct.unpack("<Q", tail[-34:-26])
        z64 = tail[-98:-42]
        if z64_offset != size - 98 or z64[:4] != b"PK\x06\x06":
            raise CheckpointRefused(f"the archive{label}'s zip64 records are misplaced",
                                    reason="archive-damaged")
        cd_size, cd_offset = struct.unpack("<QQ", z64[40:56])
        end = size - 98
    if cd_offset + cd_size != end:
        raise CheckpointRefused(f"the archive{label}'s central directory is not where its "
                                "end record says", reason="archive-damaged")


# --- pickles, read opcode by opcode (never unpickled) ---------------------------------------

# Opcodes that build objects other than by the allowed globals, or that reach the extension
# registry: torch's writers never emit them (protocol 2, ``GLOBAL`` by name).
_REFUSED_OPCODES = frozenset({"STACK_GLOBAL", "INST", "OBJ", "NEWOBJ_EX", "EXT1", "EXT2",
                              "EXT4", "PERSID"})


def pickle_globals(data: bytes, where: str, allowed: Callable[[str, str], bool]) -> None:
    """Refuse a pickle that names a global ``allowed`` does not accept or uses an opcode
    torch's writers never write; ``where`` names the entry."""
    found: list[str] = []
    try:
        for op, arg, _pos in pickletools.genops(data):
            if op.name in _REFUSED_OPCODES:
                found.append(f"opcode {op.name}")
            elif op.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                if not allowed(module, name):
                    found.append(f"{module}.{name}")
    except (ValueError, TypeError, struct.error, UnicodeDecodeError) as exc:
        raise refuse_entries(f"an unreadable pickle ({exc})", [where],
                             reason="pickle-refused") from exc
    if found:
        raise CheckpointRefused(
            f"the pickle {where} names objects robustscope does not load: "
            f"{', '.join(sorted(set(found))[:10])}", reason="pickle-refused",
            entries=[where], objects=sorted(set(found))[:20])


_STORAGE = re.compile(r"[A-Z][A-Za-z0-9]*Storage")


def tensor_global(module: str, name: str) -> bool:
    """What a pickle of tensors (``torch.save`` of a tuple or dict of tensors) may name."""
    return ((module, name) in {("torch._utils", "_rebuild_tensor_v2"),
                               ("collections", "OrderedDict")}
            or module == "torch" and bool(_STORAGE.fullmatch(name)))


TORCH_SAVE_RECORDS = re.compile(
    r"data\.pkl|\.format_version|\.storage_alignment|byteorder|version|\.data/version"
    r"|\.data/serialization_id|data/[0-9]+")


def check_tensor_pickle_archive(data: bytes, where: str) -> None:
    """A ``torch.save`` archive of plain tensors (torch.export's example inputs)."""
    inner = open_archive(io.BytesIO(data), f" {where}")
    extra = [inner.full(n) for n in inner.records if not TORCH_SAVE_RECORDS.fullmatch(n)]
    if extra:
        raise refuse_entries(f"the archive {where} holds entries a tensor archive does not",
                             extra)
    if "data.pkl" not in inner.records:
        raise refuse_entries("a tensor archive without data.pkl", [where])
    pickle_globals(inner.read("data.pkl"), f"{where}:{inner.full('data.pkl')}", tensor_global)
