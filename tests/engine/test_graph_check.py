"""The engine's operator allow-list: hostile TorchScript graphs refused at load, before any
forward pass, naming the operator; the shipped architectures (scripted and exported) and
typical hand-written CNNs still load and run."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contract import operators
from workers.engine import graph_check
from workers.engine.models import CheckpointError, Format, ModelSpec, build, load

warnings.filterwarnings("ignore", category=FutureWarning)


def _spec(fmt: Format, num_classes: int = 4, shape: tuple[int, int, int] = (3, 32, 32)) -> Any:
    return ModelSpec(format=fmt, num_classes=num_classes, input_shape=shape)


def _script_file(model: nn.Module, tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    return path


def _refused(model: nn.Module, tmp_path: Path, marker: Path | None = None) -> str:
    with pytest.raises(CheckpointError) as info:
        load(_script_file(model, tmp_path), _spec(Format.TORCHSCRIPT))
    if marker is not None:
        assert not marker.exists()  # refused before its first forward pass
    return str(info.value)


# --- hostile graphs --------------------------------------------------------------------------


class SavesViaGetattr(nn.Module):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        torch.save(x, self.path)
        return self.fc(x.mean((2, 3)))


class ReadsViaGetattr(nn.Module):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        data = torch.from_file(self.path, False, 4, dtype=torch.uint8)
        return self.fc(x.mean((2, 3))) + data.float().sum()


class SavesViaOps(nn.Module):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        torch.ops.aten.save(x, self.path)
        return self.fc(x.mean((2, 3)))


class WarnsData(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        warnings.warn(f'{{"t":"done","v":{float(x.sum())}}}', stacklevel=2)
        return self.fc(x.mean((2, 3)))


class Prints(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        print('{"t":"entry","value":1.0}')  # noqa: T201
        return self.fc(x.mean((2, 3)))


class RaisesData(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        if bool(x.sum() > -1.0):
            raise RuntimeError("leak:" + str(float(x.sum())))
        return self.fc(x.mean((2, 3)))


@torch.jit.script
class Helper:
    def __init__(self, path: str) -> None:
        self.path = path

    def run(self, x: Tensor) -> Tensor:
        return x * 2.0


class CallsClass(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(Helper("/tmp/x").run(x).mean((2, 3)))


def test_torch_save_through_getattr_is_refused_before_it_runs(tmp_path: Path) -> None:
    marker = tmp_path / "written"
    message = _refused(SavesViaGetattr(str(marker)), tmp_path, marker)
    assert "aten::save in <model>.forward" in message


def test_torch_from_file_through_getattr_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"abcd")
    assert "aten::from_file in <model>.forward" in _refused(ReadsViaGetattr(str(secret)),
                                                            tmp_path)


def test_torch_ops_aten_save_through_getattr_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "written"
    assert "aten::save in <model>.forward" in _refused(SavesViaOps(str(marker)), tmp_path,
                                                       marker)


def test_a_warning_with_data_is_refused(tmp_path: Path) -> None:
    message = _refused(WarnsData(), tmp_path)
    assert "aten::warn in <model>.forward (its message holds data" in message


def test_print_is_refused(tmp_path: Path) -> None:
    assert "prim::Print in <model>.forward" in _refused(Prints(), tmp_path)


def test_a_raise_with_data_is_refused(tmp_path: Path) -> None:
    message = _refused(RaisesData(), tmp_path)
    assert "prim::RaiseException in <model>.forward (its message holds data" in message


def test_a_call_into_a_torch_class_is_refused(tmp_path: Path) -> None:
    message = _refused(CallsClass(), tmp_path)
    assert "in <model>.forward (a value of class __torch__." in message
    assert "Helper" in message


def test_a_submodule_is_named_where_it_calls(tmp_path: Path) -> None:
    marker = tmp_path / "written"
    outer = nn.Sequential(nn.Identity(), SavesViaGetattr(str(marker)))
    assert "aten::save in 1.forward" in _refused(outer, tmp_path, marker)


# --- what still loads --------------------------------------------------------------------------


class HandWritten(nn.Module):
    """The usual idioms: view(x.size(0), -1), flatten, dropout, batchnorm, pools, activations,
    softmax, an assertion with a constant message, a shape check that formats the shape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected 4 dimensions, got {x.dim()}")
        assert x.size(1) == 3, "three channels"
        h = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        h = F.avg_pool2d(F.gelu(self.conv2(h)), 2) + F.silu(h).mean()
        h = F.adaptive_avg_pool2d(torch.sigmoid(h) * torch.tanh(h), 4)
        h = self.drop(h.view(h.size(0), -1))
        logits = self.fc(torch.flatten(h, 1))
        return F.log_softmax(logits, dim=1) + F.softmax(logits, dim=-1)


