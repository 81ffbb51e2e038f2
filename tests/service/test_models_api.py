"""POST /models: every accepted format, and every kind of bad upload refused as documented."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from tests.factories import (
    META,
    api,
    auth,
    export_bytes,
    grey_view_net,
    malicious_pickle,
    malicious_torch_save,
    new_key,
    safetensors_bytes,
    settings,
    tiny_net,
    torchscript_bytes,
    upload,
)
from workers.engine.nets import small_cnn

PROBLEM = "application/problem+json"


@pytest.fixture
def client(sqlite_url: str, tmp_path: Path) -> TestClient:
    with api(settings(sqlite_url, tmp_path, max_checkpoint_bytes=2_000_000)) as c:
        c.key = new_key(sqlite_url, "alice")  # type: ignore[attr-defined]
        yield c


def _problem(resp, status: int, type_suffix: str) -> dict:  # type: ignore[no-untyped-def]
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)
    body = resp.json()
    assert body["type"].endswith(type_suffix)
    assert body["status"] == status
    return body


def test_torchscript_upload_returns_id_sha_and_size(client: TestClient) -> None:
    data = torchscript_bytes(tiny_net())
    resp = upload(client, client.key, data)  # type: ignore[attr-defined]
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["format"] == "torchscript"
    assert body["size_bytes"] == len(data)
    import hashlib

    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    got = client.get(f"/models/{body['id']}", headers=auth(client.key))  # type: ignore[attr-defined]
    assert got.json() == body


@pytest.mark.slow
def test_torch_export_upload(client: TestClient) -> None:
    resp = upload(client, client.key, export_bytes(tiny_net()))  # type: ignore[attr-defined]
    assert resp.status_code == 201, resp.text
    assert resp.json()["format"] == "torch_export"


def test_safetensors_with_architecture(client: TestClient) -> None:
    state = small_cnn(4, 3).state_dict()
    meta = {**META, "architecture": "small_cnn"}
    resp = upload(client, client.key, safetensors_bytes(state), meta)  # type: ignore[attr-defined]
    assert resp.status_code == 201, resp.text
    assert resp.json()["architecture"] == "small_cnn"


def test_safetensors_that_does_not_fit_the_architecture(client: TestClient) -> None:
    state = small_cnn(10, 3).state_dict()  # 10 classes; the metadata says 4
    meta = {**META, "architecture": "small_cnn"}
    resp = upload(client, client.key, safetensors_bytes(state), meta)  # type: ignore[attr-defined]
    body = _problem(resp, 422, "checkpoint-architecture-mismatch")
    assert any("classifier.3.weight" in m for m in body["shape_mismatches"])
    state.pop("features.0.bias")
    resp = upload(client, client.key, safetensors_bytes(state),  # type: ignore[attr-defined]
                  {**meta, "num_classes": 10})
    assert _problem(resp, 422, "checkpoint-architecture-mismatch")["missing"] == [
        "features.0.bias"]


def test_safetensors_needs_architecture(client: TestClient) -> None:
    resp = upload(client, client.key,  # type: ignore[attr-defined]
                  safetensors_bytes(small_cnn(4, 3).state_dict()))
    assert _problem(resp, 422, "invalid")["field"] == "metadata.architecture"


def test_truncated_safetensors(client: TestClient) -> None:
    data = safetensors_bytes(small_cnn(4, 3).state_dict())[:-100]
    resp = upload(client, client.key, data, {**META, "architecture": "small_cnn"})  # type: ignore[attr-defined]
    assert "truncated" in _problem(resp, 422, "checkpoint-refused")["detail"]


def test_random_bytes(client: TestClient) -> None:
    resp = upload(client, client.key, bytes(range(256)) * 10)  # type: ignore[attr-defined]
    assert "unrecognised" in _problem(resp, 422, "checkpoint-refused")["detail"]


def test_pickle_is_refused_and_never_executed(client: TestClient, tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    for data in (malicious_pickle(target), malicious_torch_save(target)):
        resp = upload(client, client.key, data)  # type: ignore[attr-defined]
        body = _problem(resp, 422, "checkpoint-pickle-refused")
        assert "arbitrary code" in body["detail"]
        assert "safetensors" in body["detail"]  # says how to convert
    assert not target.exists()
    models = client.get("/models", headers=auth(client.key)).json()  # type: ignore[attr-defined]
    assert models["items"] == []


def test_oversized_upload_is_413(client: TestClient) -> None:
    resp = upload(client, client.key, b"\0" * 2_100_000)  # type: ignore[attr-defined]
    _problem(resp, 413, "payload-too-large")
    assert list((client.app.state.settings.data_dir / "tmp").iterdir()) == []  # type: ignore[attr-defined]


@pytest.mark.parametrize(("meta", "field"), [
    ({**META, "num_classes": 1}, "metadata.num_classes"),
    ({**META, "input_shape": [3, 32]}, "metadata.input_shape"),
    ({k: v for k, v in META.items() if k != "name"}, "metadata.name"),
    ({**META, "mean": [0.5]}, "metadata"),
    ({**META, "colour": "red"}, "metadata.colour"),
])
def test_bad_metadata_names_the_field(client: TestClient, meta: dict, field: str) -> None:
    resp = upload(client, client.key, torchscript_bytes(tiny_net()), meta)  # type: ignore[attr-defined]
    body = _problem(resp, 422, "invalid")
    assert any(e["field"] == field for e in body["errors"]), body


def test_metadata_not_json(client: TestClient) -> None:
    resp = client.post("/models", headers=auth(client.key),  # type: ignore[attr-defined]
                       files={"file": ("m.pt", b"x")}, data={"metadata": "{not json"})
    assert _problem(resp, 422, "invalid")["field"] == "metadata"


def test_missing_key_is_401(client: TestClient) -> None:
    resp = client.post("/models", files={"file": ("m.pt", b"x")},
                       data={"metadata": json.dumps(META)})
    _problem(resp, 401, "unauthorized")


def test_delete(client: TestClient) -> None:
    model = upload(client, client.key, torchscript_bytes(tiny_net())).json()  # type: ignore[attr-defined]
    path = client.app.state.settings.data_dir / "models" / f"{model['id']}.pt"  # type: ignore[attr-defined]
    assert path.exists()
    assert client.delete(f"/models/{model['id']}", headers=auth(client.key)).status_code == 204  # type: ignore[attr-defined]
    assert not path.exists()
    _problem(client.get(f"/models/{model['id']}", headers=auth(client.key)), 404, "not-found")  # type: ignore[attr-defined]


@pytest.mark.slow
def test_worker_loads_each_accepted_format(tmp_path: Path) -> None:
    """The engine's loaders read what the API accepted and give the same logits."""
    from workers.engine.models import Format, ModelSpec, load

    net = small_cnn(4, 3).eval()
    x = torch.rand(3, 3, 32, 32)
    blobs = {Format.TORCHSCRIPT: torchscript_bytes(net), Format.EXPORT: export_bytes(net),
             Format.SAFETENSORS: safetensors_bytes(net.state_dict())}
    for fmt, data in blobs.items():
        path = tmp_path / f"m.{fmt}"
        path.write_bytes(data)
        spec = ModelSpec.from_metadata(fmt.value, {**META, "architecture": "small_cnn"})
        model = load(path, spec)
        torch.testing.assert_close(model(x), net(x), rtol=1e-4, atol=1e-5)


