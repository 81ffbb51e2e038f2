"""Model loading: the architecture registry, the safe loaders, and the normalising wrapper.

Three checkpoint formats are accepted (ARCHITECTURE.md): a safetensors state dict plus an
architecture name, a TorchScript archive, and a torch.export archive. None of them runs
Python pickles: safetensors is a JSON header plus raw bytes, TorchScript archives are read
by TorchScript's own restricted unpickler, and torch.export archives are read with torch's
``weights_only`` default (torch >= 2.6); the archive entries torch.export would still unpickle
(opaque constants) are refused at upload, and every load runs in the worker's jail.
"""

from __future__ import annotations

import enum
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from workers.engine import nets
from workers.engine.types import CheckpointError


class Format(enum.StrEnum):
    SAFETENSORS = "safetensors"
    TORCHSCRIPT = "torchscript"
    EXPORT = "torch_export"


Builder = Callable[[int, int], nn.Module]

ENGINE_ARCHITECTURES: dict[str, Builder] = {
    "small_cnn": nets.small_cnn,
    "resnet18_cifar": nets.resnet18_cifar,
    "preact_resnet18": nets.preact_resnet18,
    "wide_resnet28_10": nets.wide_resnet28_10,
}

# torchvision classifiers accepted by name (ImageNet-style, 3 input channels).
TORCHVISION_ARCHITECTURES: tuple[str, ...] = (
    "resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2", "resnext50_32x4d",
    "vgg11_bn", "vgg16_bn", "densenet121", "mobilenet_v2", "mobilenet_v3_small",
    "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny",
    "shufflenet_v2_x1_0", "vit_b_16", "swin_t",
)


def architectures() -> list[str]:
    return sorted([*ENGINE_ARCHITECTURES, *TORCHVISION_ARCHITECTURES])


