"""The compose deployment's users, for real: the API process runs as the api image's user and
creates the data folder's contents (uploads, database, broker); the worker runs as the worker
image's user, takes the ingest from the broker and writes the dataset beside the upload. The
users, the data folder's owner and the environment are read from the Dockerfile, so an image
whose API runs as root (creating folders the worker cannot write) fails here.

Needs root, to become those users. Python must be reachable by them: where this checkout's
interpreter sits under a folder only root may enter (a ``/root/.pyenv`` install), the processes
keep CAP_DAC_READ_SEARCH, which lets them find and read files but write none; bubblewrap refuses
to run with a capability, so the worker then runs with the sandbox off. Writes, the point of
this test, are checked as the plain user either way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.service.ingest_fixtures import png, write_zip
from tests.test_deploy_files import _image_env, _image_user

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

_API = """
import sys
from fastapi.testclient import TestClient
from service.app import create_app
from core.keys import create_key
from core.db import make_engine, make_sessionmaker, transaction
from core.migrate import upgrade
from core.settings import get_settings

cfg = get_settings()
upgrade(cfg.database_url)  # what compose's migrate service does, from the same image
engine = make_engine(cfg.database_url)
with transaction(make_sessionmaker(engine)) as s:
    key = create_key(s, "deploy")
with TestClient(create_app(cfg)) as client, open(sys.argv[1], "rb") as f:
    resp = client.post("/datasets", headers={"Authorization": f"Bearer {key}"},
                       files={"file": ("shapes.zip", f)})
assert resp.status_code == 202, resp.text
print(resp.json()["id"])
"""


_STATUS = """
import json, sqlite3, sys
with sqlite3.connect(sys.argv[1]) as db:
    row = db.execute("SELECT status, json_extract(info, '$.num_examples'), error "
                     "FROM datasets WHERE id = ?", (sys.argv[2],))
    print(json.dumps(row.fetchone()))
"""


def _reachable(path: Path) -> bool:
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents] if p.is_dir())


def _as(uid: int, gid: int) -> tuple[list[str], bool]:
    """The command prefix that runs as ``uid:gid``, and whether it keeps the read capability
    (see the module's note)."""
    if uid == 0:
        return [], False
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to become the image's user"
    prefix = [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
    python = Path(os.path.realpath(sys.executable))
    keep = not (_reachable(python.parent) and _reachable(ROOT))
    if keep:
        prefix += ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    return prefix, keep


@pytest.fixture
def volume() -> Iterator[Path]:
    """A fresh named volume: Docker creates it from the image's /data (owner and mode)."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run as the images' users")
    outer = Path(tempfile.mkdtemp(prefix="rs-volume-"))
    os.chmod(outer, 0o755)
    data = outer / "data"
    data.mkdir()
    uid, gid = _image_user("worker")
    os.chown(data, uid, gid)
    os.chmod(data, 0o750)
    try:
        yield data
    finally:
        shutil.rmtree(outer, ignore_errors=True)


def _env(stage: str, data: Path, **extra: str) -> dict[str, str]:
    image = _image_env(stage)
    assert image["ROBUSTSCOPE_DATA_DIR"] == "/data"
    keep = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTSCOPE_")}
    return {**keep, "ROBUSTSCOPE_DATA_DIR": str(data), "HOME": str(data),
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", **extra}


def _owners(folder: Path) -> set[tuple[int, int]]:
    return {(p.stat().st_uid, p.stat().st_gid) for p in [folder, *folder.rglob("*")]}


def test_the_worker_user_ingests_what_the_api_user_uploaded(volume: Path) -> None:
    api_uid, api_gid = _image_user("api")
    worker_uid, worker_gid = _image_user("worker")
    rng = np.random.default_rng(0)
    archive = write_zip(volume.parent / "shapes.zip",
                        {f"c{i % 2}/img{i}.png": png(rng.integers(0, 255, (8, 8, 3), np.uint8))
                         for i in range(8)})
    os.chmod(archive, 0o644)

    api_prefix, _ = _as(api_uid, api_gid)
    made = subprocess.run([*api_prefix, sys.executable, "-c", _API, str(archive)], cwd=ROOT,
                          env=_env("api", volume), capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    dataset_id = made.stdout.strip().splitlines()[-1]
    assert (volume / "datasets").is_dir()

    worker_prefix, keeps_cap = _as(worker_uid, worker_gid)
    extra = {"ROBUSTSCOPE_SANDBOX": "off"} if keeps_cap else {}
    log = volume.parent / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [*worker_prefix, sys.executable, "-m", "robustscope.cli", "worker", "--queues",
             "ingest"],
            cwd=ROOT, env=_env("worker", volume, **extra), stdout=out, stderr=subprocess.STDOUT)
    try:
        status = "ingesting"
        deadline = time.monotonic() + 300
        while status == "ingesting" and time.monotonic() < deadline:
            assert worker.poll() is None, log.read_text()[-3000:]
            time.sleep(1)
            # Read as the worker's user: a root reader could leave root-owned journal files.
            read = subprocess.run([*worker_prefix, sys.executable, "-c", _STATUS,
                                   str(volume / "robustscope.db"), dataset_id.replace("-", "")],
                                  capture_output=True, text=True, timeout=60)
            assert read.returncode == 0, read.stderr[-2000:]
            status, num_examples, error = json.loads(read.stdout)
        assert (status, num_examples) == ("ready", 8), (error, log.read_text()[-3000:])
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()

    npz = volume / "datasets" / f"{dataset_id}.npz"
    assert npz.exists()
    assert npz.stat().st_uid == worker_uid
    # One owner for everything in the volume: the API's files and the worker's alike.
    assert _owners(volume) == {(worker_uid, worker_gid)}
    health = subprocess.run([*worker_prefix, sys.executable, "-m", "workers.health"], cwd=ROOT,
                            env=_env("worker", volume), capture_output=True, text=True,
                            timeout=120)
    assert health.returncode == 0, health.stderr
