"""Artifact storage by URL: a local folder, or an S3-compatible store (moto's standalone server,
started by the test on a free port), with the API and a worker in separate folders."""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from pathlib import Path

import numpy as np
import pytest

from core.objectstore import (
    BlobCache,
    LocalStore,
    S3Store,
    StateMirror,
    StoreError,
    check_key,
    open_store,
)
from tests.factories import api, auth, new_key, settings, tiny_net, torchscript_bytes, upload
from tests.service.ingest_fixtures import png, write_zip


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_keys_are_only_what_the_service_makes() -> None:
    good = ["models/3f2c.pt", "datasets/9a.npz", f"artifacts/{uuid.uuid4()}/{'a' * 64}",
            "state/trainings/x/manifest.json"]
    assert [check_key(k) for k in good] == good
    for bad in ("../etc/passwd", "models/../x", "models/.hidden", "tmp/x", "models/a b",
                "/models/x", "models", "models/a/b/c/d/e", "models/é"):
        with pytest.raises(ValueError, match="not a storage key"):
            check_key(bad)


def test_the_default_store_is_the_data_folder(tmp_path: Path) -> None:
    store = open_store("", tmp_path)
    assert isinstance(store, LocalStore)
    assert store.root == tmp_path
    src = tmp_path / "upload"
    src.write_bytes(b"abc")
    store.put_file("models/m.pt", src)
    assert not src.exists()
    assert (tmp_path / "models" / "m.pt").read_bytes() == b"abc"
    assert store.local_path("models/m.pt") == tmp_path / "models" / "m.pt"
    # A local store's file is used in place: nothing is copied into a cache.
    cache = BlobCache(tmp_path / "cache", 1 << 20)
    assert cache.path(store, "models/m.pt", None) == tmp_path / "models" / "m.pt"
    assert not (tmp_path / "cache").exists()
    assert open_store("file:///srv/robustscope", tmp_path).root == Path("/srv/robustscope")
    with pytest.raises(ValueError, match="must be empty, file:///path or s3://"):
        open_store("ftp://host/x", tmp_path)


def test_state_in_place_is_not_mirrored(tmp_path: Path) -> None:
    mirror = StateMirror(LocalStore(tmp_path), "state/job", tmp_path / "state" / "job")
    (tmp_path / "state" / "job").mkdir(parents=True)
    (tmp_path / "state" / "job" / "clean.npz").write_bytes(b"x")
    assert (mirror.active, mirror.push(), mirror.pull()) == (False, 0, 0)
    assert not (tmp_path / "state" / "job" / "manifest.json").exists()


