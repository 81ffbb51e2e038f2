"""Recognise a checkpoint's format from its bytes, without torch and without unpickling.

- safetensors: an 8-byte little-endian header length, then a JSON header.
- TorchScript (``torch.jit.save``): a zip with ``code/`` sources and ``constants.pkl``.
- torch.export (``torch.export.save``): a zip with an ``archive_format`` entry.
- ``torch.save`` output (a zip with ``data.pkl`` and no code, or a bare pickle stream) is a
  pickle: loading it runs arbitrary code, so it is refused with a way to convert.

The archive formats are then read as torch reads them (``service/models/archive.py``: names
matched without regard to case, every config's ``path_name`` resolved) and accepted by positive
list, as the first of two walls (the engine's operator check and its jail are the second,
docs/SECURITY.md): a torch.export archive may hold only its graph, raw tensor bytes, its
example inputs (a pickle of tensors, read opcode by opcode) and torch's metadata files, and its
graph only operators of ``contract/operators.py``, sympy arithmetic and plain pytree specs; a
TorchScript archive only its code, its pickles (naming tensors and its own modules) and tensors,
and its code only calls to operators of the list, its own modules and TorchScript's pure
builtins. Each refusal names the entry or operator.
"""

from __future__ import annotations

import ast
import builtins
import json
import re
import struct
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from contract import operators
from core.errors import CheckpointMismatch, CheckpointRefused, PickleRefused
from service.models.archive import (
    Archive,
    check_tensor_pickle_archive,
    open_archive,
    pickle_globals,
    refuse_entries,
    tensor_global,
)

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
    with path.open("rb") as fp:
        try:
            names = zipfile.ZipFile(fp).namelist()
        except zipfile.BadZipFile as exc:
            raise CheckpointRefused(f"the zip archive is damaged: {exc}",
                                    reason="archive-damaged") from exc
        lowered = [n.lower() for n in names]
        fp.seek(0)
        if any(n.endswith("/archive_format") for n in lowered):
            _check_export(open_archive(fp))
            return Sniffed("torch_export")
        if any("/code/" in n for n in lowered) and any(
                n.endswith("/constants.pkl") for n in lowered):
            _check_torchscript(open_archive(fp))
            return Sniffed("torchscript")
    if any(n.endswith("data.pkl") for n in lowered):
        raise PickleRefused(
            "this archive was written by torch.save (it holds data.pkl and no TorchScript "
            "code); loading it runs arbitrary code from its pickle, so robustscope never does. "
            + CONVERT_HINT
        )
    raise CheckpointRefused("a zip archive that is neither TorchScript nor torch.export. "
                            + CONVERT_HINT)


# --- torch.export (.pt2): what ``torch.export.load`` reads, and nothing else -----------------
#
# torch.export.load (torch/export/pt2_archive/_package.py) reads, below the archive's root:
# ``archive_format`` and ``archive_version``; for each ``models/<name>.json`` the graph, the
# example inputs ``data/sample_inputs/<name>.pt`` (a torch.save archive, retried with
# ``weights_only=False`` when the restricted read fails), and the two payload configs, whose
# every entry's ``path_name`` is read as ``data/weights/<path_name>`` or
# ``data/constants/<path_name>``: raw bytes, or a pickle when ``use_pickle`` is set, or (for
# constants) ``torch._C._pickle_load_obj`` for ``custom_obj_*`` and ``pickle.loads`` for
# ``opaque_obj_*``; legacy ``<dir>/<name>.pt`` files are pickles; ``extra/`` and
# ``data/aotinductor/`` (a shared library it loads) are read as well. Only one model, ``model``,
# is accepted, with raw-byte tensors whose ``path_name`` is exactly what torch.export.save
# writes; every other entry is refused by name.

EXPORT_RECORDS = frozenset({
    "archive_format", "archive_version", "version", ".data/version", "byteorder",
    ".data/serialization_id", "models/model.json", "data/sample_inputs/model.pt",
    "data/weights/model_weights_config.json", "data/constants/model_constants_config.json",
})
EXPORT_REQUIRED = ("archive_format", "archive_version", "models/model.json",
                   "data/sample_inputs/model.pt", "data/weights/model_weights_config.json",
                   "data/constants/model_constants_config.json")
_PAYLOADS = (("data/weights/model_weights_config.json", "data/weights/",
              re.compile(r"weight_[0-9]{1,9}")),
             ("data/constants/model_constants_config.json", "data/constants/",
              re.compile(r"tensor_[0-9]{1,9}")))


