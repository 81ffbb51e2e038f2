"""How long a cancel takes to stop a running job: from ``POST /evaluations/{id}/cancel`` to the
job's jailed child killed and ``cancelled`` recorded, with the production heartbeat (5 s).

    uv run python benchmarks/cancel_latency.py [--runs 4] [--poll 0.4]

Each run submits an evaluation of a model whose forward pass never returns, runs it in a worker
(a thread of this process, the model in its jail), waits a random 0-5 s into the endless forward
pass, cancels it through the API and measures until the status is recorded. The reference row
reads the cancel flag only with the heartbeat (``CANCEL_POLL_INTERVAL`` = the heartbeat), as
the worker did before the flag was read between heartbeats; the other uses ``--poll``.
"""

from __future__ import annotations

import argparse
import io
import random
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import torch
from fastapi.testclient import TestClient
from torch import Tensor, nn

from core.db import make_engine, make_sessionmaker, transaction
from core.keys import create_key
from core.migrate import upgrade
from core.settings import Settings
from core.tables import Evaluation, Model
from service.app import create_app
from workers import evaluation_jobs
from workers.runtime import Runtime

META = {"name": "spins", "num_classes": 4, "input_shape": [3, 32, 32]}


class Spins(nn.Module):
    """Never returns: one forward pass loops forever."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        y = x
        while bool(y.sum() > -1.0):
            y = y * 1.0
        return self.fc(y.mean((2, 3)))


def _scripted(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buf)
    return buf.getvalue()


def _job(rt: Runtime, model: bytes) -> uuid.UUID:
    model_id = uuid.uuid4()
    rel = f"models/{model_id}.pt"
    path = rt.settings.data_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model)
    with rt.sessions.begin() as s:
        s.add(Model(id=model_id, owner="bench", name="spins", format="torchscript",
                    num_classes=4, input_shape=[3, 32, 32], model_metadata=META,
                    sha256="0" * 64, size_bytes=len(model), storage_path=rel))
        s.flush()
        ev = Evaluation(owner="bench", model_id=model_id, model_name="spins",
                        dataset="shapes-32", dataset_params={}, split="test",
                        suite=[{"benchmark": "clean"}], seed=0, checks=[], artifacts={},
                        completed_entries=[], timings={}, status="queued")
        s.add(ev)
        s.flush()
        return ev.id


def _row(rt: Runtime, eid: uuid.UUID) -> Evaluation:
    with rt.sessions() as s:
        row = s.get(Evaluation, eid)
        assert row is not None
        return row


def _measure(work: Path, poll: float, runs: int, seed: int) -> list[float]:
    url = f"sqlite:///{work / 'robustscope.db'}"
    upgrade(url)
    cfg = Settings(database_url=url, data_dir=work / "data",
                   broker_url=f"sqla+sqlite:///{work / 'broker.db'}",
                   cancel_poll_interval=poll, sandbox_memory_limit=8 << 30)
    engine = make_engine(url)
    rt = Runtime(settings=cfg, engine=engine, sessions=make_sessionmaker(engine),
                 device=torch.device("cpu"), name="bench-worker")
    with transaction(make_sessionmaker(engine)) as s:
        key = create_key(s, "bench")
    model = _scripted(Spins())
    rng = random.Random(seed)
    out: list[float] = []
    try:
        with TestClient(create_app(cfg)) as client:
            for _ in range(runs):
                eid = _job(rt, model)
                worker = threading.Thread(target=evaluation_jobs.run, args=(rt, eid))
                worker.start()
                deadline = time.monotonic() + 120
                while _row(rt, eid).progress_stage != "loading":
                    if time.monotonic() > deadline:
                        raise RuntimeError("the job did not start")
                    time.sleep(0.02)
                time.sleep(0.3 + rng.uniform(0, cfg.heartbeat_interval))
                asked = datetime.now(UTC).replace(tzinfo=None)
                resp = client.post(f"/evaluations/{eid}/cancel",
                                   headers={"Authorization": f"Bearer {key}"})
                resp.raise_for_status()
                worker.join(timeout=30)
                row = _row(rt, eid)
                done = row.finished_at
                if row.status != "cancelled" or done is None:
                    raise RuntimeError(f"the job ended {row.status}, not cancelled")
                done = done.astimezone(UTC).replace(tzinfo=None) if done.tzinfo else done
                out.append((done - asked).total_seconds())
    finally:
        if rt._jail is not None:
            rt._jail.close()
        engine.dispose()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--poll", type=float, default=Settings().cancel_poll_interval)
    args = p.parse_args()
    heartbeat = Settings().heartbeat_interval
    rows = []
    for label, poll in ((f"flag read with the heartbeat only ({heartbeat:g} s), reference",
                         heartbeat), (f"CANCEL_POLL_INTERVAL={args.poll:g} s", args.poll)):
        work = Path(tempfile.mkdtemp(prefix="rs-cancel-"))
        try:
            rows.append((label, _measure(work, poll, args.runs, seed=1)))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"cancel of a running job: request to `cancelled` recorded, {args.runs} runs each, "
          f"heartbeat {heartbeat:g} s")
    print("| worker | p50 (s) | max (s) | each (s) |")
    print("|---|---|---|---|")
    for label, times in rows:
        print(f"| {label} | {statistics.median(times):.2f} | {max(times):.2f} | "
              + ", ".join(f"{t:.2f}" for t in times) + " |")


if __name__ == "__main__":
    main()
