"""POST /datasets and every natural-axis benchmark through POST /evaluations, on built-in data
and on uploads in the ImageNet-9 and Waterbirds layouts.

The uploads are written from built-in generated images, so their content is known; a job's
rows must equal what the engine computes in-process on the ingested arrays.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from contract.metrics import BENCHMARK_METRICS
from core.db import make_engine, make_sessionmaker
from core.settings import Settings
from tests.factories import (
    api,
    auth,
    engine_rows,
    new_key,
    served,
    settings,
    torchscript_bytes,
    upload,
    upload_dataset,
)
from tests.service.ingest_fixtures import npy, png, write_zip
from workers import evaluation_jobs
from workers.engine.data import load_builtin, load_npz
from workers.engine.types import EvalData
from workers.runtime import Runtime

NATURAL = [{"benchmark": "fg_bg_noise", "sigmas": [0.25], "trials": 1},
           {"benchmark": "backgrounds"},
           {"benchmark": "corruptions", "types": ["gaussian_noise", "contrast"],
            "severities": [3]}]


def _images(data: EvalData, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = (data.x[:n].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    assert data.masks is not None
    m = data.masks[:n, 0].numpy().astype(np.uint8)
    return x, m, data.y[:n].numpy()


def imagenet9_archive(path: Path, n: int = 45) -> Path:
    data = load_builtin("scenes-9", "test")
    x, m, y = _images(data, n)
    files: dict[str, bytes] = {}
    for i in range(n):
        folder = f"{int(y[i]):02d}_{data.class_names[int(y[i])]}"
        files[f"bg_challenge/original/val/{folder}/img{i:03d}.png"] = png(x[i])
        files[f"bg_challenge/fg_mask/val/{folder}/img{i:03d}.npy"] = npy(m[i])
    return write_zip(path, files)


def waterbirds_archive(path: Path, n: int = 40) -> Path:
    data = load_builtin("waterbirds-32", "test")
    x, _, y = _images(data, n)
    assert data.groups is not None
    place = (data.groups[:n].numpy() % 2).astype(int)  # groups are label x place
    lines = ["img_id,img_filename,y,split,place"]
    files: dict[str, bytes] = {}
    for i in range(n):
        name = f"{int(y[i]):03d}.Bird/bird_{i:03d}.png"
        files[f"waterbird_complete95/{name}"] = png(x[i])
        lines.append(f"{i},{name},{int(y[i])},2,{place[i]}")
    files["waterbird_complete95/metadata.csv"] = ("\n".join(lines) + "\n").encode()
    return write_zip(path, files)


def net(num_classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
                               torch.nn.Linear(32, num_classes)).eval()


@pytest.fixture
def env(sqlite_url: str, tmp_path: Path) -> Any:
    engine = make_engine(sqlite_url)
    rt = Runtime(settings=Settings(database_url=sqlite_url, data_dir=tmp_path,
                                   precision="fp32"), engine=engine,
                 sessions=make_sessionmaker(engine), device=torch.device("cpu"), name="w")
    with api(settings(sqlite_url, tmp_path)) as client:
        yield client, new_key(sqlite_url, f"u-{uuid.uuid4().hex[:6]}"), rt


def _run(client: TestClient, key: str, rt: Runtime, model_id: str, dataset: str,
         suite: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    resp = client.post("/evaluations", headers=auth(key), json={
        "model_id": model_id, "dataset": dataset, "suite": suite, "seed": 1, **extra})
    assert resp.status_code == 202, resp.text
    eid = resp.json()["id"]
    assert evaluation_jobs.run(rt, uuid.UUID(eid)) == "succeeded", client.get(
        f"/evaluations/{eid}", headers=auth(key)).json()["error"]
    out: dict[str, Any] = client.get(f"/evaluations/{eid}", headers=auth(key)).json()
    return out


def _rows(job: dict[str, Any]) -> list[Any]:
    return served(job["results"])


@pytest.mark.slow
def test_imagenet9_upload_runs_the_natural_benchmarks(env: Any, tmp_path: Path) -> None:
    client, key, rt = env
    archive = imagenet9_archive(tmp_path / "in9.zip")
    resp = upload_dataset(client, key, rt, archive, "in9-mini")
    assert resp.status_code == 200, resp.text
    ds = resp.json()
    assert ds["status"] == "ready"
    assert (ds["layout"], ds["num_examples"], ds["num_classes"]) == ("imagenet9", 45, 9)
    assert ds["has_masks"] is True
    assert ds["has_groups"] is False
    listed = client.get("/datasets", headers=auth(key)).json()["items"]
    assert any(d["id"] == ds["id"] and not d["builtin"] for d in listed)
    model = upload(client, key, torchscript_bytes(net(9)),
                   {"name": "n9", "num_classes": 9, "input_shape": [3, 32, 32]}).json()
    suite = [{"benchmark": "clean"}, *NATURAL]
    job = _run(client, key, rt, model["id"], "in9-mini", suite)
    data = load_npz(rt.settings.data_dir / "datasets" / f"{ds['id']}.npz", "test")
    assert _rows(job) == engine_rows(net(9), data, suite, seed=1)
    variants = {r["params"]["variant"] for r in job["results"]
                if r["benchmark"] == "backgrounds" and r["metric"] == "accuracy"}
    assert variants == {"original", "only_fg", "no_fg", "mixed_same", "mixed_rand"}
    # groups need group labels, which this upload has none of: refused at submission.
    refused = client.post("/evaluations", headers=auth(key), json={
        "model_id": model["id"], "dataset": ds["id"], "suite": [{"benchmark": "groups"}]})
    assert refused.status_code == 422
    assert "group labels" in refused.json()["detail"]


@pytest.mark.slow
def test_waterbirds_upload_runs_groups(env: Any, tmp_path: Path) -> None:
    client, key, rt = env
    archive = waterbirds_archive(tmp_path / "wb.zip")
    ds = upload_dataset(client, key, rt, archive).json()
    assert ds["status"] == "ready"
    assert (ds["layout"], ds["num_examples"], ds["has_groups"]) == ("waterbirds", 40, True)
    assert ds["group_names"] == ["landbird_on_land", "landbird_on_water", "waterbird_on_land",
                                 "waterbird_on_water"]
    model = upload(client, key, torchscript_bytes(net(2)),
                   {"name": "n2", "num_classes": 2, "input_shape": [3, 32, 32]}).json()
    suite = [{"benchmark": "clean"}, {"benchmark": "groups"},
             {"benchmark": "corruptions", "types": ["brightness"], "severities": [1, 5]}]
    job = _run(client, key, rt, model["id"], ds["id"], suite)
    data = load_npz(rt.settings.data_dir / "datasets" / f"{ds['id']}.npz", "test")
    assert _rows(job) == engine_rows(net(2), data, suite, seed=1)
    metrics = {r["metric"] for r in job["results"] if r["benchmark"] == "groups"}
    assert {"average_accuracy", "worst_group_accuracy", "accuracy"} <= metrics


@pytest.mark.slow
def test_every_natural_benchmark_on_builtin_data(env: Any) -> None:
    client, key, rt = env
    model = upload(client, key, torchscript_bytes(net(2)),
                   {"name": "wb", "num_classes": 2, "input_shape": [3, 32, 32]}).json()
    suite = [*NATURAL, {"benchmark": "groups"}, {"benchmark": "spurious_shift"}]
    job = _run(client, key, rt, model["id"], "waterbirds-32", suite,
               dataset_params={"correlation": 0.9})
    benches = {r["benchmark"] for r in job["results"]}
    assert benches == {"fg_bg_noise", "backgrounds", "corruptions", "groups", "spurious_shift"}
    shifts = {r["params"].get("shift") for r in job["results"]
              if r["benchmark"] == "spurious_shift"}
    assert {"kept", "removed", "reversed"} <= shifts
    for r in job["results"]:  # every metric the engine reports is in the contract's table
        assert r["metric"] in BENCHMARK_METRICS[r["benchmark"]], r
    board = client.get("/leaderboard", headers=auth(key), params={
        "dataset": "waterbirds-32", "benchmark": "groups",
        "metric": "worst_group_accuracy"}).json()
    assert [r["evaluation_id"] for r in board["rows"]] == [job["id"]]


def test_bad_dataset_uploads(env: Any, tmp_path: Path) -> None:
    client, key, rt = env
    junk = tmp_path / "x.zip"
    junk.write_bytes(b"not an archive at all")
    failed = upload_dataset(client, key, rt, junk).json()
    assert failed["status"] == "failed"
    assert failed["error"]["status"] == 422
    manifest = write_zip(tmp_path / "m.zip", {
        "manifest.csv": b"path,label\nmissing.png,0\nimg.png,x\n",
        "img.png": png(np.zeros((8, 8, 3), np.uint8))})
    body = upload_dataset(client, key, rt, manifest).json()
    assert body["status"] == "failed"
    assert body["error"]["type"].endswith("dataset-bad-row")
    assert {e["path"] for e in body["error"]["errors"]} == {"missing.png", "img.png"}
    # Nothing of a failed upload stays on disk: no archive, no canonical file.
    assert sorted(p.name for p in (rt.settings.data_dir / "datasets").iterdir()
                  if body["id"] in p.name) == []
    # An evaluation on a dataset that is not ready is a 409 naming the field.
    model = upload(client, key, torchscript_bytes(net(2)),
                   {"name": "n2", "num_classes": 2, "input_shape": [3, 32, 32]}).json()
    refused = client.post("/evaluations", headers=auth(key), json={
        "model_id": model["id"], "dataset": body["id"], "suite": [{"benchmark": "clean"}]})
    assert refused.status_code == 409, refused.text
    assert refused.json()["type"].endswith("dataset-not-ready")
    assert refused.json()["field"] == "dataset"
    with imagenet9_archive(tmp_path / "in9.zip").open("rb") as f:
        resp = client.post("/datasets", headers=auth(key), files={"file": ("in9.zip", f)},
                           data={"name": "shapes-32"})
    assert resp.status_code == 409  # a built-in's name


@pytest.mark.parametrize(("channels", "shape"), [(None, [1, 8, 8]), (3, [3, 8, 8])])
@pytest.mark.slow
def test_the_channels_option_reaches_the_workers_ingest(env: Any, tmp_path: Path,
                                                        channels: int | None,
                                                        shape: list[int]) -> None:
    client, key, rt = env
    grey = [np.full((8, 8), 40 * i, dtype=np.uint8) for i in range(4)]
    files = {f"{i}.png": png(img) for i, img in enumerate(grey)}
    files["manifest.csv"] = ("path,label\n" + "".join(f"{i}.png,{i % 2}\n" for i in range(4))
                             ).encode()
    ds = upload_dataset(client, key, rt, write_zip(tmp_path / "g.zip", files),
                        f"grey-{channels}", channels=channels).json()
    assert ds["status"] == "ready", ds
    assert ds["input_shape"] == shape
    bad = client.post("/datasets", headers=auth(key), files={"file": ("g.zip", b"x")},
                      data={"channels": "2"})
    assert bad.status_code == 422
    assert bad.json()["field"] == "channels"
