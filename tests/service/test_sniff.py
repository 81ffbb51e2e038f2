"""The upload check reads an archive as torch reads it and accepts it by a positive list.

Each hostile archive is built here. Where the attack is real, the test first shows that torch
itself runs it (the marker file appears), then that the upload check refuses it, naming the
entry or operator, and that the engine's loader refuses it before the payload runs."""

from __future__ import annotations

import functools
import io
import json
import pickle
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from core.errors import CheckpointRefused
from service.models.sniff import sniff
from tests.factories import META, api, auth, export_bytes, new_key, settings, tiny_net
from tests.factories import torchscript_bytes as scripted
from workers.engine.models import CheckpointError, Format, ModelSpec, load

warnings.filterwarnings("ignore", category=FutureWarning)

PROBLEM = "application/problem+json"


class _Payload:
    """Unpickling this creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def _rewrite(data: bytes, change: Callable[[str, bytes], bytes | None],
             add: dict[str, bytes] | None = None, first: dict[str, bytes] | None = None) -> bytes:
    """The archive with each entry passed through ``change`` (None drops it), then ``add``."""
    raw = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for name, blob in (first or {}).items():
            zf.writestr(name, blob)
        for item in raw.infolist():
            new = change(item.filename, raw.read(item.filename))
            if new is not None:
                zf.writestr(item.filename, new)
        for name, blob in (add or {}).items():
            zf.writestr(name, blob)
    return out.getvalue()


@functools.cache
def _pt2() -> bytes:
    return export_bytes(tiny_net())


def _same(_name: str, blob: bytes) -> bytes:
    return blob


UINT8 = 1  # torch.export's serialized ScalarType for uint8


def _opaque_pt2(marker: Path, stored_as: str) -> bytes:
    """A valid archive whose constants config names ``opaque_obj_0`` as raw uint8 bytes (so
    torch builds a tensor from them and then, for the ``opaque_obj_`` prefix, also runs
    ``pickle.loads`` on them), stored under ``stored_as``."""
    payload = pickle.dumps(_Payload(marker))
    meta = {"dtype": UINT8, "sizes": [{"as_int": len(payload)}], "requires_grad": False,
            "device": {"type": "cpu", "index": None}, "strides": [{"as_int": 1}],
            "storage_offset": {"as_int": 0}, "layout": 7}
    config = json.dumps({"config": {"evil": {"path_name": "opaque_obj_0", "is_param": False,
                                             "use_pickle": False, "tensor_meta": meta}}})

    def change(name: str, blob: bytes) -> bytes:
        return config.encode() if name.endswith("model_constants_config.json") else blob

    return _rewrite(_pt2(), change, {stored_as: payload})


def _sniff(data: bytes, tmp_path: Path) -> str:
    path = tmp_path / "upload.bin"
    path.write_bytes(data)
    return sniff(path).format


def _refusal(data: bytes, tmp_path: Path) -> CheckpointRefused:
    with pytest.raises(CheckpointRefused) as info:
        _sniff(data, tmp_path)
    return info.value


# --- torch.export (.pt2) ----------------------------------------------------------------------


@pytest.mark.parametrize("stored_as", ["archive/data/constants/OPAQUE_OBJ_0",
                                       "archive/data/constants/Opaque_Obj_0",
                                       "archive/data/constants/opaque_obj_0"])
def test_an_opaque_constant_in_any_case_is_refused(stored_as: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    data = _opaque_pt2(marker, stored_as)
    # torch's reader finds the entry whatever its case, and unpickles it
    try:
        torch.export.load(io.BytesIO(data))
    except Exception:  # noqa: BLE001, S110 - whether the load then fails does not matter
        pass
    assert marker.exists()
    marker.unlink()
    err = _refusal(data, tmp_path)
    assert err.extra["reason"] == "export-payload-refused"
    assert err.extra["entries"] == [stored_as]
    # and the engine's loader refuses it before torch.export.load unpickles anything
    path = tmp_path / "m.pt2"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="data/constants/opaque_obj_0"):
        load(path, ModelSpec(format=Format.EXPORT, num_classes=4, input_shape=(3, 32, 32)))
    assert not marker.exists()


def test_the_upload_api_answers_422_naming_the_entry(sqlite_url: str, tmp_path: Path) -> None:
    with api(settings(sqlite_url, tmp_path, max_checkpoint_bytes=2_000_000)) as client:
        key = new_key(sqlite_url, "mallory")
        data = _opaque_pt2(tmp_path / "pwned", "archive/data/constants/OPAQUE_OBJ_0")
        resp = client.post("/models", headers=auth(key), files={"file": ("m.pt2", data)},
                           data={"metadata": json.dumps(META)})
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)
    body = resp.json()
    assert body["reason"] == "export-payload-refused"
    assert body["entries"] == ["archive/data/constants/OPAQUE_OBJ_0"]
    assert "archive/data/constants/OPAQUE_OBJ_0" in body["detail"]


def test_a_pickled_weight_is_refused(tmp_path: Path) -> None:
    def change(name: str, blob: bytes) -> bytes:
        if name.endswith("model_weights_config.json"):
            config = json.loads(blob)
            config["config"]["0.weight"]["use_pickle"] = True
            return json.dumps(config).encode()
        return blob

    err = _refusal(_rewrite(_pt2(), change), tmp_path)
    assert err.extra["reason"] == "export-payload-refused"
    assert err.extra["entries"] == ["archive/data/weights/weight_0"]


@pytest.mark.parametrize(("entry", "blob"), [
    ("archive/data/constants/model.pt", b"legacy pickled constants"),
    ("archive/data/aotinductor/model/model.so", b"\x7fELF"),
    ("archive/extra/notes.txt", b"hello"),
    ("archive/data/constants/custom_obj_0", b"x"),
    ("archive/models/other.json", b"{}"),
])
def test_an_entry_torch_would_read_beyond_the_list_is_refused(entry: str, blob: bytes,
                                                               tmp_path: Path) -> None:
    err = _refusal(_rewrite(_pt2(), _same, {entry: blob}), tmp_path)
    assert err.extra["reason"] == "archive-entry-refused"
    assert err.extra["entries"] == [entry]


def test_two_entries_torch_cannot_tell_apart_are_refused(tmp_path: Path) -> None:
    data = _rewrite(_pt2(), _same,
                    {"archive/MODELS/MODEL.JSON": b"{}"})
    err = _refusal(data, tmp_path)
    assert err.extra["entries"] == ["archive/models/model.json", "archive/MODELS/MODEL.JSON"]


def test_a_path_name_that_leaves_its_folder_is_refused(tmp_path: Path) -> None:
    def change(name: str, blob: bytes) -> bytes:
        if name.endswith("model_weights_config.json"):
            config = json.loads(blob)
            config["config"]["0.weight"]["path_name"] = "../constants/weight_0"
            return json.dumps(config).encode()
        return blob

    err = _refusal(_rewrite(_pt2(), change), tmp_path)
    assert err.extra["entries"] == ["archive/data/weights/../constants/weight_0"]


def test_bytes_before_the_archive_are_refused(tmp_path: Path) -> None:
    err = _refusal(b"PTMF" + b"\0" * 60 + _pt2(), tmp_path)
    assert err.extra["reason"] == "archive-damaged"


def test_a_sympy_expression_that_calls_a_builtin_is_refused(tmp_path: Path) -> None:
    """torch.export.load hands every ``expr_str`` to sympy.sympify, which evaluates it."""
    marker = tmp_path / "sympy-ran"
    evil = f"Symbol('s31', positive=True, integer=True) + len(open({str(marker)!r}, 'w').name)*0"

    def change(name: str, blob: bytes) -> bytes:
        if name.endswith("models/model.json"):
            text = blob.decode()
            assert "Symbol('s31', positive=True, integer=True)" in text
            return text.replace(json.dumps("Symbol('s31', positive=True, integer=True)"),
                                json.dumps(evil), 1).encode()
        return blob

    data = _rewrite(_pt2(), change)
    try:
        torch.export.load(io.BytesIO(data))
    except Exception:  # noqa: BLE001, S110 - whether the load then fails does not matter
        pass
    assert marker.exists()
    marker.unlink()
    err = _refusal(data, tmp_path)
    assert err.extra["reason"] == "export-graph-refused"
    assert err.extra["entries"] == ["archive/models/model.json"]
    assert err.extra["values"][0].startswith("expr_str: Symbol('s31'")


def test_a_pytree_spec_that_imports_a_module_is_refused(tmp_path: Path) -> None:
    def change(name: str, blob: bytes) -> bytes:
        if name.endswith("models/model.json"):
            program = json.loads(blob)
            sig = program["graph_module"]["module_call_graph"][0]["signature"]
            context = json.dumps({"default_factory_module": "os",
                                  "default_factory_name": "getcwd", "dict_context": []})
            sig["out_spec"] = json.dumps([1, {"type": "collections.defaultdict",
                                              "context": context, "children_spec": []}])
            return json.dumps(program).encode()
        return blob

    err = _refusal(_rewrite(_pt2(), change), tmp_path)
    assert err.extra["reason"] == "export-graph-refused"
    assert err.extra["values"][0].startswith("out_spec: ")


def test_a_graph_calling_torch_save_is_refused(tmp_path: Path) -> None:
    def change(name: str, blob: bytes) -> bytes:
        if name.endswith("models/model.json"):
            return blob.replace(b'"torch.ops.aten.relu.default"', b'"torch.save"')
        return blob

    err = _refusal(_rewrite(_pt2(), change), tmp_path)
    assert err.extra["reason"] == "export-operator-refused"
    assert err.extra["operators"] == ["torch.save"]


def test_example_inputs_with_a_foreign_global_are_refused(tmp_path: Path) -> None:
    inner = io.BytesIO()
    torch.save({"x": _Payload(tmp_path / "never")}, inner)

    def change(name: str, blob: bytes) -> bytes:
        return inner.getvalue() if name.endswith("sample_inputs/model.pt") else blob

    err = _refusal(_rewrite(_pt2(), change), tmp_path)
    assert err.extra["reason"] == "pickle-refused"
    assert err.extra["objects"] == ["io.open"]


def test_a_benign_export_archive_is_accepted(tmp_path: Path) -> None:
    assert _sniff(_pt2(), tmp_path) == "torch_export"


# --- TorchScript ---------------------------------------------------------------------------------


class _Saves(nn.Module):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        getattr(torch, "save")(x, self.path)  # noqa: B009 - the form the attack used
        return self.fc(x.mean((2, 3)))


class _Reads(nn.Module):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        data = getattr(torch, "from_file")(  # noqa: B009 - the form the attack used
            self.path, False, 4, dtype=torch.uint8)
        return self.fc(x.mean((2, 3))) + data.float().sum()


class _SavesViaOps(_Saves):
    def forward(self, x: Tensor) -> Tensor:
        getattr(torch.ops.aten, "save")(x, self.path)  # noqa: B009
        return self.fc(x.mean((2, 3)))


class _Prints(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        print('{"t":"done"}')  # noqa: T201
        return self.fc(x.mean((2, 3)))


@torch.jit.script
class _Helper:
    def __init__(self, scale: float) -> None:
        self.scale = scale

    def run(self, x: Tensor) -> Tensor:
        return x * self.scale


class _CallsClass(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(_Helper(2.0).run(x).mean((2, 3)))


@pytest.mark.parametrize(("model", "operator"), [
    (lambda: _Saves("/tmp/x"), "torch.save"),
    (lambda: _Reads("/etc/hostname"), "torch.from_file"),
    (lambda: _SavesViaOps("/tmp/x"), "torch.save"),
    (_Prints, "print"),
])
def test_a_torchscript_call_off_the_list_is_refused(model: Callable[[], nn.Module],
                                                    operator: str, tmp_path: Path) -> None:
    err = _refusal(scripted(model()), tmp_path)
    assert err.extra["reason"] == "torchscript-operator-refused"
    assert err.extra["operators"] == [operator]


def test_a_call_into_a_script_class_is_refused(tmp_path: Path) -> None:
    err = _refusal(scripted(_CallsClass()), tmp_path)
    assert err.extra["reason"] == "torchscript-operator-refused"
    assert any(op.endswith("._Helper") for op in err.extra["operators"])


def test_a_setstate_in_the_code_is_refused(tmp_path: Path) -> None:
    def change(name: str, blob: bytes) -> bytes:
        if name.endswith(".py") and b"class Linear(Module)" in blob:
            return blob + (b"  def __setstate__(self: __torch__.torch.nn.modules.linear.Linear,"
                           b"\n    state: Tuple[int]) -> None:\n    return None\n")
        return blob

    data = _rewrite(scripted(tiny_net()), change)
    err = _refusal(data, tmp_path)
    assert "__setstate__ (runs while the archive is loaded)" in err.extra["operators"]
    # the engine refuses it before torch.jit.load would run it
    path = tmp_path / "m.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"runs while it is loaded: __setstate__ in code/"):
        load(path, ModelSpec(format=Format.TORCHSCRIPT, num_classes=4, input_shape=(3, 32, 32)))


def test_a_torchscript_pickle_naming_a_foreign_global_is_refused(tmp_path: Path) -> None:
    def change(name: str, blob: bytes) -> bytes:
        if name.endswith("/constants.pkl"):
            return pickle.dumps(_Payload(tmp_path / "never"), protocol=2)
        return blob

    err = _refusal(_rewrite(scripted(tiny_net()), change), tmp_path)
    assert err.extra["reason"] == "pickle-refused"
    assert err.extra["entries"] == ["archive/constants.pkl"]
    assert err.extra["objects"] == ["io.open"]


def test_an_extra_torchscript_entry_is_refused(tmp_path: Path) -> None:
    err = _refusal(_rewrite(scripted(tiny_net()), _same, {"archive/extra/x.so": b"\x7fELF"}),
                   tmp_path)
    assert err.extra["entries"] == ["archive/extra/x.so"]


def test_benign_torchscript_archives_are_accepted(tmp_path: Path) -> None:
    from workers.engine.nets import resnet18_cifar, small_cnn

    for model in (tiny_net(), small_cnn(10, 3), resnet18_cifar(10, 1)):
        assert _sniff(scripted(model.eval()), tmp_path) == "torchscript"
    traced = io.BytesIO()  # a traced model also stores its example inputs
    torch.jit.save(torch.jit.trace(small_cnn(10, 3).eval(), torch.rand(2, 3, 32, 32)), traced)
    assert "archive/traced_inputs.pkl" in zipfile.ZipFile(traced).namelist()
    assert _sniff(traced.getvalue(), tmp_path) == "torchscript"
