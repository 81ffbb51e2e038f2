"""The embedded shape end to end: `robustscope up` in a subprocess, driven over HTTP and by the
`robustscope evaluate` client a CI pipeline would run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.factories import torchscript_bytes
from tests.service.test_flow import META, trained_shapes_cnn

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    work = tmp_path_factory.mktemp("up")
    port = _free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ROBUSTSCOPE_")} | {"PYTHONUNBUFFERED": "1"}
    log = (work / "up.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "robustscope.cli", "up", "--port", str(port),
                             "--data-dir", str(work / "var")], cwd=work, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    key = ""
    while time.monotonic() - start < 120:
        text = (work / "up.log").read_text()
        if "API key" in text:
            key = text.split("API key (owner 'local'): ")[1].split()[0]
            break
        assert proc.poll() is None, text
        time.sleep(0.2)
    assert key, (work / "up.log").read_text()
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    yield url, key, work
    proc.terminate()
    proc.wait(timeout=30)


def test_up_serves_a_healthy_embedded_stack(up: tuple[str, str, Path]) -> None:
    url, key, work = up
    ready = httpx.get(f"{url}/ready").json()
    assert ready["checks"] == {"database": "ok", "broker": "ok"}
    assert ready["sandbox"] == "on"
    assert (work / "var" / "robustscope.db").exists()
    names = [d["name"] for d in httpx.get(f"{url}/datasets",
                                          headers={"Authorization": f"Bearer {key}"}
                                          ).json()["items"]]
    assert "shapes-32" in names


def test_curl_style_flow_and_the_cli_client(up: tuple[str, str, Path]) -> None:
    url, key, work = up
    ckpt = work / "model.pt"
    ckpt.write_bytes(torchscript_bytes(trained_shapes_cnn(epochs=2)))
    (work / "meta.json").write_text(json.dumps(META))
    (work / "suite.json").write_text(json.dumps([
        {"benchmark": "clean"},
        {"benchmark": "adversarial", "attack": "pgd", "norm": "linf", "eps": [8 / 255],
         "steps": 5}]))
    cmd = [sys.executable, "-m", "robustscope.cli", "evaluate", str(ckpt), "--metadata",
           str(work / "meta.json"), "--dataset", "shapes-32", "--suite", str(work / "suite.json"),
           "--server", url, "--api-key", key, "--wait", "--interval", "0.3"]
    ok = subprocess.run([*cmd, "--min", "clean.accuracy=0.3"], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "robust_accuracy" in ok.stdout
    assert "succeeded" in ok.stderr  # the progress line on stderr
    lines = [ln.split() for ln in ok.stdout.splitlines()]
    # clean accuracy has no params: benchmark, metric, value, n, then the interval
    row = next(ln for ln in lines if ln[:2] == ["clean", "accuracy"])
    acc, n = float(row[2]), int(row[3])
    assert n > 0
    assert row[4].startswith("[")
    gate = subprocess.run([*cmd, "--min", f"accuracy={acc + 0.01:.4f}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert gate.returncode == 3, gate.stderr
    assert f"threshold not met: clean.accuracy {acc:.4f} < {float(f'{acc + 0.01:.4f}'):g}" in \
        gate.stderr
    missing = subprocess.run([*cmd, "--min", "no_such_metric=0.1"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 3
    refused = subprocess.run([*cmd[:-3], "--api-key", "wrong"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 4
    assert "401" in refused.stderr


def _wait_for(what: str, check: Callable[[], bool], seconds: float = 300) -> None:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < seconds, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_up_says_when_each_worker_is_ready(up: tuple[str, str, Path]) -> None:
    _url, _key, work = up
    log = work / "up.log"
    text = log.read_text()
    assert "jobs posted now wait in the queue until a worker says it is ready" in text
    _wait_for("both ready lines", lambda: all(
        f"{name} ready after" in log.read_text() for name in ("worker", "ingest")))
    lines = log.read_text().splitlines()
    assert any(ln.startswith("worker ready after") and "evaluations and trainings start now"
               in ln for ln in lines)
    assert any(ln.startswith("ingest ready after") and "dataset ingests start now" in ln
               for ln in lines)


def test_an_upload_is_ingested_while_a_training_holds_the_other_worker(
        up: tuple[str, str, Path]) -> None:
    from tests.service.ingest_fixtures import png, solid, write_zip

    url, key, work = up
    headers = {"Authorization": f"Bearer {key}"}
    training = httpx.post(f"{url}/trainings", headers=headers, json={
        "dataset": "shapes-32", "architecture": "small_cnn", "method": "standard",
        "epochs": 1000, "batch_size": 32, "eval_examples": 8}).json()
    _wait_for("the training to start", lambda: httpx.get(
        f"{url}/trainings/{training['id']}", headers=headers).json()["status"] == "running")
    files = {f"set/test/{c}/{i}.png": png(solid(rgb, (8, 8)))
             for c, rgb in (("red", (250, 0, 0)), ("blue", (0, 0, 250))) for i in range(3)}
    archive = write_zip(work / "colours.zip", files)
    with archive.open("rb") as f:
        posted = httpx.post(f"{url}/datasets", headers=headers,
                            files={"file": ("colours.zip", f)})
    assert posted.status_code == 202, posted.text

    def dataset_status() -> str:
        status: str = httpx.get(f"{url}/datasets/{posted.json()['id']}",
                                headers=headers).json()["status"]
        return status

    _wait_for("the ingest", lambda: dataset_status() != "ingesting", seconds=180)
    assert dataset_status() == "ready"
    assert httpx.get(f"{url}/trainings/{training['id']}",
                     headers=headers).json()["status"] == "running"
    httpx.post(f"{url}/trainings/{training['id']}/cancel", headers=headers)
    _wait_for("the cancel", lambda: httpx.get(  # the worker idle again before up stops
        f"{url}/trainings/{training['id']}", headers=headers).json()["status"] == "cancelled",
        seconds=120)


def test_up_help_explains_every_flag() -> None:
    from robustscope.cli import parser

    up = next(a for a in parser()._subparsers._group_actions[0].choices.items()  # type: ignore[union-attr]
              if a[0] == "up")[1]
    flags = [a for a in up._actions if a.option_strings and a.dest != "help"]
    assert sorted(a.dest for a in flags) == ["data_dir", "host", "port", "workers"]
    for action in flags:
        assert action.help, action.dest
    text = up.format_help()
    assert "--port PORT" in text
    assert "(default: 8000)" in text
