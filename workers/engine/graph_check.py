"""Every operator of a loaded TorchScript or torch.export graph, checked against a positive list.

The loaders call these right after loading and before any forward pass. A graph may call only
the pure tensor operators of ``contract/operators.py``; everything else (file, print, warn or
raise with data, library loading, custom classes, objects that are not the module's own
submodules) is refused with a ``CheckpointError`` that names the operator and where it is.

- TorchScript: each method of each submodule, with every function and method it calls inlined,
  walked into every block (``prim::If``/``prim::Loop`` bodies). ``prim::GetAttr`` may read only
  the module's own submodules' attributes; no value may be an object of another class (script
  or custom classes); a ``prim::RaiseException`` or ``aten::warn`` message may be built only
  from constants and tensor shapes, never from a tensor's values.
- torch.export: every node of the program's graph and of its subgraphs; calls only to
  ``torch.ops.aten`` operators on the list and the symbolic-shape arithmetic torch emits.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from contract import operators
from workers.engine.types import CheckpointError


def check_torchscript(module: torch.jit.ScriptModule) -> None:
    """Refuse a scripted module whose methods call anything off the positive list."""
    own = {_type_name(m) for m in module.modules()}
    # Deepest submodules first, so that a refusal names the submodule whose method calls.
    for path, sub in reversed(list(module.named_modules())):
        for name in sub._c._method_names():
            where = f"{path or '<model>'}.{name}"
            graph = sub._c._get_method(name).inlined_graph
            _check_block(graph, own, where)


def _type_name(module: torch.nn.Module) -> str:
    c = getattr(module, "_c", None)
    return str(c._type().qualified_name()) if c is not None else ""


def _check_block(block: Any, own: set[str], where: str) -> None:
    for node in block.nodes():
        _check_node(node, own, where)
        for inner in node.blocks():
            _check_block(inner, own, where)


def _refuse(op: str, where: str, why: str = "") -> CheckpointError:
    extra = f" ({why})" if why else ""
    return CheckpointError(
        f"the model calls an operator robustscope does not run: {op} in {where}{extra}; a "
        "model may use only pure tensor operators (no files, printing, warnings or errors "
        "with data, libraries or custom classes)")


def _check_node(node: Any, own: set[str], where: str) -> None:
    kind: str = node.kind()
    ns, _, name = kind.partition("::")
    for out in node.outputs():
        type_name = _class_of(out.type())
        if type_name and type_name not in own:
            raise _refuse(kind, where, f"a value of class {type_name}")
    if ns == "aten":
        if name in operators.CONSTANT_MESSAGE_ONLY:
            _check_message(node, list(node.inputs())[0 if name == "warn" else -1], where)
            return
        if name not in operators.ATEN:
            raise _refuse(kind, where)
        return
    if ns != "prim" or name not in operators.PRIM:
        raise _refuse(kind, where)
    if name == "GetAttr":
        owner = _class_of(node.input().type())
        if owner not in own:
            raise _refuse(kind, where, f"an attribute of {owner or node.input().type()}")
    elif name == "RaiseException":
        _check_message(node, list(node.inputs())[0], where)


def _check_message(raise_node: Any, message: Any, where: str) -> None:
    """A raise or a warning may say what shape it expected, never what a tensor holds."""
    if not _data_free(message, set()):
        raise _refuse(raise_node.kind(), where, "its message holds data computed at run time; "
                      "only constants and shapes may be formatted into it")


# Operators that read a tensor's metadata only, never its values.
_SHAPE_QUERIES = frozenset({
    "aten::size", "aten::dim", "aten::numel", "aten::sym_size", "prim::shape", "prim::dtype",
    "prim::device", "aten::is_floating_point", "prim::requires_grad", "aten::len",
})


def _data_free(value: Any, seen: set[int]) -> bool:
    """Whether ``value`` derives only from constants, the module's own scalar attributes and
    tensor shapes: walked back through every operator that produced it."""
    node = value.node()
    if value.unique() in seen:
        return True
    seen.add(value.unique())
    kind = node.kind()
    if kind == "prim::Constant" or kind in _SHAPE_QUERIES:
        return True
    if kind == "prim::GetAttr":
        return not _holds_tensor(value.type())
    if kind in ("prim::If", "prim::Loop"):
        # The value each branch (or the loop's body and its initial value) gives it.
        index = list(node.outputs()).index(value)
        skip = 1 if kind == "prim::Loop" else 0
        sources = [list(b.outputs())[index + skip] for b in node.blocks()]
        if kind == "prim::Loop":
            sources.append(list(node.inputs())[index + 2])
        return all(_data_free(v, seen) for v in sources)
    if kind == "prim::Param":
        return bool(_class_of(value.type()))  # only ``self``: block parameters carry data
    inputs = list(node.inputs())
    if any(_holds_tensor(v.type()) for v in inputs) or len(seen) > 200:
        return False
    return all(_data_free(v, seen) for v in inputs)


def _holds_tensor(t: Any) -> bool:
    if isinstance(t, torch._C.TensorType):
        return True
    return any(_holds_tensor(c) for c in t.containedTypes())


def _class_of(t: Any) -> str:
    """The qualified class name of a class-typed value (modules, script or custom classes)."""
    if isinstance(t, (torch._C.ClassType, torch._C.InterfaceType)):
        return str(t)
    for c in t.containedTypes():
        name = _class_of(c)
        if name:
            return name
    return ""


def check_export(program: torch.export.ExportedProgram) -> None:
    """Refuse an exported program whose graphs call anything off the positive list."""
    for path, gm in program.graph_module.named_modules():
        if not isinstance(gm, torch.fx.GraphModule):
            raise CheckpointError(f"the exported program holds a module that is not a graph: "
                                  f"{path} ({type(gm).__name__})")
        for node in gm.graph.nodes:
            where = f"{path or '<graph>'}:{node.name}"
            if node.op in ("placeholder", "output"):
                continue
            if node.op == "get_attr":
                value = _attribute(program.graph_module, str(node.target))
                if not isinstance(value, (torch.Tensor, torch.fx.GraphModule)):
                    raise _refuse(f"get_attr {node.target}", where,
                                  f"a {type(value).__name__}, not a tensor")
                continue
            if node.op != "call_function":
                raise _refuse(f"{node.op} {node.target}", where)
            _check_target(node, where)


def _attribute(root: torch.nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _check_target(node: Any, where: str) -> None:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        ns, _, name = target._schema.name.partition("::")
        label = f"torch.ops.{ns}.{name}.{target._overloadname}"
        if ns != "aten":
            raise _refuse(label, where)
        if name in operators.CONSTANT_MESSAGE_ONLY:
            if not all(isinstance(a, str) for a in node.args[1:]):
                raise _refuse(label, where, "its message is computed at run time")
            return
        if name not in operators.ATEN:
            raise _refuse(label, where)
        return
    module = getattr(target, "__module__", None) or ""
    label = f"{module}.{getattr(target, '__name__', repr(target))}"
    if label not in operators.EXPORT_PYTHON:
        raise _refuse(label, where)


def check_torchscript_archive(path: Path) -> None:
    """Before torch.jit.load, which runs a class's ``__setstate__`` and constructs custom
    (``torch.classes``) objects while it unpickles: refuse archives that hold either."""
    import pickletools

    try:
        reader = torch._C.PyTorchFileReader(str(path))
        names = list(reader.get_all_records())
    except RuntimeError as exc:
        raise CheckpointError(f"the TorchScript archive cannot be read: {exc}") from exc
    found: list[str] = []
    for name in names:
        if name.startswith("code/") and name.endswith(".py"):
            if b"__setstate__" in bytes(reader.get_record(name)):
                found.append(f"__setstate__ in {name}")
        elif name.endswith(".pkl"):
            try:
                for op, arg, _ in pickletools.genops(bytes(reader.get_record(name))):
                    if op.name in ("GLOBAL", "STACK_GLOBAL") and (
                            op.name == "STACK_GLOBAL" or ".classes" in str(arg)):
                        found.append(f"{str(arg or op.name).replace(' ', '.')} in {name}")
            except (ValueError, TypeError) as exc:
                raise CheckpointError(f"an unreadable pickle in the archive: {name}") from exc
    if found:
        raise CheckpointError("the TorchScript archive holds code that runs while it is "
                              f"loaded: {', '.join(sorted(set(found))[:5])}")


_PAYLOAD_NAME = {"data/weights/": re.compile(r"weight_[0-9]+"),
                 "data/constants/": re.compile(r"tensor_[0-9]+")}


def check_export_archive(path: Path) -> None:
    """Before torch.export.load: read the archive with torch's own reader and refuse every
    payload it would unpickle or load as a library (the API refuses these at upload; this
    holds for an archive that reached the engine another way)."""
    try:
        reader = torch._C.PyTorchFileReader(str(path))
        names = list(reader.get_all_records())
    except RuntimeError as exc:
        raise CheckpointError(f"the torch.export archive cannot be read: {exc}") from exc
    refused = [n for n in names if n.startswith(("data/aotinductor/", "extra/"))
               or n.endswith((".so", ".pt")) and not n.startswith("data/sample_inputs/")]
    for model in (n[len("models/"):-len(".json")] for n in names
                  if n.startswith("models/") and n.endswith(".json")):
        for folder, pattern in _PAYLOAD_NAME.items():
            kind = "weights" if folder == "data/weights/" else "constants"
            config = f"{folder}{model}_{kind}_config.json"
            if config not in names:
                continue
            try:
                entries = json.loads(bytes(reader.get_record(config)))["config"]
            except (ValueError, KeyError, TypeError, RuntimeError) as exc:
                raise CheckpointError(f"unreadable torch.export config {config}") from exc
            for meta in entries.values() if isinstance(entries, dict) else [None]:
                name = meta.get("path_name") if isinstance(meta, dict) else None
                if (not isinstance(meta, dict) or not isinstance(name, str)
                        or not pattern.fullmatch(name) or meta.get("use_pickle") is not False):
                    refused.append(f"{folder}{name}")
    if refused:
        raise CheckpointError(
            "the torch.export archive holds payloads robustscope does not load (pickled or "
            f"opaque objects, libraries): {', '.join(sorted(refused)[:5])}")


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside reads with torch's restricted unpickler, even where the
    caller (torch.export's fallback for example inputs) asks for ``weights_only=False``."""
    saved = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD",
                                            "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
