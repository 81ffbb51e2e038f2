"""Dataset ingest leaves the API: the upload is stored and answered 202 with its ingest job
queued, a worker decodes it within its budget (charged from image headers before decoding),
and polling stays fast and the API small meanwhile. The ingest as a job (attempts, progress,
cancel, the reconciler) is in ``test_ingest_jobs.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.app import create_app
from service.datasets import ingest_decode
from service.datasets.ingest import IngestLimits, ingest
from service.datasets.ingest_errors import DatasetIngestError
from tests.factories import api, auth, new_key, settings
from tests.service.ingest_fixtures import png, write_zip
from tests.service.servers import rss, serve

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
    monkeypatch.setattr("service.datasets.ingest.ingest",
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
        assert (resp.json()["ingest"]["status"], resp.json()["ingest"]["attempts"]) == (
            "queued", 0)
        assert client.get(f"/datasets/{resp.json()['id']}",
                          headers=auth(key)).json()["status"] == "ingesting"
    assert calls == []
    assert (tmp_path / "datasets" / f"{resp.json()['id']}.upload").exists()




_INGEST = """
import sys, uuid
from pathlib import Path
from tests.factories import worker_runtime
from workers import ingest
url, ingest_id, data_dir = sys.argv[1:4]
print(ingest.run(worker_runtime(url, Path(data_dir)), uuid.UUID(ingest_id)))
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
        dataset_id, ingest_id = made.json()["id"], made.json()["ingest"]["id"]

        def poll(n: int) -> list[float]:
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                assert client.get(f"/datasets/{dataset_id}").status_code == 200
                times.append(time.perf_counter() - t0)
            return times

        baseline = statistics.median(poll(40))
        rss_before = rss()
        worker = subprocess.Popen([sys.executable, "-c", _INGEST, sqlite_url, ingest_id,
                                   str(tmp_path)], stdout=subprocess.PIPE, text=True)
        during: list[float] = []
        while worker.poll() is None:
            during += poll(5)
        out, _ = worker.communicate()
        assert out.strip() == "succeeded"
        assert client.get(f"/datasets/{dataset_id}").json()["num_examples"] == 240
        assert len(during) >= 5
        # The API does none of the decoding: it stays small, and a poll stays a poll (the
        # bound is loose because the worker shares this machine's cores).
        assert rss() - rss_before < 32 * MB
        assert statistics.median(during) < 5 * baseline + 0.05