def _check_export(archive: Archive) -> None:
    missing = [archive.full(n) for n in EXPORT_REQUIRED if n not in archive.records]
    if missing:
        raise refuse_entries("this torch.export archive lacks entries torch.export.save "
                             "writes", missing)
    expected = {n for n in EXPORT_RECORDS if n in archive.records}
    refused: list[str] = []
    for config_name, folder, pattern in _PAYLOADS:
        for fqn, meta in _payload_config(archive, config_name).items():
            path_name = meta.get("path_name") if isinstance(meta, dict) else None
            record = f"{folder}{path_name}"
            if (not isinstance(path_name, str) or not pattern.fullmatch(path_name)
                    or meta.get("use_pickle") is not False
                    or not isinstance(meta.get("tensor_meta"), dict)):
                stored = archive.lookup(record) if isinstance(path_name, str) else None
                refused.append(archive.full(stored or record) if path_name is not None
                               else f"{archive.full(config_name)}:{fqn}")
            elif record not in archive.records:
                missing.append(archive.full(record))
            else:
                expected.add(record)
    if refused:
        raise refuse_entries(
            "this torch.export archive holds payloads robustscope does not load (pickled "
            "tensors, opaque or custom objects: only raw tensor bytes are read)", refused,
            reason="export-payload-refused")
    if missing:
        raise refuse_entries("this torch.export archive's configs name entries it does not "
                             "hold", missing)
    unexpected = [archive.full(n) for n in archive.records if n not in expected]
    if unexpected:
        raise refuse_entries(
            "this torch.export archive holds entries robustscope does not load (only the "
            "graph, raw tensor bytes, the example inputs and torch's metadata files are "
            "accepted; pickled constants, AOTInductor packages, shared libraries and extra "
            "files are not)", unexpected)
    for name, value in (("archive_format", b"pt2"), ("archive_version", b"0")):
        if archive.read(name).strip() != value:
            raise refuse_entries(f"this archive's {name} is not {value.decode()}",
                                 [archive.full(name)])
    sample = "data/sample_inputs/model.pt"
    check_tensor_pickle_archive(archive.read(sample), archive.full(sample))
    _check_export_graph(archive, "models/model.json")


def _payload_config(archive: Archive, name: str) -> dict[str, Any]:
    try:
        config = json.loads(archive.read(name))["config"]
    except (ValueError, KeyError, TypeError) as exc:
        raise refuse_entries("an unreadable torch.export config", [archive.full(name)],
                             reason="export-payload-refused") from exc
    if not isinstance(config, dict):
        raise refuse_entries("an unreadable torch.export config", [archive.full(name)],
                             reason="export-payload-refused")
    return config


# Functions the deserialiser's sympy expressions may call (``torch.utils._sympy.functions``
# and sympy's own arithmetic), and the assumptions a ``Symbol`` may carry. An expression is
# parsed here, never evaluated; torch hands it to ``sympy.sympify``, which evaluates it.
_SYMPY_CALLS = frozenset({
    "Symbol", "Integer", "Float", "Rational", "Max", "Min", "Mod", "FloorDiv", "CeilDiv",
    "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "LShift",
    "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "TruncToFloat",
    "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
    "IsNonOverlappingAndDenseIndicator", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or",
    "Not", "Abs", "floor", "ceiling", "sqrt", "Mul", "Add", "Pow",
})
_SYMPY_ASSUMPTIONS = frozenset({
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite",
    "infinite", "nonzero", "zero", "even", "odd", "rational", "commutative", "extended_real",
})
_SYMPY_NAMES = frozenset({"oo", "zoo", "nan", "true", "false", "True", "False", "pi", "E"})
_SYMBOL = re.compile(r"[a-z]{1,4}[0-9]{1,9}")
_EXPR_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Call,
               ast.Name, ast.Constant, ast.keyword, ast.Load, ast.operator, ast.unaryop,
               ast.boolop, ast.cmpop)


@lru_cache(maxsize=4096)
def _sym_expr_ok(text: str) -> bool:
    if len(text) > 4000:
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return False
    for node in ast.walk(tree):
        if not isinstance(node, _EXPR_NODES) or isinstance(node, ast.MatMult):
            return False
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS):
                return False
            for kw in node.keywords:
                if kw.arg not in _SYMPY_ASSUMPTIONS or not (
                        isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, bool)):
                    return False
        elif isinstance(node, ast.Name):
            if not (node.id in _SYMPY_CALLS or node.id in _SYMPY_NAMES
                    or _SYMBOL.fullmatch(node.id)):
                return False
        elif isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, str):
                if not _SYMBOL.fullmatch(value):
                    return False
            elif not isinstance(value, (int, float)):
                return False
    return True


