"""Recognise a checkpoint's format from its bytes, without torch and without unpickling.

- safetensors: an 8-byte little-endian header length, then a JSON header.
- TorchScript (``torch.jit.save``): a zip with ``code/`` sources and ``constants.pkl``.
- torch.export (``torch.export.save``): a zip with an ``archive_format`` entry.
- ``torch.save`` output (a zip with ``data.pkl`` and no code, or a bare pickle stream) is a
  pickle: loading it runs arbitrary code, so it is refused with a way to convert.

The archive formats are then read, without running them, as a first line of defence (the
engine child's jail is the second, docs/SECURITY.md): a TorchScript graph may call only tensor
operators (no file, process, network or print operators, no custom operator libraries), and a
torch.export archive may hold only plain tensors and standard ``aten`` operators (no opaque or
custom objects, no pickled constants, no AOTInductor package or shared library).
"""

from __future__ import annotations

import ast
import json
import struct
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from service.errors import CheckpointMismatch, CheckpointRefused, PickleRefused

CONVERT_HINT = (
    "Convert it with a few lines of Python where you trust the file: "
    "`from safetensors.torch import save_file; save_file(model.state_dict(), 'model.safetensors')`"
    " and name its `architecture`, or `torch.jit.save(torch.jit.script(model), 'model.pt')`, or "
    "`torch.export.save(torch.export.export(model, (example,)), 'model.pt2')`."
)

SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                      "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8,
                      "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class Sniffed:
    format: str  # safetensors | torchscript | torch_export
    tensors: dict[str, list[int]] | None = None  # safetensors only: name -> shape


def sniff(path: Path) -> Sniffed:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(16)
    if zipfile.is_zipfile(path):
        return _sniff_zip(path)
    if head[:1] == b"\x80":
        raise PickleRefused(
            "this file is a Python pickle (e.g. torch.save(model)); loading a pickle runs "
            "arbitrary code, so robustscope never does. " + CONVERT_HINT
        )
    if len(head) >= 8:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= min(size - 8, 100 << 20) and head[8:9] == b"{":
            return Sniffed("safetensors", _safetensors_header(path, n, size))
    raise CheckpointRefused(
        "unrecognised checkpoint format: expected safetensors, a TorchScript archive or a "
        "torch.export archive (.pt2). " + CONVERT_HINT, reason="format-unknown"
    )


def _sniff_zip(path: Path) -> Sniffed:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if any(n.rsplit("/", 1)[-1] == "archive_format" for n in names):
                _check_export_contents(zf, names)
                _check_export_payloads(zf, names)
                _check_export_graph(zf, names)
                return Sniffed("torch_export")
            if any("/code/" in n for n in names) and any(
                    n.endswith("constants.pkl") for n in names):
                _check_torchscript_code(zf, names)
                return Sniffed("torchscript")
    except zipfile.BadZipFile as exc:
        raise CheckpointRefused(f"the zip archive is damaged: {exc}") from exc
    if any(n.endswith("data.pkl") for n in names):
        raise PickleRefused(
            "this archive was written by torch.save (it holds data.pkl and no TorchScript "
            "code); loading it runs arbitrary code from its pickle, so robustscope never does. "
            + CONVERT_HINT
        )
    raise CheckpointRefused("a zip archive that is neither TorchScript nor torch.export. "
                            + CONVERT_HINT)


def _check_export_payloads(zf: zipfile.ZipFile, names: list[str]) -> None:
    """torch.export may store tensors as pickles (``use_pickle``); those archives are refused."""
    for name in names:
        if name.endswith("_config.json") and "/data/" in name:
            try:
                config = json.loads(zf.read(name)).get("config", {})
            except (ValueError, AttributeError) as exc:
                raise CheckpointRefused(f"unreadable torch.export config {name}") from exc
            pickled = [k for k, v in config.items() if isinstance(v, dict) and v.get("use_pickle")]
            if pickled:
                raise PickleRefused(
                    "this torch.export archive stores tensors as pickles "
                    f"({', '.join(pickled[:3])}); save it with plain dense tensors. "
                    + CONVERT_HINT
                )


# Operators a TorchScript graph may not call: they read or write files, start processes, talk to
# the network, print, or reach into torch's internals. Anything under ``ops.<ns>`` other than
# the standard namespaces is a custom operator library and refused as well.
TORCHSCRIPT_REFUSED = frozenset({
    "from_file", "save", "load", "print", "open", "exec", "eval", "compile", "__import__",
    "setattr", "system", "popen", "spawn", "fork", "socket", "connect", "remove",
    "unlink", "rmdir", "mkdir", "rename", "chdir", "listdir", "_C", "_ops", "classes",
    "hub", "distributed", "multiprocessing", "Print", "_load_for_lite_interpreter",
    "UntypedStorage", "from_buffer",
})
_STANDARD_OPS = frozenset({"aten", "prim", "quantized", "_quantized", "prepacked"})
_EXPORT_OPS = ("torch.ops.aten.", "torch.ops.prim.", "_operator.", "builtins.",
               "torch.ops.higher_order.", "<built-in function ", "torch._assert",
               "torch.sym_", "math.")