def test_list_pages_newest_first_and_filters_by_sha256(client: TestClient) -> None:
    key = client.key  # type: ignore[attr-defined]
    a, b = torchscript_bytes(tiny_net()), torchscript_bytes(small_cnn(4, 3))
    ids = [upload(client, key, data).json()["id"] for data in (a, b, a)]
    first = client.get("/models", params={"limit": 2}, headers=auth(key)).json()
    assert [m["id"] for m in first["items"]] == [ids[2], ids[1]]
    rest = client.get("/models", params={"limit": 2, "cursor": first["next_cursor"]},
                      headers=auth(key)).json()
    assert [m["id"] for m in rest["items"]] == [ids[0]]
    assert rest["next_cursor"] is None
    import hashlib

    same = client.get("/models", params={"sha256": hashlib.sha256(a).hexdigest()},
                      headers=auth(key)).json()
    assert sorted(m["id"] for m in same["items"]) == sorted([ids[0], ids[2]])
    other = new_key(client.app.state.settings.database_url, "bob")  # type: ignore[attr-defined]
    assert client.get("/models", headers=auth(other)).json()["items"] == []
    _problem(client.get("/models", params={"sha256": "xyz"}, headers=auth(key)), 422, "")


def _evaluate_stored(client: TestClient, model: dict, meta: dict, net: torch.nn.Module,
                     x: torch.Tensor, y: torch.Tensor) -> None:
    """The checkpoint the API stored, loaded and evaluated by the engine as a job would: clean
    accuracy exactly the network's own, and a PGD stage that runs."""
    from workers.engine import benchmarks
    from workers.engine.models import ModelSpec, load
    from workers.engine.types import EvalData, RunContext

    stored = client.app.state.settings.data_dir / "models"  # type: ignore[attr-defined]
    (path,) = stored.glob(f"{model['id']}.*")
    loaded = load(path, ModelSpec.from_metadata(model["format"], meta))
    data = EvalData(x=x, y=y, class_names=[str(i) for i in range(meta["num_classes"])])
    with torch.no_grad():
        expected = (net(x).argmax(1) == y).float().mean().item()
        torch.testing.assert_close(loaded(x), net(x), rtol=1e-4, atol=1e-5)
    ctx = RunContext()
    clean = benchmarks.run(loaded, data, benchmarks.parse({"benchmark": "clean"}), ctx)
    assert clean.rows[0].value == pytest.approx(expected, abs=1e-6)
    adv = benchmarks.run(loaded, data, benchmarks.parse(
        {"benchmark": "adversarial", "attack": "pgd", "norm": "linf", "eps": [0.1],
         "steps": 2}), ctx)
    rows = {r.metric: r.value for r in adv.rows}
    assert rows["clean_accuracy"] == pytest.approx(expected, abs=1e-6)
    assert rows["robust_accuracy"] <= expected


