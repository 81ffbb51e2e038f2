"""Recognise a checkpoint's format from its bytes, without torch and without unpickling.

- safetensors: an 8-byte little-endian header length, then a JSON header.
- TorchScript (``torch.jit.save``): a zip with ``code/`` sources and ``constants.pkl``.
- torch.export (``torch.export.save``): a zip with an ``archive_format`` entry.
- ``torch.save`` output (a zip with ``data.pkl`` and no code, or a bare pickle stream) is a
  pickle: loading it runs arbitrary code, so it is refused with a way to convert.
"""

from __future__ import annotations

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
                _check_export_payloads(zf, names)
                return Sniffed("torch_export")
            if any("/code/" in n for n in names) and any(
                    n.endswith("constants.pkl") for n in names):
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
