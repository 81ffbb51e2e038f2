"""The per-epoch training checkpoint, in one safetensors file (never a pickle).

Tensors: the model's state dict under ``model.``, the optimiser's per-parameter tensors
under ``optim.<index>.<name>``. Everything else (epoch, history, the optimiser's param
groups and scalar state, the spec's fingerprint) is JSON in the safetensors header's
metadata. The file is written beside its final name and renamed over it, so a worker killed
mid-write leaves the previous epoch's checkpoint intact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

KEY = "robustscope.training"


@dataclass
class Saved:
    epoch: int  # epochs finished
    history: list[dict[str, Any]]


def save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
         history: list[dict[str, Any]], fingerprint: str) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {
        f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in
        model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in opt["state"].items():
        for name, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(index), {})[name] = value
    meta = {"epoch": epoch, "history": history, "fingerprint": fingerprint,
            "param_groups": opt["param_groups"], "scalars": scalars}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={KEY: json.dumps(meta)})
    os.replace(tmp, path)


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
         fingerprint: str) -> Saved | None:
    """Restore ``model`` and ``optimizer`` from ``path``; None when there is no checkpoint of
    this spec (a missing file, or one written for another spec)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(KEY, "{}"))
        if meta.get("fingerprint") != fingerprint:
            return None
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items()
                           if k.startswith("model.")})
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return Saved(epoch=int(meta["epoch"]), history=list(meta["history"]))