def build(architecture: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """An untrained network of the named architecture."""
    if architecture in ENGINE_ARCHITECTURES:
        return ENGINE_ARCHITECTURES[architecture](num_classes, in_channels)
    if architecture in TORCHVISION_ARCHITECTURES:
        if in_channels != 3:
            raise CheckpointError(f"{architecture} takes 3 input channels, not {in_channels}")
        import torchvision

        model: nn.Module = torchvision.models.get_model(
            architecture, weights=None, num_classes=num_classes
        )
        return model
    raise CheckpointError(
        f"unknown architecture {architecture!r}; known: {', '.join(architectures())}"
    )


def state_dict_shapes(
    architecture: str, num_classes: int, in_channels: int
) -> dict[str, list[int]]:
    """Parameter and buffer shapes of an architecture, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = build(architecture, num_classes, in_channels)
    return {k: list(v.shape) for k, v in model.state_dict().items()}


@dataclass(frozen=True)
class ModelSpec:
    """What the service knows about an uploaded model (its metadata JSON)."""

    format: Format
    num_classes: int
    input_shape: tuple[int, int, int]
    architecture: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    class_names: list[str] = field(default_factory=list)

    @classmethod
    def from_metadata(cls, fmt: str, metadata: dict[str, Any]) -> ModelSpec:
        mean, std = metadata.get("mean"), metadata.get("std")
        return cls(
            format=Format(fmt),
            num_classes=int(metadata["num_classes"]),
            input_shape=tuple(int(v) for v in metadata["input_shape"]),  # type: ignore[arg-type]
            architecture=metadata.get("architecture"),
            mean=tuple(mean) if mean is not None else None,
            std=tuple(std) if std is not None else None,
            class_names=list(metadata.get("class_names") or []),
        )


class Normalized(nn.Module):
    """Takes pixels in [0, 1] and normalises inside the graph, so attacks work in pixel space."""

    mean: Tensor
    std: Tensor

    def __init__(self, model: nn.Module, mean: Sequence[float] | None,
                 std: Sequence[float] | None, channels: int, fixed_mode: bool = False) -> None:
        super().__init__()
        self.model = model
        m = torch.tensor(mean if mean is not None else [0.0] * channels, dtype=torch.float32)
        s = torch.tensor(std if std is not None else [1.0] * channels, dtype=torch.float32)
        if m.numel() != channels or s.numel() != channels:
            raise CheckpointError(f"mean and std need {channels} values, one per channel")
        if bool((s <= 0).any()):
            raise CheckpointError("std values must be positive")
        self.register_buffer("mean", m.view(1, -1, 1, 1))
        self.register_buffer("std", s.view(1, -1, 1, 1))
        self.identity = mean is None and std is None
        # A torch.export graph is traced in one mode and refuses .train()/.eval().
        self.fixed_mode = fixed_mode

    def train(self, mode: bool = True) -> Normalized:
        self.training = mode
        if not self.fixed_mode:
            self.model.train(mode)
        return self

    def forward(self, x: Tensor) -> Tensor:
        if not self.identity:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        out: Tensor = self.model(x)
        return out


def load(path: Path, spec: ModelSpec, device: torch.device | str = "cpu") -> Normalized:
    """Load a checkpoint into an eval-mode, [0,1]-input model on ``device``; checks its output."""
    device = torch.device(device)
    if spec.format is Format.SAFETENSORS:
        inner = _load_safetensors(path, spec)
    elif spec.format is Format.TORCHSCRIPT:
        inner = _load_torchscript(path)
    else:
        inner = _load_export(path)
    model = Normalized(inner, spec.mean, spec.std, spec.input_shape[0],
                       fixed_mode=spec.format is Format.EXPORT).to(device).eval()
    _check_output(model, spec, device)
    return model


def _load_safetensors(path: Path, spec: ModelSpec) -> nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not spec.architecture:
        raise CheckpointError("a safetensors checkpoint needs an 'architecture' in its metadata")
    model = build(spec.architecture, spec.num_classes, spec.input_shape[0])
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"the safetensors file cannot be read: {exc}") from exc
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: checkpoint {list(state[k].shape)}, {spec.architecture} {list(v.shape)}"
        for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(_mismatch(spec.architecture, missing, unexpected, wrong))
    model.load_state_dict(state)
    return model


def _mismatch(arch: str, missing: list[str], unexpected: list[str], wrong: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:5])})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:5])})")
    if wrong:
        parts.append(f"{len(wrong)} shape mismatches (e.g. {'; '.join(wrong[:5])})")
    return f"the checkpoint does not fit the architecture {arch!r}: " + "; ".join(parts)


def _load_torchscript(path: Path) -> nn.Module:
    from workers.engine import graph_check

    graph_check.check_torchscript_archive(path)
    try:
        module: torch.jit.ScriptModule = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"the TorchScript archive cannot be loaded: {exc}") from exc
    graph_check.check_torchscript(module)  # before any forward pass
    return module


def _load_export(path: Path) -> nn.Module:
    try:
        with zipfile.ZipFile(path) as zf:
            if not any(n.endswith("archive_format") for n in zf.namelist()):
                raise CheckpointError("not a torch.export archive (no archive_format entry)")
    except zipfile.BadZipFile as exc:
        raise CheckpointError("a torch.export archive is a zip file; this one is not") from exc
    from workers.engine import graph_check

    graph_check.check_export_archive(path)
    try:
        # Every torch.load inside reads with torch's restricted unpickler, even the example
        # inputs torch.export would retry with weights_only=False; what it would still unpickle
        # (opaque or custom constants) is refused at upload, and the load runs in the jail.
        with graph_check.weights_only_loads():
            program = torch.export.load(str(path))
    except Exception as exc:  # torch.export raises many unrelated types on a bad archive
        raise CheckpointError(f"the torch.export archive cannot be loaded: {exc}") from exc
    graph_check.check_export(program)  # before any forward pass
    module: nn.Module = program.module()
    return module


def export_hint(input_shape: Sequence[int]) -> str:
    """The export call that gives a graph for any batch size (an example batch of 2: torch
    specialises a dimension of size 1 and refuses to make it dynamic)."""
    dims = ", ".join(str(int(d)) for d in input_shape)
    return (f"torch.export.save(torch.export.export(model.eval(), (torch.rand(2, {dims}),), "
            f"dynamic_shapes=({{0: torch.export.Dim('batch')}},)), 'model.pt2')")


class FixedBatch(nn.Module):
    """A torch.export graph traced with a static batch size, run on batches of any size: in
    chunks of that size, the last one padded with copies of its last row whose logits are
    dropped. The graph's examples are independent (an exported graph runs in eval mode), so
    padding changes no other row's logits or gradients."""

    def __init__(self, model: nn.Module, batch: int, num_classes: int) -> None:
        super().__init__()
        self.model = model
        self.batch = batch
        self.num_classes = num_classes

    def train(self, mode: bool = True) -> FixedBatch:
        self.training = mode  # a torch.export graph refuses .train()/.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        n, b = x.shape[0], self.batch
        if n == b:
            out: Tensor = self.model(x)
            return out
        if n == 0:
            return x.new_zeros(0, self.num_classes)
        chunks = []
        for start in range(0, n, b):
            chunk = x[start:start + b]
            k = chunk.shape[0]
            if k < b:
                chunk = torch.cat([chunk, chunk[-1:].expand(b - k, *chunk.shape[1:])])
            chunks.append(self.model(chunk)[:k])
        return torch.cat(chunks)


def static_batch(module: nn.Module) -> int | None:
    """The batch size a torch.export graph was traced with, when it is static (its first
    input's first dimension is a plain int), else None."""
    graph = getattr(module, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return None
    for node in graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if isinstance(val, Tensor) and val.dim() >= 1 and isinstance(val.shape[0], int):
                return int(val.shape[0])
            return None
    return None


def _check_output(model: Normalized, spec: ModelSpec, device: torch.device) -> None:
    """Runs the model once on 3 inputs (an odd batch catches a torch.export graph traced with
    a fixed batch size): such a graph is run in chunks of its own batch (:class:`FixedBatch`);
    any other failure, or logits of the wrong shape, refuses the model."""
    probe = torch.rand(3, *spec.input_shape, generator=torch.Generator().manual_seed(0))
    probe = probe.to(device)
    try:
        with torch.no_grad():
            out = model(probe)
    except Exception as exc:  # the user's graph may raise anything on a wrong input shape
        batch = static_batch(model.model) if spec.format is Format.EXPORT else None
        if batch is None or batch == probe.shape[0]:
            raise _failed(spec, exc) from exc
        model.model = FixedBatch(model.model, batch, spec.num_classes)
        try:
            with torch.no_grad():
                out = model(probe)
        except Exception as exc2:  # the user's graph, on a batch of its own size
            raise _failed(spec, exc2) from exc2
    if not isinstance(out, Tensor) or out.shape != (3, spec.num_classes):
        shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise CheckpointError(
            f"the model must return logits of shape [3, {spec.num_classes}] for 3 inputs; it "
            f"returned {shape}"
        )


def _failed(spec: ModelSpec, exc: Exception) -> CheckpointError:
    hint = ""
    if spec.format is Format.EXPORT:
        hint = f" (an export that runs on any batch: {export_hint(spec.input_shape)})"
    return CheckpointError(
        f"the model failed on an input of shape [3, {', '.join(map(str, spec.input_shape))}]"
        f"{hint}: {exc}"
    )


def shape_table() -> dict[str, dict[str, list[int | str]]]:
    """Every architecture's state-dict shapes with ``"K"`` for num_classes, ``"C"`` for channels.

    The API checks a safetensors header against this table without importing torch; it is
    written to ``service/models/architectures.json`` by ``python -m workers.engine.models``.
    """
    table: dict[str, dict[str, list[int | str]]] = {}
    for arch in architectures():
        channels = (3, 1) if arch in ENGINE_ARCHITECTURES else (3, 3)
        a = state_dict_shapes(arch, 7, channels[0])
        b = state_dict_shapes(arch, 11, channels[1])
        table[arch] = {
            key: [_symbol(x, y) for x, y in zip(a[key], b[key], strict=True)] for key in a
        }
    return table


def _symbol(a: int, b: int) -> int | str:
    if a == b:
        return a
    if (a, b) == (7, 11):
        return "K"
    if (a, b) == (3, 1):
        return "C"
    raise ValueError(f"dimension varies in an unexpected way: {a} vs {b}")


if __name__ == "__main__":
    import json
    import sys

    json.dump(shape_table(), sys.stdout, separators=(",", ":"), sort_keys=True)


# ImageNet-1k class indices of each ImageNet-9 superclass, in ImageNet-9's class order (dog,
# bird, vehicle, reptile, carnivore, insect, instrument, primate, fish), as the backgrounds
# challenge's ``in_to_in9.json`` (Xiao et al., 2020) assigns them; the other 578 ImageNet
# classes belong to none.
IMAGENET9_RANGES: tuple[tuple[tuple[int, int], ...], ...] = (
    ((151, 170), (173, 268)),
    ((7, 24), (87, 100), (127, 146)),
    ((407, 408), (428, 428), (436, 436), (444, 444), (468, 468), (511, 511), (547, 547),
     (555, 555), (561, 561), (565, 565), (569, 569), (573, 573), (586, 586), (603, 603),
     (609, 609), (612, 612), (627, 627), (656, 656), (661, 661), (665, 665), (670, 671),
     (675, 675), (690, 690), (705, 705), (717, 717), (734, 734), (751, 751), (757, 757),
     (791, 791), (802, 803), (817, 817), (820, 820), (829, 829), (847, 847), (864, 864),
     (866, 867), (870, 870), (880, 880)),
    ((33, 68),),
    ((269, 280), (286, 299), (356, 362), (387, 388)),
    ((300, 326),),
    ((401, 402), (420, 420), (432, 432), (486, 486), (494, 494), (513, 513), (541, 541),
     (546, 546), (558, 558), (566, 566), (577, 577), (579, 579), (593, 594), (641, 642),
     (683, 684), (687, 687), (699, 699), (776, 776), (822, 822), (875, 875), (881, 881),
     (889, 889)),
    ((365, 384),),
    ((0, 6), (389, 397)),
)


def imagenet9_map() -> list[int]:
    """For each of the 1000 ImageNet classes, its ImageNet-9 superclass, or -1."""
    out = [-1] * 1000
    for target, ranges in enumerate(IMAGENET9_RANGES):
        for lo, hi in ranges:
            for i in range(lo, hi + 1):
                out[i] = target
    return out


NAMED_CLASS_MAPS = {"imagenet9": imagenet9_map}


def resolve_class_map(class_map: str | Sequence[int]) -> list[int]:
    """A named map (``imagenet9``) or an explicit one: model class -> dataset class or -1."""
    if isinstance(class_map, str):
        try:
            return NAMED_CLASS_MAPS[class_map]()
        except KeyError:
            raise CheckpointError(f"unknown class map {class_map!r}; known: "
                                  f"{', '.join(sorted(NAMED_CLASS_MAPS))}") from None
    return [int(c) for c in class_map]


class ClassMapped(nn.Module):
    """Turns a model's logits over its own classes into logits over the dataset's classes.

    The logit of dataset class ``c`` is the largest logit among the model classes mapped to
    ``c``, so the top-1 prediction is the superclass of the best mapped model class, and the
    gradient reaches that class's logit (attacks stay white-box). Model classes mapped to -1
    are ignored. The backgrounds challenge instead takes the model's top-1 over all classes and
    counts an unmapped one as wrong; here the prediction is restricted to the mapped classes,
    which can only score the same or higher.
    """

    index: Tensor

    def __init__(self, model: nn.Module, class_map: Sequence[int], num_classes: int) -> None:
        super().__init__()
        cmap = [int(c) for c in class_map]
        if any(c < -1 or c >= num_classes for c in cmap):
            raise CheckpointError(f"a class map entry is outside -1..{num_classes - 1}")
        members = [[i for i, c in enumerate(cmap) if c == t] for t in range(num_classes)]
        if any(not m for m in members):
            missing = [t for t, m in enumerate(members) if not m]
            raise CheckpointError(f"no model class is mapped to dataset class(es) {missing}")
        width = max(len(m) for m in members)
        # Pad each class's member list by repeating its first member: max is unchanged.
        padded = [m + [m[0]] * (width - len(m)) for m in members]
        self.model = model
        self.register_buffer("index", torch.tensor(padded, dtype=torch.long))

    def train(self, mode: bool = True) -> ClassMapped:
        self.training = mode
        self.model.train(mode)
        return self

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.model(x)  # its width was checked against the map at load
        return logits[:, self.index].amax(dim=2)
