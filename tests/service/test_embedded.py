"""The embedded shape end to end: `robustscope up` in a subprocess, driven over HTTP and by the
`robustscope evaluate` client a CI pipeline would run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
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
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "up", "--port", str(port),
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
    cmd = [sys.executable, "-m", "service.cli", "evaluate", str(ckpt), "--metadata",
           str(work / "meta.json"), "--dataset", "shapes-32", "--suite", str(work / "suite.json"),
           "--server", url, "--api-key", key, "--wait", "--interval", "0.3"]
    ok = subprocess.run([*cmd, "--min", "clean.accuracy=0.3"], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "robust_accuracy" in ok.stdout
    assert "succeeded" in ok.stderr  # the progress line on stderr
    lines = [ln.split() for ln in ok.stdout.splitlines()]
    acc = float(next(ln[-1] for ln in lines if ln[:2] == ["clean", "accuracy"]))
    gate = subprocess.run([*cmd, "--min", f"accuracy={acc + 0.01:.4f}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert gate.returncode == 3, gate.stderr
    assert "threshold not met: accuracy" in gate.stderr
    missing = subprocess.run([*cmd, "--min", "no_such_metric=0.1"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 3
    refused = subprocess.run([*cmd[:-3], "--api-key", "wrong"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 4
    assert "401" in refused.stderr