# The pytree node types a module's input and output specification may name; torch imports the
# module a ``defaultdict`` factory or an enum names, so those are refused.
_TREESPEC_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict",
                             "collections.OrderedDict"})


@lru_cache(maxsize=1024)
def _treespec_ok(text: str) -> bool:
    try:
        protocol, schema = json.loads(text)
    except (ValueError, TypeError):
        return False
    if not isinstance(protocol, int):
        return False
    stack = [schema]
    while stack:
        item = stack.pop()
        if not isinstance(item, dict) or set(item) != {"type", "context", "children_spec"}:
            return False
        if item["type"] not in _TREESPEC_TYPES or not isinstance(item["children_spec"], list):
            return False
        context = item["context"]
        if context is not None:
            try:
                value = json.loads(context) if isinstance(context, str) else object()
            except ValueError:
                return False
            if value is not None and not (isinstance(value, list) and all(
                    isinstance(v, (str, int)) for v in value)):
                return False
        stack.extend(item["children_spec"])
    return True


def _export_target_ok(target: str) -> bool:
    if target in operators.EXPORT_PYTHON:
        return True
    parts = target.split(".")
    return (len(parts) == 5 and parts[:3] == ["torch", "ops", "aten"]
            and (parts[3] in operators.ATEN or parts[3] in operators.CONSTANT_MESSAGE_ONLY)
            and parts[4].isidentifier())


def _check_export_graph(archive: Archive, name: str) -> None:
    """Every node's target on the operator list; every string torch's deserialiser evaluates
    (sympy expressions) or imports by (pytree specifications) of the forms torch writes."""
    try:
        program = json.loads(archive.read(name))
    except ValueError as exc:
        raise refuse_entries("an unreadable torch.export program", [archive.full(name)],
                             reason="export-graph-refused") from exc
    targets: set[str] = set()
    values: set[str] = set()
    stack: list[Any] = [program]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key, value in item.items():
                if isinstance(value, (dict, list)):
                    stack.append(value)
                elif key in ("target", "as_operator") and not (
                        isinstance(value, str) and _export_target_ok(value)):
                    targets.add(str(value))
                elif key == "expr_str" and not (isinstance(value, str) and _sym_expr_ok(value)):
                    values.add(f"{key}: {str(value)[:80]}")
                elif key in ("in_spec", "out_spec") and not (
                        isinstance(value, str) and _treespec_ok(value)):
                    values.add(f"{key}: {str(value)[:80]}")
    if targets:
        raise CheckpointRefused(
            "this torch.export graph calls operators robustscope does not run (only pure "
            f"tensor operators are accepted): {', '.join(sorted(targets)[:10])}",
            reason="export-operator-refused", operators=sorted(targets)[:20],
            entries=[archive.full(name)])
    if values:
        raise CheckpointRefused(
            "this torch.export graph holds expressions or specifications torch would evaluate "
            f"or import by name, of forms torch.export.save does not write: "
            f"{'; '.join(sorted(values)[:5])}", reason="export-graph-refused",
            entries=[archive.full(name)], values=sorted(values)[:20])


# --- TorchScript: what ``torch.jit.load`` reads, and nothing else ------------------------------
#
# torch.jit.load reads ``data.pkl``, ``constants.pkl`` and a traced model's
# ``traced_inputs.pkl`` with TorchScript's unpickler (tensors from ``data/<n>``, ``constants/<n>``
# and ``traced_inputs/<n>``, lists, dicts and objects of the archive's own
# ``__torch__`` classes, whose ``__setstate__`` it runs, or registered custom classes), the
# source of every class it names from ``code/__torch__/...py`` and its ``.debug_pkl`` (a pickle
# of source ranges), and the version. The archive's entries, its pickles' globals and its
# source's calls are each checked against a positive list.

TORCHSCRIPT_RECORD = re.compile(
    r"data\.pkl|constants\.pkl|version|\.data/version|byteorder|\.data/serialization_id"
    r"|data/[0-9]{1,9}|constants/[0-9]{1,9}|traced_inputs\.pkl|traced_inputs/[0-9]{1,9}"
    r"|code/__torch__(/[A-Za-z0-9_]+)*\.py(\.debug_pkl)?")
_JIT_PICKLE = frozenset({"build_intlist", "build_floatlist", "build_boollist",
                         "build_doublelist", "build_tensorlist", "restore_type_tag"})
_TORCH_NAMES = frozenset({"device", "dtype"})  # torch.X in source that is not an operator
_MATH_CONSTANTS = frozenset({"pi", "e", "inf", "nan", "tau"})
_PY_BUILTINS = frozenset(dir(builtins))