def test_state_goes_by_hash_and_comes_back_in_another_folder(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    first = StateMirror(store, "state/job", tmp_path / "a" / "state" / "job")
    (first.local / "entry-0").mkdir(parents=True)
    (first.local / "entry-0" / "stage00-apgd.npz").write_bytes(b"stage")
    (first.local / "entry-0" / "x.npz.tmp").write_bytes(b"half-written")
    assert first.push() == 1
    assert first.push() == 0  # unchanged
    stored = sorted(p.name for p in (tmp_path / "store" / "state" / "job").iterdir())
    assert stored == sorted([_sha(b"stage"), "manifest.json"])
    second = StateMirror(store, "state/job", tmp_path / "b" / "state" / "job")
    assert second.pull() == 1
    assert (second.local / "entry-0" / "stage00-apgd.npz").read_bytes() == b"stage"
    assert not (second.local / "entry-0" / "x.npz.tmp").exists()
    # A stored file that is not what its name says is refused, and so is a manifest that
    # names a path outside the job's folder.
    (tmp_path / "store" / "state" / "job" / _sha(b"stage")).write_bytes(b"tampered")
    third = StateMirror(store, "state/job", tmp_path / "c")
    with pytest.raises(StoreError, match="does not match its hash"):
        third.pull()
    store.put_bytes("state/job/manifest.json", b'{"../../escape": "' + b"0" * 64 + b'"}')
    with pytest.raises(StoreError, match="names a bad file"):
        third.pull()
    first.clear()
    assert not (tmp_path / "store" / "state" / "job").exists()


# --- an S3-compatible store -------------------------------------------------------------------


@pytest.mark.slow
def test_a_large_file_goes_to_the_store_in_parts(s3_url: str, tmp_path: Path) -> None:
    store = open_store(s3_url, tmp_path)
    assert isinstance(store, S3Store)
    assert store.check() is None
    data = os.urandom(20 << 20)  # 20 MiB: three parts of 8 MiB
    src = tmp_path / "big"
    src.write_bytes(data)
    store.put_file("models/big.pt", src)
    assert not src.exists()
    head = store.client.head_object(Bucket=store.bucket, Key="deploy-1/models/big.pt")
    assert head["ContentLength"] == 20 << 20
    assert head["ETag"].strip('"').endswith("-3")  # a multipart upload of three parts
    assert b"".join(store.iter_bytes("models/big.pt")) == data
    # Fetched once into the cache, verified, then used from there.
    cache = BlobCache(tmp_path / "cache", 64 << 20)
    got = cache.path(store, "models/big.pt", _sha(data))
    assert got == tmp_path / "cache" / _sha(data)[:2] / _sha(data)
    assert got.read_bytes() == data
    store.delete("models/big.pt")
    assert cache.path(store, "models/big.pt", _sha(data)) == got  # by hash, from the cache
    with pytest.raises(StoreError, match="is not in the store"):
        BlobCache(tmp_path / "other", 64 << 20).path(store, "models/big.pt", _sha(data))
    assert store.exists("models/big.pt") is False


@pytest.mark.slow
def test_the_cache_verifies_and_stays_bounded(s3_url: str, tmp_path: Path) -> None:
    store = open_store(s3_url, tmp_path)
    blobs = [bytes([i]) * (300 << 10) for i in range(4)]  # 300 KiB each
    for i, blob in enumerate(blobs):
        store.put_bytes(f"datasets/d{i}.npz", blob)
    cache = BlobCache(tmp_path / "cache", 1 << 20)  # room for three
    for i, blob in enumerate(blobs):
        cache.path(store, f"datasets/d{i}.npz", _sha(blob))
    assert cache.usage() == 3 * (300 << 10)
    kept = sorted(p.name for p in (tmp_path / "cache").glob("??/*"))
    assert kept == sorted(_sha(b) for b in blobs[1:])  # the least recently used went first
    with pytest.raises(StoreError, match="does not match its recorded hash"):
        cache.path(store, "datasets/d0.npz", _sha(b"something else"))
    with pytest.raises(StoreError, match="no recorded content hash"):
        cache.path(store, "datasets/d0.npz", None)
    assert not list((tmp_path / "cache").glob(".fetch-*"))
    store.put_bytes("datasets/huge.npz", b"z" * (2 << 20))
    with pytest.raises(StoreError, match="larger than this worker's cache"):
        cache.path(store, "datasets/huge.npz", _sha(b"z" * (2 << 20)))


@pytest.mark.slow
def test_api_and_worker_in_their_own_folders_share_only_the_store(
        s3_url: str, sqlite_url: str, tmp_path: Path) -> None:
    """The API receives a checkpoint and a dataset archive in its folder and keeps them in the
    store; a worker with another folder ingests the dataset, evaluates, and writes the
    artifact back; the API serves it from the store."""
    from tests.factories import worker_runtime
    from workers import evaluation_jobs, ingest

    api_dir, worker_dir = tmp_path / "api", tmp_path / "worker"
    api_dir.mkdir()
    worker_dir.mkdir()
    key = new_key(sqlite_url, "s3")
    cfg = settings(sqlite_url, api_dir, storage_url=s3_url)
    rt = worker_runtime(sqlite_url, worker_dir, storage_url=s3_url, sandbox="off")
    rng = np.random.default_rng(0)
    files = {"manifest.csv": b"path,label\n" + b"".join(
        f"img/{i}.png,{i % 4}\n".encode() for i in range(16))}
    files.update({f"img/{i}.png": png(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
                  for i in range(16)})
    archive = write_zip(tmp_path / "shapes.zip", files)
    with api(cfg) as client:
        model = upload(client, key, torchscript_bytes(tiny_net())).json()
        with archive.open("rb") as f:
            ds = client.post("/datasets", headers=auth(key), files={"file": ("x.zip", f)})
        assert ds.status_code == 202, ds.text
        assert ingest.run(rt, uuid.UUID(ds.json()["ingest"]["id"])) == "succeeded"
        ready = client.get(f"/datasets/{ds.json()['id']}", headers=auth(key)).json()
        assert (ready["status"], ready["num_examples"]) == ("ready", 16)
        ev = client.post("/evaluations", headers=auth(key), json={
            "model_id": model["id"], "dataset": ds.json()["id"], "suite": [
                {"benchmark": "adversarial", "attack": "fgsm", "eps": 0.03}]}).json()
        assert evaluation_jobs.run(rt, uuid.UUID(ev["id"])) == "succeeded"
        done = client.get(f"/evaluations/{ev['id']}", headers=auth(key)).json()
        [name] = done["artifacts"]
        resp = client.get(f"/evaluations/{ev['id']}/artifacts/{name}", headers=auth(key))
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-disposition"].endswith(f'"{Path(name).name}"')
        flags = np.load(io.BytesIO(resp.content), allow_pickle=False)
        robust = next(r["value"] for r in done["results"] if r["metric"] == "robust_accuracy")
        assert flags["robust"].shape == (16,)
        assert flags["robust"].mean() == pytest.approx(robust)
        assert client.get(f"/evaluations/{ev['id']}/artifacts/x",
                          headers=auth(key)).status_code == 404
        # Deleting the model removes its object.
        store = cfg.store()
        model_key = f"models/{model['id']}.pt"
        assert store.exists(model_key)
        assert client.delete(f"/models/{model['id']}", headers=auth(key)).status_code == 204
        assert not store.exists(model_key)
    # Nothing but temporary and cached files in either local folder: the files live in the
    # store, and the worker's copies are its cache (by content hash).
    for folder in (api_dir, worker_dir):
        kept = {p.relative_to(folder).parts[0] for p in folder.rglob("*") if p.is_file()}
        assert not kept & {"models", "datasets", "artifacts", "state"}, (folder, kept)
    cached = {p.name for p in (worker_dir / "cache").glob("??/*")}
    assert len(cached) == 2  # the checkpoint and the dataset's npz


@pytest.mark.slow
def test_a_training_keeps_its_state_and_its_model_in_the_store(
        s3_url: str, sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A training on a worker with its own folder: its per-epoch checkpoint goes through the
    store (and is removed with the job), its weights become a model stored by key, with the
    hash the record shows."""
    import hashlib

    from tests.factories import worker_runtime
    from tests.service.test_training_jobs import SPEC
    from workers import training_jobs

    (tmp_path / "api").mkdir()
    key = new_key(sqlite_url, "s3-train")
    rt = worker_runtime(sqlite_url, tmp_path / "worker", storage_url=s3_url, sandbox="off")
    mirrored: list[int] = []
    push = StateMirror.push

    def counted(self: StateMirror) -> int:
        mirrored.append(n := push(self))
        return n

    with api(settings(sqlite_url, tmp_path / "api", storage_url=s3_url)) as client:
        resp = client.post("/trainings", headers=auth(key), json=SPEC)
        assert resp.status_code == 202, resp.text
        monkeypatch.setattr(StateMirror, "push", counted)
        assert training_jobs.run(rt, uuid.UUID(resp.json()["id"])) == "succeeded"
        done = client.get(f"/trainings/{resp.json()['id']}", headers=auth(key)).json()
        model = client.get(f"/models/{done['model_id']}", headers=auth(key)).json()
    store = open_store(s3_url, tmp_path)
    weights = b"".join(store.iter_bytes(f"models/{model['id']}.safetensors"))
    assert hashlib.sha256(weights).hexdigest() == model["sha256"]
    assert sum(mirrored) >= 2  # a checkpoint after each of the two epochs went to the store
    assert not store.exists(f"state/trainings/{done['id']}/manifest.json")  # removed at the end
    kept = {p.relative_to(tmp_path / "worker").parts[0]
            for p in (tmp_path / "worker").rglob("*") if p.is_file()}
    assert not kept & {"models", "state"}, kept
