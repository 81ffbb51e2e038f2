"""The OpenAPI document tells the truth and is complete enough to generate a working client.

The fast tests read ``app.openapi()`` of an app that is built but never started. The slow test
generates a Python client with openapi-python-client and runs the walkthrough (upload a model,
evaluate it, read the result back) through it against the app in-process.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.app import create_app
from tests.factories import META, new_key, settings, tiny_net, torchscript_bytes

METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}
PUBLIC = {"/health", "/ready", "/metrics", "/openapi.json"}
# Read by anyone (their public rows, or two public evaluations side by side); a key (or a
# browser's session) adds the owner's own.
OPEN_READS = {"/leaderboard", "/leaderboard/page", "/evaluations/{evaluation_id}/compare/page"}
EVENT_STREAMS = {"/evaluations/{evaluation_id}/events", "/trainings/{training_id}/events"}
HTML = {"/evaluations/{evaluation_id}/report", "/sweeps/{sweep_id}/report", "/leaderboard/page",
        "/evaluations/{evaluation_id}/compare/page"}
MEDIA_TYPES = {
    **{p: "text/event-stream" for p in EVENT_STREAMS},
    **{p: "text/html" for p in HTML},
    "/evaluations/{evaluation_id}/artifacts/{name}": "application/octet-stream",
    "/metrics": "text/plain",
}


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    data_dir = tmp_path_factory.mktemp("openapi")
    app = create_app(settings(f"sqlite:///{data_dir / 'unused.db'}", data_dir))
    return app.openapi()


def _operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield path, method, op


def _success(op: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    codes = sorted(c for c in op["responses"] if c.startswith("2"))
    assert len(codes) == 1, codes
    return codes[0], op["responses"][codes[0]]


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _resolve(spec: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = spec
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict), f"{ref} does not resolve"
        assert part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def test_every_ref_resolves(spec: dict[str, Any]) -> None:
    refs = set(_refs(spec))
    assert refs
    for ref in refs:
        _resolve(spec, ref)


def test_every_post_has_a_request_body_with_a_schema(spec: dict[str, Any]) -> None:
    cancels = {p for p in spec["paths"] if p.endswith("/cancel")}
    for path, method, op in _operations(spec):
        if method != "post" or path in cancels:  # a cancel takes no body
            continue
        body = op.get("requestBody")
        assert body, f"POST {path} declares no requestBody"
        assert body.get("required") is True, path
        assert body["content"], path
        for media, content in body["content"].items():
            schema = content.get("schema")
            assert schema, f"POST {path} {media} has no schema"
            target = _resolve(spec, schema["$ref"]) if "$ref" in schema else schema
            assert target.get("properties"), f"POST {path} {media}: a schema without fields"
    for path in cancels:
        assert "requestBody" not in spec["paths"][path]["post"], path


def test_hand_parsed_evaluation_body_offers_json_and_multipart(spec: dict[str, Any]) -> None:
    content = spec["paths"]["/evaluations"]["post"]["requestBody"]["content"]
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/EvaluationIn"}
    assert content["multipart/form-data"]["schema"] == {
        "$ref": "#/components/schemas/EvaluationUpload"}


def test_every_success_response_declares_its_real_media_type(spec: dict[str, Any]) -> None:
    for path, method, op in _operations(spec):
        code, response = _success(op)
        if code == "204":
            assert not response.get("content"), f"{method.upper()} {path}: 204 has no content"
            continue
        assert method != "delete", f"DELETE {path} answers {code}, not 204"
        content = response.get("content", {})
        assert list(content) == [MEDIA_TYPES.get(path, "application/json")], (
            f"{method.upper()} {path}: {list(content)}")
        if path not in EVENT_STREAMS:
            assert content[next(iter(content))].get("schema") is not None, path


def test_every_json_success_response_has_a_named_schema(spec: dict[str, Any]) -> None:
    untyped = {"/health", "/ready", "/theory"}  # free-form JSON objects
    for path, method, op in _operations(spec):
        code, response = _success(op)
        if code == "204" or path in MEDIA_TYPES or path in untyped:
            continue
        schema = response["content"]["application/json"]["schema"]
        assert "$ref" in schema, f"{method.upper()} {path}: {schema}"


def test_every_schema_property_has_a_description(spec: dict[str, Any]) -> None:
    missing = []
    for name, schema in spec["components"]["schemas"].items():
        for field, prop in schema.get("properties", {}).items():
            if not prop.get("description"):
                missing.append(f"{name}.{field}")
    assert missing == []


def test_file_fields_are_binary_strings(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    for name, field in (("Body_upload_model", "file"), ("Body_upload_dataset", "file"),
                        ("EvaluationUpload", "checkpoint")):
        prop = schemas[name]["properties"][field]
        assert (prop["type"], prop["format"]) == ("string", "binary"), (name, prop)


def test_every_request_body_schema_has_an_example(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    for name in ("EvaluationIn", "TrainingIn", "SweepIn", "KeyIn", "TheoryIn"):
        assert schemas[name].get("examples"), name


def test_request_examples_validate() -> None:
    from service.auth.router import KeyIn
    from service.evaluations import suite
    from service.evaluations.schemas import EvaluationIn
    from service.models.schemas import ModelMetadata
    from service.sweeps.schemas import SweepIn
    from service.theory.router import TheoryIn
    from service.trainings.schemas import TrainingIn

    for model in (EvaluationIn, TrainingIn, SweepIn, KeyIn, TheoryIn, ModelMetadata):
        examples = model.model_json_schema()["examples"]
        assert examples, model.__name__
        for example in examples:
            model.model_validate(example)
            if example.get("suite") is not None:  # a suite is checked against its dataset
                suite.expand(example["suite"], suite.Capabilities(
                    name="x", has_masks=True, has_groups=True, regenerable=True,
                    default_eps={"linf": 0.0314, "l2": 0.5, "l1": 10.0}))


def test_routes_require_a_bearer_key_except_the_public_ones(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]
    bearer = [n for n, s in schemes.items() if s.get("type") == "http"
              and s.get("scheme", "").lower() == "bearer"]
    assert bearer, schemes
    assert "security" not in spec  # no global default: each operation says what it needs
    for path, method, op in _operations(spec):
        security = op.get("security")
        if path in PUBLIC:
            assert not security, f"{method.upper()} {path} should be public"
        else:
            assert security, f"{method.upper()} {path} declares no security"
            assert any(name in req for req in security for name in bearer), (
                f"{method.upper()} {path} does not require the Bearer key")


def test_the_app_refuses_every_non_public_operation_without_a_key(sqlite_url: str,
                                                                  tmp_path: Path) -> None:
    """What the document says about security is what the running app does."""
    from fastapi.testclient import TestClient

    app = create_app(settings(sqlite_url, tmp_path))
    with TestClient(app) as client:
        for path, method, _ in _operations(app.openapi()):
            url = re.sub(r"\{[^}]+\}", str(uuid.uuid4()), path)
            status = client.request(method, url).status_code
            if path in PUBLIC | OPEN_READS:
                assert status != 401 or path == "/metrics", (method, path, status)
            else:
                assert status == 401, (method, path, status)


def test_operation_ids_are_the_route_names(spec: dict[str, Any]) -> None:
    ids = [op["operationId"] for _, _, op in _operations(spec)]
    assert len(ids) == len(set(ids))
    assert {"upload_model", "create_evaluation", "get_evaluation"} <= set(ids)


# A generated client ------------------------------------------------------------------------


def _generate(spec: dict[str, Any], root: Path) -> str:
    """Write the spec, run openapi-python-client on it and return its output."""
    spec_path = root / "spec.json"
    spec_path.write_text(json.dumps(spec))
    config = root / "config.yml"
    config.write_text("post_hooks: []\n")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(
        [str(bin_dir / "openapi-python-client"), "generate", "--path", str(spec_path),
         "--output-path", str(root / "robustscope_client"), "--meta", "none",
         "--config", str(config)],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


@pytest.mark.slow
def test_a_generated_client_runs_the_walkthrough(sqlite_url: str, tmp_path: Path) -> None:
    import torch
    from fastapi.testclient import TestClient

    from core.db import make_engine, make_sessionmaker
    from core.settings import Settings
    from workers import evaluation_jobs
    from workers.runtime import Runtime

    app = create_app(settings(sqlite_url, tmp_path))
    gen = tmp_path / "gen"
    gen.mkdir()
    output = _generate(app.openapi(), gen)
    assert "Endpoint will not be generated" not in output, output
    assert "Unable to parse" not in output, output

    sys.path.insert(0, str(gen))
    try:
        client_pkg = importlib.import_module("robustscope_client")
        upload_model = importlib.import_module("robustscope_client.api.models.upload_model")
        create_evaluation = importlib.import_module(
            "robustscope_client.api.evaluations.create_evaluation")
        get_evaluation = importlib.import_module(
            "robustscope_client.api.evaluations.get_evaluation")
        m = importlib.import_module("robustscope_client.models")
        types = importlib.import_module("robustscope_client.types")

        key = new_key(sqlite_url, "walkthrough")
        engine = make_engine(sqlite_url)
        rt = Runtime(settings=Settings(database_url=sqlite_url, data_dir=tmp_path,
                                       sandbox="off", precision="fp32"),
                     engine=engine, sessions=make_sessionmaker(engine),
                     device=torch.device("cpu"), name="w")
        with TestClient(app) as http:
            client = client_pkg.AuthenticatedClient(base_url="http://testserver", token=key)
            http.headers[client.auth_header_name] = f"{client.prefix} {client.token}"
            client.set_httpx_client(http)

            body = m.BodyUploadModel(
                file=types.File(payload=torchscript_bytes(tiny_net()), file_name="tiny.pt"),
                metadata=json.dumps(META))
            model = upload_model.sync(client=client, body=body)
            assert isinstance(model, m.ModelOut), model
            assert model.format_ == "torchscript"
            assert model.num_classes == 4

            spec_in = m.EvaluationIn.from_dict({
                "model_id": str(model.id), "dataset": "shapes-32", "n_examples": 16,
                "suite": [{"benchmark": "clean"}], "seed": 1})
            created = create_evaluation.sync(client=client, body=spec_in)
            assert isinstance(created, m.EvaluationOut), created
            assert created.status == "queued"

            assert evaluation_jobs.run(rt, uuid.UUID(str(created.id))) == "succeeded"

            done = get_evaluation.sync(client=client, evaluation_id=created.id)
            assert isinstance(done, m.EvaluationOut), done
            assert done.status == "succeeded"
            clean = [r for r in done.results
                     if r.benchmark == "clean" and r.metric == "accuracy"]
            assert len(clean) == 1
            assert 0.0 <= clean[0].value <= 1.0
            assert done.n_examples == 16

            # The same route as one multipart call: checkpoint and evaluation together.
            upload = m.EvaluationUpload(
                checkpoint=types.File(payload=torchscript_bytes(tiny_net(seed=1)),
                                      file_name="tiny.pt"),
                spec=json.dumps({"model": {**META, "name": "tiny-2"}, "dataset": "shapes-32",
                                 "n_examples": 16, "suite": [{"benchmark": "clean"}]}))
            second = create_evaluation.sync(client=client, body=upload)
            assert isinstance(second, m.EvaluationOut), second
            assert second.model_name == "tiny-2"
            assert second.status == "queued"
            assert evaluation_jobs.run(rt, uuid.UUID(str(second.id))) == "succeeded"
        engine.dispose()
    finally:
        sys.path.remove(str(gen))
        for name in [n for n in sys.modules if n.split(".")[0] == "robustscope_client"]:
            del sys.modules[name]