def _check_torchscript(archive: Archive) -> None:
    unexpected = [archive.full(n) for n in archive.records if not TORCHSCRIPT_RECORD.fullmatch(n)]
    if unexpected:
        raise refuse_entries(
            "this TorchScript archive holds entries robustscope does not load (only its code, "
            "pickles, tensors and torch's metadata files are accepted)", unexpected)
    for required in ("data.pkl", "constants.pkl"):
        if required not in archive.records:
            raise refuse_entries("this TorchScript archive lacks an entry torch.jit.save "
                                 "writes", [archive.full(required)])
    classes, functions, found = _read_torchscript_code(archive)

    def allowed(module: str, name: str) -> bool:
        if tensor_global(module, name) or (module == "torch.jit._pickle"
                                           and name in _JIT_PICKLE):
            return True
        return classes.get(f"{module}.{name}") is True  # a Module of the archive's own code

    for name in archive.records:
        if name.endswith((".pkl", ".debug_pkl")):
            pickle_globals(archive.read(name), archive.full(name), allowed)
    known = {name for name, is_module in classes.items() if is_module} | functions
    found -= {d for d in found if d in known and ".classes." not in d}
    if found:
        raise CheckpointRefused(
            "this TorchScript model calls operators robustscope does not run (only pure "
            "tensor operators are accepted; no file, print, process, library or custom-class "
            f"calls): {', '.join(sorted(found)[:10])}",
            reason="torchscript-operator-refused", operators=sorted(found)[:20])


def _read_torchscript_code(archive: Archive) -> tuple[dict[str, bool], set[str], set[str]]:
    """The archive's classes (qualified name -> whether it is a Module), its functions, and
    every call or reference its source makes that is not on the operator list."""
    classes: dict[str, bool] = {}
    functions: set[str] = set()
    found: set[str] = set()
    for name in archive.records:
        if not name.endswith(".py"):
            continue
        qualifier = name[len("code/"):-len(".py")].replace("/", ".")
        try:
            tree = ast.parse(archive.read(name).decode("utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError) as exc:
            raise refuse_entries("unreadable TorchScript code", [archive.full(name)],
                                 reason="torchscript-unreadable") from exc
        for top in tree.body:
            if isinstance(top, ast.ClassDef):
                classes[f"{qualifier}.{top.name}"] = [_call_name(b) for b in top.bases] == [
                    "Module"]
            elif isinstance(top, ast.FunctionDef):
                functions.add(f"{qualifier}.{top.name}")
        found |= _source_refusals(tree)
    return classes, functions, found


def _source_refusals(tree: ast.Module) -> set[str]:
    found: set[str] = set()
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    # Local names (``_0 = __torch__...relu`` then ``_0(x)``): their values are checked where
    # they are bound.
    local = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
             and isinstance(n.ctx, ast.Store)} | {a.arg for a in ast.walk(tree)
                                                   if isinstance(a, ast.arg)}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "__setstate__":
            found.add("__setstate__ (runs while the archive is loaded)")
        elif isinstance(node, ast.Attribute) and id(node) not in inner:
            dotted = _call_name(node)
            if not _reference_ok(dotted):
                found.add(dotted)
        elif (isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)
              and node.id in _PY_BUILTINS and node.id not in operators.SCRIPT_BUILTINS
              and node.id != "getattr" and node.id not in local):
            found.add(node.id)  # a Python builtin TorchScript would run (print, ...)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            fn = node.func.id
            if fn == "getattr":
                args = node.args
                if not (len(args) == 2 and isinstance(args[0], ast.Name)
                        and args[0].id == "self" and isinstance(args[1], ast.Constant)
                        and isinstance(args[1].value, str)):
                    found.add("getattr")
            elif fn not in operators.SCRIPT_BUILTINS and fn not in local:
                found.add(fn)
    return found


def _reference_ok(dotted: str) -> bool:
    parts = dotted.split(".")
    root = parts[0]
    if root == "torch":
        return len(parts) == 2 and (parts[1] in operators.ATEN or parts[1] in _TORCH_NAMES
                                    or parts[1] in operators.CONSTANT_MESSAGE_ONLY)
    if root == "ops":
        return len(parts) == 3 and (parts[1] == "aten" and parts[2] in operators.ATEN
                                    or parts[1] == "prim" and parts[2] in operators.PRIM)
    if root == "math":
        return len(parts) == 2 and (parts[1] in operators.ATEN or parts[1] in _MATH_CONSTANTS)
    if root == "__torch__":
        return False  # accepted by the caller if the archive's own code defines it
    return True  # a method or attribute of a local value (``self``, a submodule, a list)


def _call_name(node: ast.expr) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    else:
        parts.append("<expr>")
    return ".".join(reversed(parts))


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