def _call_name(node: ast.expr) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _check_torchscript_code(zf: zipfile.ZipFile, names: list[str]) -> None:
    """Read the archive's TorchScript source (never run it) and refuse what it must not call."""
    found: set[str] = set()
    for name in names:
        if "/code/" not in name or not name.endswith(".py"):
            continue
        try:
            tree = ast.parse(zf.read(name).decode("utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError) as exc:
            raise CheckpointRefused(f"unreadable TorchScript code in {name}",
                                    reason="torchscript-unreadable") from exc
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                dotted = _call_name(node.func)
            elif isinstance(node, ast.Attribute):
                dotted = _call_name(node)
            else:
                continue
            parts = dotted.split(".")
            if parts[0] == "ops" and len(parts) > 1 and parts[1] not in _STANDARD_OPS:
                found.add(dotted)
            elif parts[0] in ("torch", "ops", "__torch__") or isinstance(node, ast.Call):
                bad = [p for p in parts if p in TORCHSCRIPT_REFUSED]
                if bad and parts[0] != "__torch__":
                    found.add(dotted)
    if found:
        raise CheckpointRefused(
            "this TorchScript model calls operators robustscope does not run (file, process, "
            f"network, print or custom operators): {', '.join(sorted(found)[:10])}",
            reason="torchscript-operator-refused", operators=sorted(found)[:20])


def _check_export_contents(zf: zipfile.ZipFile, names: list[str]) -> None:
    """Opaque and custom objects are pickles whatever their config says; an AOTInductor
    package holds a shared library the loader would dlopen; a legacy constants file is a
    pickle."""
    found: list[str] = []
    for name in names:
        base = name.rsplit("/", 1)[-1]
        if (base.startswith(("opaque_obj_", "custom_obj_"))
                or "/aotinductor/" in f"/{name}" or base.endswith((".so", ".dll", ".dylib"))
                or "/data/constants/" in name and base.endswith(".pt")
                or "/extra/" in name or "/executorch/" in name or "/mtia/" in name):
            found.append(name)
    if found:
        raise CheckpointRefused(
            "this torch.export archive holds objects robustscope does not load (opaque or "
            "custom objects, pickled constants, AOTInductor packages or shared libraries): "
            + ", ".join(found[:5]), reason="export-payload-refused", entries=found[:20])


def _check_export_graph(zf: zipfile.ZipFile, names: list[str]) -> None:
    """Every node of the exported graph must call a standard operator."""
    found: set[str] = set()
    for name in names:
        if "/models/" not in name or not name.endswith(".json"):
            continue
        try:
            program = json.loads(zf.read(name))
        except ValueError as exc:
            raise CheckpointRefused(f"unreadable torch.export program {name}") from exc
        stack: list[Any] = [program]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                target = item.get("target")
                if isinstance(target, str) and not target.startswith(_EXPORT_OPS):
                    found.add(target)
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
    if found:
        raise CheckpointRefused(
            "this torch.export graph calls operators outside torch's standard set (custom "
            f"operators are not loaded): {', '.join(sorted(found)[:10])}",
            reason="export-operator-refused", operators=sorted(found)[:20])


def _safetensors_header(path: Path, n: int, size: int) -> dict[str, list[int]]:
    with path.open("rb") as f:
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointRefused(f"the safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointRefused("the safetensors header is not a JSON object")
    tensors: dict[str, list[int]] = {}
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
            count = 1
            for d in shape:
                count *= int(d)
            ok = dtype in SAFETENSORS_DTYPES and stop - start == count * SAFETENSORS_DTYPES[dtype]
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointRefused(f"the safetensors entry {name!r} is malformed")
        tensors[name] = [int(d) for d in shape]
        end = max(end, int(stop))
    if 8 + n + end != size:
        raise CheckpointRefused(
            f"the safetensors file is truncated or padded: its header describes {8 + n + end} "
            f"bytes but the file has {size}"
        )
    return tensors


@lru_cache
def _shape_table() -> dict[str, dict[str, list[Any]]]:
    text = resources.files("service.models").joinpath("architectures.json").read_text()
    table: dict[str, dict[str, list[Any]]] = json.loads(text)
    return table


def known_architectures() -> list[str]:
    return sorted(_shape_table())


def check_architecture(tensors: dict[str, list[int]], architecture: str, num_classes: int,
                       in_channels: int) -> None:
    """Compare a state dict's names and shapes with the architecture's, naming every misfit."""
    table = _shape_table()
    if architecture not in table:
        raise CheckpointRefused(
            f"unknown architecture {architecture!r}; known: {', '.join(sorted(table))}",
            reason="architecture-unknown",
        )
    expected = {
        key: [num_classes if d == "K" else in_channels if d == "C" else d for d in shape]
        for key, shape in table[architecture].items()
    }
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: checkpoint {tensors[k]}, expected {v}"
             for k, v in expected.items() if k in tensors and tensors[k] != v]
    if missing or unexpected or wrong:
        raise CheckpointMismatch(
            f"the checkpoint does not fit {architecture!r} with num_classes={num_classes} and "
            f"{in_channels} input channels",
            missing=missing[:20], unexpected=unexpected[:20], shape_mismatches=wrong[:20],
        )