def test_a_hand_written_cnn_loads_and_runs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = load(_script_file(HandWritten().eval(), tmp_path), _spec(Format.TORCHSCRIPT))
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 4)


def test_a_constant_warning_is_accepted(tmp_path: Path) -> None:
    class WarnsConstant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x: Tensor) -> Tensor:
            warnings.warn("a fixed text", stacklevel=2)
            return self.fc(x.mean((2, 3)))

    scripted = torch.jit.load(io.BytesIO(_script_file(WarnsConstant(), tmp_path).read_bytes()))
    graph_check.check_torchscript(scripted)


SCRIPTED = ["small_cnn", "resnet18_cifar", "preact_resnet18", "wide_resnet28_10", "resnet18",
            "mobilenet_v2", "efficientnet_b0", "vit_b_16", "densenet121", "swin_t"]


@pytest.mark.slow
@pytest.mark.parametrize("architecture", SCRIPTED)
def test_shipped_architectures_pass_when_scripted(architecture: str, tmp_path: Path) -> None:
    """Checked on the loaded archive; the forward pass is run for the small ones only."""
    model = build(architecture, 10, 3).eval()
    path = _script_file(model, tmp_path)
    if architecture in ("small_cnn", "resnet18_cifar", "resnet18", "mobilenet_v2"):
        loaded = load(path, _spec(Format.TORCHSCRIPT, 10, (3, 32, 32)))
        assert loaded(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    else:
        graph_check.check_torchscript(torch.jit.load(str(path)))


def _export_file(model: nn.Module, shape: tuple[int, ...], tmp_path: Path) -> Path:
    path = tmp_path / "model.pt2"
    program = torch.export.export(model, (torch.rand(2, *shape),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    return path


@pytest.mark.slow
@pytest.mark.parametrize(("architecture", "side"), [("small_cnn", 32), ("resnet18", 64),
                                               ("mobilenet_v2", 64), ("efficientnet_b0", 64),
                                               ("vit_b_16", 224)])
def test_shipped_architectures_pass_when_exported(architecture: str, side: int,
                                                  tmp_path: Path) -> None:
    model = build(architecture, 10, 3).eval()
    path = _export_file(model, (3, side, side), tmp_path)
    if architecture == "vit_b_16":
        with graph_check.weights_only_loads():
            graph_check.check_export(torch.export.load(str(path)))
        return
    loaded = load(path, _spec(Format.EXPORT, 10, (3, side, side)))
    assert loaded(torch.rand(3, 3, side, side)).shape == (3, 10)


@pytest.mark.slow  # torch.export traces a data-dependent shape: over 10 s
def test_an_exported_graph_calling_a_refused_operator_is_refused(tmp_path: Path) -> None:
    class Nonzero(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x.mean((2, 3)) + torch.ops.aten.nonzero(x).sum().float()

    path = _export_file(Nonzero(), (3, 8, 8), tmp_path)
    with pytest.raises(CheckpointError, match=r"torch\.ops\.aten\.nonzero\.default in "
                                              r"<graph>:nonzero"):
        load(path, _spec(Format.EXPORT, 3, (3, 8, 8)))


def test_the_allow_list_names_no_operator_with_effects() -> None:
    effects = {"save", "load", "from_file", "_load_for_lite_interpreter", "manual_seed",
               "seed", "set_", "as_strided", "_nested_tensor_from_mask", "Print",
               "CallMethod", "CallFunction", "PythonOp", "CreateObject", "SetAttr", "fork",
               "wait", "warn", "_assert_async"}
    assert effects & (operators.ATEN | operators.PRIM) == set()
    assert operators.CONSTANT_MESSAGE_ONLY == {"warn", "_assert_async"}
    assert operators.size() == 474
