"""One evaluation as one job and as two shards, on two `robustscope worker` processes with one
thread each: the wall-time ratio, and whether the results are identical.

The service runs as in production, on one machine: the API (in this process), two workers
(`--name bench-1`, `bench-2`, `ROBUSTSCOPE_THREADS=1`, the sandbox on) with folders of their own
and a store of their own (`file://`, so checkpoints are read in place and job state goes
through the store by content hash), SQLite and the SQLAlchemy broker. The evaluation is a clean
pass and an APGD-CE and APGD-T cascade (``--steps``) at two eps on ``--examples`` images of
``shapes-32``, for the engine's small CNN (untrained: speed does not depend on the weights,
only on how many examples are still robust). The workers are ready before either evaluation
is submitted; each is timed from its submission to ``succeeded`` (the sharded one includes its
merge). Results are compared without the cost rows (seconds and pass counts: measurements).

    uv run --extra worker python benchmarks/shards.py
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from fastapi.testclient import TestClient

from core.db import make_engine, make_sessionmaker, transaction
from core.keys import create_key
from core.migrate import upgrade
from core.settings import Settings
from service.app import create_app
from workers.engine import nets

ROOT = Path(__file__).resolve().parent.parent
META = {"name": "bench", "num_classes": 4, "input_shape": [3, 32, 32]}
COST = {"attack_seconds", "forward_passes", "backward_passes"}


def _worker(root: Path, name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    folder = root / name
    folder.mkdir()
    log = (root / f"{name}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "robustscope.cli", "worker", "--name", name, "--queues",
         "evaluations,webhooks"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, **env, "ROBUSTSCOPE_DATA_DIR": str(folder)})


def _ready(root: Path, names: list[str], timeout: float = 600) -> None:
    host = socket.gethostname()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = [(root / f"{n}.log").read_text(errors="replace") for n in names]
        if all(f"{n}@{host} ready." in text for n, text in zip(names, logs, strict=True)):
            return
        time.sleep(0.5)
    raise SystemExit(f"the workers did not start; see {root}/*.log")


def _run(client: TestClient, headers: dict[str, str], body: dict[str, Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    resp = client.post("/evaluations", headers=headers, json=body)
    assert resp.status_code == 202, resp.text
    path = f"/evaluations/{resp.json()['id']}"
    while True:
        record = client.get(path, headers=headers).json()
        if record["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.2)
    seconds = time.perf_counter() - start
    if record["status"] != "succeeded":
        raise SystemExit(f"the evaluation {record['status']}: {record['error']}")
    return seconds, record


def _comparable(record: dict[str, Any]) -> tuple[Any, Any]:
    rows = [(r["benchmark"], r["metric"], r["value"], json.dumps(r["params"], sort_keys=True))
            for r in record["results"] if r["metric"] not in COST]
    return rows, record["checks"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rs-shards-") as tmp:
        root = Path(tmp)
        (root / "store").mkdir()
        (root / "api").mkdir()
        env = {"ROBUSTSCOPE_DATABASE_URL": f"sqlite:///{root / 'db.sqlite'}",
               "ROBUSTSCOPE_BROKER_URL": f"sqla+sqlite:///{root / 'broker.sqlite'}",
               "ROBUSTSCOPE_STORAGE_URL": (root / "store").as_uri(),
               "ROBUSTSCOPE_BATCH_SIZE": str(args.batch_size), "ROBUSTSCOPE_THREADS": "1",
               "ROBUSTSCOPE_PRECISION": "fp32", "PYTHONWARNINGS": "ignore"}
        upgrade(env["ROBUSTSCOPE_DATABASE_URL"])
        engine = make_engine(env["ROBUSTSCOPE_DATABASE_URL"])
        with transaction(make_sessionmaker(engine)) as s:
            key = create_key(s, "bench")
        names = ["bench-1", "bench-2"]
        procs = [_worker(root, n, env) for n in names]
        try:
            _ready(root, names)
            cfg = Settings(data_dir=root / "api", database_url=env["ROBUSTSCOPE_DATABASE_URL"],
                           broker_url=env["ROBUSTSCOPE_BROKER_URL"],
                           storage_url=env["ROBUSTSCOPE_STORAGE_URL"],
                           batch_size=args.batch_size)
            headers = {"Authorization": f"Bearer {key}"}
            torch.manual_seed(0)
            buf = io.BytesIO()
            torch.jit.save(torch.jit.script(nets.small_cnn(4, 3).eval()), buf)
            with TestClient(create_app(cfg)) as client:
                model = client.post("/models", headers=headers,
                                    files={"file": ("m.pt", buf.getvalue())},
                                    data={"metadata": json.dumps(META)})
                assert model.status_code == 201, model.text
                body = {"model_id": model.json()["id"], "dataset": "shapes-32", "seed": 1,
                        "n_examples": args.examples, "suite": [
                            {"benchmark": "clean"},
                            {"benchmark": "adversarial", "attack": "fast", "norm": "linf",
                             "eps": [1 / 255, 4 / 255], "steps": args.steps}]}
                one_s, one = _run(client, headers, {**body, "shards": 1})
                two_s, two = _run(client, headers, {**body, "shards": 2})
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=30)
    same = _comparable(one) == _comparable(two)
    workers = sorted(s["worker"] for s in two["shards"])
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"{args.examples} examples of shapes-32, batch {args.batch_size}, APGD-CE + APGD-T "
          f"({args.steps} steps) at 2 eps; 2 workers, 1 thread each; {cpu}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"1 shard : {one_s:7.1f} s (worker {one['worker']})")
    print(f"2 shards: {two_s:7.1f} s (shards on {', '.join(workers)}; merge on {two['worker']})")
    print(f"ratio 2 shards / 1 shard: {two_s / one_s:.2f}; results identical: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
