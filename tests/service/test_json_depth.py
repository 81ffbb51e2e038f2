"""JSON nested past MAX_JSON_DEPTH, in a body, a multipart field or a cursor, is a 422 that
names the limit, never a RecursionError's 500 (service/http/validation.py)."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

from service.http.validation import MAX_JSON_DEPTH, json_depth, loads, text_depth
from tests.factories import META, api, auth, new_key, settings, tiny_net, torchscript_bytes

DEEP = 100_000


def nested(depth: int, leaf: str = "1") -> str:
    """JSON text: ``depth`` levels of alternating arrays and objects around ``leaf``."""
    opens = "".join("[" if i % 2 else '{"k":' for i in range(depth))
    closes = "".join("]" if i % 2 else "}" for i in reversed(range(depth)))
    return opens + leaf + closes


def _refused(resp, field: str) -> None:  # type: ignore[no-untyped-def]
    assert resp.status_code == 422, resp.text[:300]
    body = resp.json()
    assert resp.headers["content-type"] == "application/problem+json"
    assert body["limit"] == MAX_JSON_DEPTH == 64
    assert body["field"] == field
    assert f"nested deeper than {MAX_JSON_DEPTH} levels" in body["detail"]


def test_depth_helpers_count_levels_exactly() -> None:
    for depth in (1, 2, 64, 65, 300):
        text = nested(depth)
        assert text_depth(text) == depth
        assert json_depth(json.loads(text)) == depth
    assert text_depth('{"a": "[[[[{{{{", "b": ["\\"]]]"]}') == 2
    assert loads(nested(64)) == json.loads(nested(64))


def test_deep_json_bodies_are_422_naming_the_limit(sqlite_url: str, tmp_path: Path) -> None:
    key = new_key(sqlite_url, "deep")
    with api(settings(sqlite_url, tmp_path)) as client:
        h = auth(key)
        model_id = str(uuid.uuid4())
        deep = nested(DEEP)
        body = (f'{{"model_id": "{model_id}", "dataset": "shapes-32", "suite": "standard", '
                f'"dataset_params": {deep}}}')
        _refused(client.post("/evaluations", headers={**h, "content-type": "application/json"},
                             content=body), "body")
        # A body with no content type is read as JSON by the framework: refused the same way.
        _refused(client.post("/evaluations", headers=h, content=body), "body")
        # Not even JSON (never closed): no parser recurses on it either.
        _refused(client.post("/keys", headers={**h, "content-type": "application/json"},
                             content="[" * DEEP), "body")
        _refused(client.post("/trainings", headers={**h, "content-type": "application/json"},
                             content=nested(MAX_JSON_DEPTH + 1)), "body")
        # At the limit, the body is parsed and answered on its merits (no such model).
        at_limit = (f'{{"model_id": "{model_id}", "dataset": "shapes-32", "suite": "standard", '
                    f'"dataset_params": {nested(MAX_JSON_DEPTH - 1)}}}')
        resp = client.post("/evaluations", headers={**h, "content-type": "application/json"},
                           content=at_limit)
        assert resp.status_code == 404, resp.text[:300]
        # A cursor is JSON too.
        cursor = base64.urlsafe_b64encode(("[" * 5000).encode()).decode().rstrip("=")
        resp = client.get("/evaluations", headers=h, params={"cursor": cursor})
        assert resp.status_code == 422, resp.text[:300]
        assert resp.json()["field"] == "cursor"


def test_deep_multipart_fields_are_422_naming_the_field(sqlite_url: str,
                                                        tmp_path: Path) -> None:
    key = new_key(sqlite_url, "deep-form")
    ckpt = torchscript_bytes(tiny_net())
    with api(settings(sqlite_url, tmp_path)) as client:
        h = auth(key)
        meta = json.dumps(META)[:-1] + f', "extra": {nested(DEEP)}}}'
        _refused(client.post("/models", headers=h, files={"file": ("m.pt", ckpt)},
                             data={"metadata": meta}), "metadata")
        spec = json.dumps({"dataset": "shapes-32", "suite": "standard",
                           "metadata": META})[:-1] + f', "seed": {nested(DEEP)}}}'
        _refused(client.post("/evaluations", headers=h, files={"checkpoint": ("m.pt", ckpt)},
                             data={"spec": spec}), "spec")
        # Nested 65 deep: parsed without recursion trouble, refused by the depth bound.
        meta = json.dumps(META)[:-1] + f', "extra": {nested(MAX_JSON_DEPTH)}}}'
        _refused(client.post("/models", headers=h, files={"file": ("m.pt", ckpt)},
                             data={"metadata": meta}), "metadata")
    # Nothing of the refused uploads is kept.
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []


def test_deep_json_inside_an_uploaded_file_is_422_not_500(sqlite_url: str,
                                                         tmp_path: Path) -> None:
    """A safetensors file whose JSON header nests 100 000 deep: the upload check parses it
    without a depth check of its own; the guard answers the RecursionError as the client's."""
    key = new_key(sqlite_url, "deep-file")
    header = nested(DEEP).encode()
    checkpoint = len(header).to_bytes(8, "little") + header
    with api(settings(sqlite_url, tmp_path)) as client:
        resp = client.post("/models", headers=auth(key),
                           files={"file": ("m.safetensors", checkpoint)},
                           data={"metadata": json.dumps({**META, "architecture": "small_cnn"})})
        assert resp.status_code == 422, resp.text[:300]
        assert resp.json()["limit"] == MAX_JSON_DEPTH
        assert "nested too deeply" in resp.json()["detail"]
        # The connection and the process go on.
        assert client.get("/health").status_code == 200
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []
