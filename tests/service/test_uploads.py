"""One way an upload is received and undone (``core/storage.py``): the received file and its
stored object stay only when the transaction that records them commits."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from core import storage
from core.db import make_engine, make_sessionmaker
from core.errors import PayloadTooLarge
from core.objectstore import LocalStore
from tests.factories import auth, tiny_net, torchscript_bytes, upload

DATA = b"weights" * 100


@pytest.fixture
def sessions(sqlite_url: str) -> sessionmaker[Session]:
    return make_sessionmaker(make_engine(sqlite_url))


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def _received(tmp_path: Path) -> storage.Received:
    return storage.receive(io.BytesIO(DATA), tmp_path / "data", 1 << 20, "checkpoint")


def _left(tmp_path: Path) -> list[str]:
    """Every file under the data folder and the store, by its path from ``tmp_path``."""
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                  if p.is_file() and p.suffix != ".db" and "-wal" not in p.name
                  and "-shm" not in p.name and "-journal" not in p.name)


def test_a_received_upload_is_hashed_and_sized(tmp_path: Path) -> None:
    received = _received(tmp_path)
    assert received.path.read_bytes() == DATA
    assert received.size == len(DATA)
    assert received.sha256 == hashlib.sha256(DATA).hexdigest()


def test_an_upload_over_its_limit_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(PayloadTooLarge):
        storage.receive(io.BytesIO(DATA), tmp_path / "data", len(DATA) - 1, "checkpoint")
    assert _left(tmp_path) == []


def test_a_committed_upload_stays(tmp_path: Path, sessions: sessionmaker[Session],
                                  store: LocalStore) -> None:
    with sessions.begin() as s, storage.upload(s, store, _received(tmp_path)) as up:
        assert up.keep("models/m.pt") == "models/m.pt"
    assert _left(tmp_path) == ["store/models/m.pt"]
    assert (tmp_path / "store" / "models" / "m.pt").read_bytes() == DATA


@pytest.mark.parametrize("kept", [False, True])
def test_a_block_that_raises_removes_the_file_and_the_stored_object(
        tmp_path: Path, sessions: sessionmaker[Session], store: LocalStore, kept: bool) -> None:
    def refused() -> None:
        with sessions.begin() as s, storage.upload(s, store, _received(tmp_path)) as up:
            if kept:
                up.keep("models/m.pt")
            raise RuntimeError("refused")

    with pytest.raises(RuntimeError, match="refused"):
        refused()
    assert _left(tmp_path) == []


def test_a_transaction_that_rolls_back_after_the_block_removes_the_stored_object(
        tmp_path: Path, sessions: sessionmaker[Session], store: LocalStore) -> None:
    """The block ended well, but the transaction that was to record the key did not commit
    (the next step of the request failed): the stored object goes with it."""
    seen: list[list[str]] = []

    def failed_later() -> None:
        with sessions.begin() as s:
            with storage.upload(s, store, _received(tmp_path)) as up:
                up.keep("models/m.pt")
            seen.append(_left(tmp_path))
            raise RuntimeError("a later step failed")

    with pytest.raises(RuntimeError, match="later"):
        failed_later()
    assert seen == [["store/models/m.pt"]]
    assert _left(tmp_path) == []


def test_a_block_that_never_keeps_leaves_no_received_file(
        tmp_path: Path, sessions: sessionmaker[Session], store: LocalStore) -> None:
    with sessions.begin() as s, storage.upload(s, store, _received(tmp_path)):
        pass
    assert _left(tmp_path) == []


def test_a_refused_one_call_evaluation_leaves_no_model_and_no_file(
        client: TestClient, key: str, tmp_path: Path) -> None:
    """``POST /evaluations`` with a checkpoint registers the model before the evaluation is
    checked; whatever refuses the evaluation then, the model row and its file go too."""
    spec = {"model": {"name": "one-call", "num_classes": 4, "input_shape": [3, 32, 32]},
            "dataset": "shapes-32", "suite": [{"benchmark": "clean"}]}

    def post(change: dict[str, object], **headers: str) -> int:
        resp = client.post("/evaluations", headers={**auth(key), **headers},
                           files={"checkpoint": ("m.pt", torchscript_bytes(tiny_net()))},
                           data={"spec": json.dumps({**spec, **change})})
        return resp.status_code

    assert post({"suite": "nope"}) == 422  # the request, validated after the registration
    assert post({"dataset": "no-such-dataset"}) == 404  # the job's creation
    assert post({"webhook_url": "http://127.0.0.1/hook"}) == 422  # the webhook URL's check
    assert client.get("/models", headers=auth(key)).json()["items"] == []
    models = tmp_path / "models"
    assert not models.exists() or list(models.iterdir()) == []
    assert not (tmp_path / "tmp").exists() or list((tmp_path / "tmp").iterdir()) == []
    assert post({}) == 202
    assert len(list(models.iterdir())) == 1


def test_a_refused_model_upload_leaves_no_file(client: TestClient, key: str,
                                               tmp_path: Path) -> None:
    resp = upload(client, key, b"not a checkpoint")
    assert resp.status_code == 422, resp.text
    assert client.get("/models", headers=auth(key)).json()["items"] == []
    models = tmp_path / "models"
    assert not models.exists() or list(models.iterdir()) == []
    assert not (tmp_path / "tmp").exists() or list((tmp_path / "tmp").iterdir()) == []


def test_a_refused_dataset_upload_leaves_no_file(client: TestClient, key: str,
                                                 tmp_path: Path) -> None:
    """A name taken is found after the archive was received: it goes again."""
    def post() -> int:
        return client.post("/datasets", headers=auth(key), files={"file": ("d.zip", b"PK")},
                           data={"name": "mine"}).status_code

    assert post() == 202
    assert post() == 409
    assert [p.name.endswith(".upload") for p in (tmp_path / "datasets").iterdir()] == [True]
    assert list((tmp_path / "tmp").iterdir()) == []
