"""Dataset ingest leaves the API: the upload is stored and answered 202, a worker decodes it
within its budget (charged from image headers before decoding), polling stays fast and the
API small meanwhile, and a lost ingest is sent again."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from core.db import make_engine, make_sessionmaker
from core.settings import Settings
from service.app import create_app
from service.datasets import ingest_decode
from service.datasets.ingest import IngestLimits, ingest
from service.datasets.ingest_errors import DatasetIngestError
from tests.factories import api, auth, new_key, settings
from tests.service.ingest_fixtures import png, write_zip
from tests.service.servers import rss, serve
from workers.runtime import Runtime

MB = 1 << 20



def test_the_decoded_budget_is_charged_from_headers_before_decoding(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """400 images of 1024x1024 (a small zip: they are flat) against a 64 MB budget: refused
    after about 21 images' headers (3 MB each), never decoding the rest."""
    image = png(np.full((1024, 1024, 3), 7, np.uint8))
    files = {f"c{i % 2}/img{i:03d}.png": image for i in range(400)}
    archive = write_zip(tmp_path / "big.zip", files)
    decoded = []
    real = ingest_decode.decode_image

    def counting(data: bytes, max_side: int) -> Any:
        decoded.append(1)
        return real(data, max_side)

    monkeypatch.setattr("service.datasets.ingest.decode_image", counting)
    with pytest.raises(DatasetIngestError) as err:
        ingest(archive, tmp_path / "out.npz", name="big",
               limits=IngestLimits(max_decoded_bytes=64 * MB, decode_threads=1))
    assert err.value.status == 413
    assert len(decoded) <= 22
    assert not (tmp_path / "out.npz").exists()


def test_a_dataset_upload_is_ingested_by_a_worker_not_the_api(
        sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr("service.datasets.service.ingest",
                        lambda *a, **k: calls.append("ingest"))
    key = new_key(sqlite_url, "lazy")
    archive = write_zip(tmp_path / "a.zip", {"manifest.csv": b"path,label\nx.png,0\n",
                                              "x.png": png(np.zeros((8, 8, 3), np.uint8))})
    with api(settings(sqlite_url, tmp_path)) as client, archive.open("rb") as f:
        resp = client.post("/datasets", headers=auth(key), files={"file": ("a.zip", f)})
        assert resp.status_code == 202
        assert resp.headers["location"] == f"/datasets/{resp.json()['id']}"
        assert resp.json()["status"] == "ingesting"
        assert resp.json()["num_examples"] is None
        assert client.get(f"/datasets/{resp.json()['id']}",
                          headers=auth(key)).json()["status"] == "ingesting"
    assert calls == []
    assert (tmp_path / "datasets" / f"{resp.json()['id']}.upload").exists()




_INGEST = """
import sys, uuid
from pathlib import Path
from service.datasets.ingest import IngestLimits
from service.datasets.service import run_ingest
from core.db import make_engine, make_sessionmaker
from core.objectstore import LocalStore
url, dataset_id, data_dir = sys.argv[1:4]
status = run_ingest(make_sessionmaker(make_engine(url)), uuid.UUID(dataset_id),
                    LocalStore(Path(data_dir)), Path(data_dir), IngestLimits(decode_threads=1))
print(status)
"""


@pytest.mark.slow
def test_polling_stays_fast_and_the_api_small_while_a_worker_ingests(
        sqlite_url: str, tmp_path: Path) -> None:
    import statistics
    import subprocess
    import sys
    import time


    key = new_key(sqlite_url, "poller")
    rng = np.random.default_rng(0)
    files = {f"c{i % 4}/img{i:03d}.png": png(rng.integers(0, 255, (256, 256, 3), np.uint8))
             for i in range(240)}
    archive = write_zip(tmp_path / "noisy.zip", files)  # 47 MB decoded, incompressible
    cfg = settings(sqlite_url, tmp_path)
    with serve(create_app(cfg)) as port, httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers=auth(key)) as client:
        with archive.open("rb") as f:
            made = client.post("/datasets", files={"file": ("noisy.zip", f)})
        assert made.status_code == 202
        dataset_id = made.json()["id"]

        def poll(n: int) -> list[float]:
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                assert client.get(f"/datasets/{dataset_id}").status_code == 200
                times.append(time.perf_counter() - t0)
            return times

        baseline = statistics.median(poll(40))
        rss_before = rss()
        worker = subprocess.Popen([sys.executable, "-c", _INGEST, sqlite_url, dataset_id,
                                   str(tmp_path)], stdout=subprocess.PIPE, text=True)
        during: list[float] = []
        while worker.poll() is None:
            during += poll(5)
        out, _ = worker.communicate()
        assert out.strip() == "ready"
        assert client.get(f"/datasets/{dataset_id}").json()["num_examples"] == 240
        assert len(during) >= 5
        # The API does none of the decoding: it stays small, and a poll stays a poll (the
        # bound is loose because the worker shares this machine's cores).
        assert rss() - rss_before < 32 * MB
        assert statistics.median(during) < 5 * baseline + 0.05


def test_a_lost_ingest_is_resent_by_the_reconciler(sqlite_url: str, tmp_path: Path) -> None:
    from workers import ingest as ingest_task
    from workers import reconciler

    key = new_key(sqlite_url, "lost")
    archive = write_zip(tmp_path / "a.zip", {"manifest.csv": b"path,label\nx.png,0\n",
                                              "x.png": png(np.zeros((8, 8, 3), np.uint8))})
    with api(settings(sqlite_url, tmp_path)) as client, archive.open("rb") as f:
        dataset_id = client.post("/datasets", headers=auth(key),
                                 files={"file": ("a.zip", f)}).json()["id"]
    engine = make_engine(sqlite_url)
    fresh = Runtime(settings=Settings(database_url=sqlite_url, data_dir=tmp_path),
                    engine=engine, sessions=make_sessionmaker(engine),
                    device=torch.device("cpu"), name="w")
    sent: list[tuple[str, list[str]]] = []
    assert reconciler.reconcile_once(fresh, lambda name, args: sent.append((name, args))) == []
    rt = Runtime(settings=Settings(database_url=sqlite_url, data_dir=tmp_path,
                                   requeue_queued_after=0), engine=engine,
                 sessions=make_sessionmaker(engine), device=torch.device("cpu"), name="w")
    assert reconciler.reconcile_once(rt, lambda name, args: sent.append((name, args))) == [
        dataset_id]
    assert sent == [("robustscope.ingest", [dataset_id])]
    assert ingest_task.run(rt, uuid.UUID(dataset_id)) == "ready"
    assert ingest_task.run(rt, uuid.UUID(dataset_id)) is None  # a redelivery does nothing
    assert reconciler.reconcile_once(rt, lambda name, args: sent.append((name, args))) == []