GREY_META = {"name": "grey-view-cnn", "num_classes": 10, "input_shape": [1, 28, 28]}


def _run_snippet(code: str, tmp_path: Path, model: torch.nn.Module, example: torch.Tensor,
                 monkeypatch: pytest.MonkeyPatch) -> bytes:
    """Runs ``code`` as a user would paste it (names ``model`` and ``example`` bound), in an
    empty folder; returns the one file it wrote."""
    work = tmp_path / f"snippet{len(list(tmp_path.iterdir()))}"
    work.mkdir()
    monkeypatch.chdir(work)
    exec(code, {"torch": torch, "model": model, "example": example})  # noqa: S102
    (written,) = list(work.iterdir())
    return written.read_bytes()


@pytest.mark.slow  # two exports and two evaluations of a real model
def test_the_pickle_refusals_conversion_examples_pass_upload_and_evaluation(
        client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each line of code the refusal suggests, run verbatim on a grey model that flattens with
    ``.view`` (an example batch of one, as a user would write it: the export is then traced
    with a static batch of 1 and runs in chunks)."""
    from service.models.sniff import CONVERT_HINT

    snippets = [c for c in re.findall(r"`([^`]+)`", CONVERT_HINT) if "save" in c]
    assert len(snippets) == 3
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(6, 1, 28, 28, generator=g), torch.randint(0, 10, (6,), generator=g)
    formats = []
    for code in snippets:
        if "safetensors" in code:  # a state dict needs an architecture of the registry
            net, meta = small_cnn(10, 1).eval(), {**GREY_META, "architecture": "small_cnn"}
        else:
            net, meta = grey_view_net(), GREY_META
        data = _run_snippet(code, tmp_path, net, torch.rand(1, 1, 28, 28), monkeypatch)
        resp = upload(client, client.key, data, meta)  # type: ignore[attr-defined]
        assert resp.status_code == 201, resp.text
        formats.append(resp.json()["format"])
        _evaluate_stored(client, resp.json(), meta, net, x, y)
    assert sorted(formats) == ["safetensors", "torch_export", "torchscript"]


def test_the_failed_exports_hint_passes_upload_and_evaluation(
        client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An export whose batch dimension cannot take 3 inputs is refused at load with an export
    call that works; that call, run verbatim, gives a model that uploads and evaluates."""
    from workers.engine.models import CheckpointError, ModelSpec, export_hint, load

    net = grey_view_net()
    program = torch.export.export(net, (torch.rand(4, 1, 28, 28),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=4)},))
    path = tmp_path / "min4.pt2"
    torch.export.save(program, path)
    hint = export_hint(GREY_META["input_shape"])
    with pytest.raises(CheckpointError) as err:
        load(path, ModelSpec.from_metadata("torch_export", GREY_META))
    assert hint in str(err.value)
    data = _run_snippet(hint, tmp_path, net, torch.rand(1, 1, 28, 28), monkeypatch)
    resp = upload(client, client.key, data, GREY_META)  # type: ignore[attr-defined]
    assert resp.status_code == 201, resp.text
    g = torch.Generator().manual_seed(6)
    x, y = torch.rand(7, 1, 28, 28, generator=g), torch.randint(0, 10, (7,), generator=g)
    _evaluate_stored(client, resp.json(), GREY_META, net, x, y)
