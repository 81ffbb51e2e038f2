"""Load on ``robustscope api`` over PostgreSQL: polling at a fixed rate plus concurrent
submissions, for a fixed time; prints requests/s, p50/p99 latency and errors.

    uv run python benchmarks/api_load.py [--rate 300] [--duration 60] [--pollers 16]
        [--submitters 20] [--workers 2] [--pg postgresql://postgres@127.0.0.1:5432/postgres]
        [--redis redis://127.0.0.1:6379/13]

It creates a private database on the given server, migrates it, starts ``robustscope api``
with ``--workers`` processes against it and Redis (a database number of its own), creates
evaluations to poll, then runs:

- ``--pollers`` connections that together send ``GET /evaluations/{id}`` at ``--rate``
  requests/s, on a fixed schedule (open loop: a late answer does not slow the schedule, and
  latency counts from the scheduled time, so a stalled server shows in p99);
- ``--submitters`` connections that each ``POST /evaluations`` back to back.

Quotas are turned off for the run (the submissions would otherwise meet the active-jobs
quota). At the end the server is stopped, the database dropped and the queue it filled in
Redis deleted (only that key).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import redis

from service.auth.keys import create_key
from service.db import make_engine, make_sessionmaker, transaction
from service.migrate import upgrade

ARCHITECTURE = "small_cnn"


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    start: float = 0.0
    last: float = 0.0

    def add(self, seconds: float, error: str | None) -> None:
        self.latencies.append(seconds)
        self.last = time.perf_counter()
        if error is not None:
            self.errors[error] = self.errors.get(error, 0) + 1

    def line(self, name: str) -> str:
        """Requests/s are those answered over the time until the last answer: a server
        that falls behind the schedule shows a lower rate, not the target's."""
        lat = sorted(self.latencies)
        if not lat:
            return f"{name}: no requests"
        duration = self.last - self.start
        p50 = statistics.median(lat) * 1000
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000
        errors = sum(self.errors.values())
        detail = f" {self.errors}" if self.errors else ""
        return (f"{name}: {len(lat) / duration:.1f} requests/s, p50 {p50:.1f} ms, "
                f"p99 {p99:.1f} ms, max {lat[-1] * 1000:.1f} ms, errors {errors}{detail}")


async def poll(client: httpx.AsyncClient, ids: list[str], start: float, interval: float,
               offset: int, stride: int, end: float, tally: Tally) -> None:
    n = offset
    while True:
        due = start + n * interval
        if due >= end:
            return
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        error = None
        try:
            resp = await client.get(f"/evaluations/{ids[n % len(ids)]}")
            if resp.status_code != 200:
                error = str(resp.status_code)
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        tally.add(time.perf_counter() - due, error)
        n += stride


async def submit(client: httpx.AsyncClient, body: dict[str, object], start: float,
                 end: float, tally: Tally) -> None:
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    while time.perf_counter() < end:
        sent = time.perf_counter()
        error = None
        try:
            resp = await client.post("/evaluations", json=body)
            if resp.status_code != 202:
                error = str(resp.status_code)
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        tally.add(time.perf_counter() - sent, error)


async def run_load(base: str, key: str, args: argparse.Namespace, ids: list[str],
                   body: dict[str, object]) -> tuple[Tally, Tally]:
    headers = {"Authorization": f"Bearer {key}"}

    def client() -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=base, headers=headers, timeout=30,
                                 limits=httpx.Limits(max_connections=1))

    pollers = [client() for _ in range(args.pollers)]
    submitters = [client() for _ in range(args.submitters)]
    start = time.perf_counter() + 0.5
    polled, submitted = Tally(start=start), Tally(start=start)
    end = start + args.duration
    interval = 1.0 / args.rate
    try:
        await asyncio.gather(
            *(poll(c, ids, start, interval, i, args.pollers, end, polled)
              for i, c in enumerate(pollers)),
            *(submit(c, body, start, end, submitted) for c in submitters))
    finally:
        for c in pollers + submitters:
            await c.aclose()
    return polled, submitted


def cpu_seconds(root: int) -> float:
    """User + system CPU seconds of ``root`` and its children (the API's worker processes)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry), int(fields[1])
        if pid == root or ppid == root:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def wait_ready(base: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("robustscope api exited during start-up")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("robustscope api did not start")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=300.0, help="polling requests/s in total")
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--pollers", type=int, default=16)
    p.add_argument("--submitters", type=int, default=20)
    p.add_argument("--workers", type=int, default=2, help="API processes")
    p.add_argument("--port", type=int, default=8791)
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    args = p.parse_args()

    name = f"robustscope_load_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.pg, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = "postgresql+psycopg://" + args.pg.split("://", 1)[1].rsplit("/", 1)[0] + f"/{name}"
    data_dir = Path(f"/tmp/{name}")
    proc: subprocess.Popen[bytes] | None = None
    try:
        upgrade(url)
        engine = make_engine(url)
        with transaction(make_sessionmaker(engine)) as s:
            key = create_key(s, "load")
        engine.dispose()
        env = {**os.environ, "ROBUSTSCOPE_DATABASE_URL": url, "ROBUSTSCOPE_BROKER_URL": args.redis,
               "ROBUSTSCOPE_DATA_DIR": str(data_dir), "ROBUSTSCOPE_QUOTA_ACTIVE_JOBS": "0"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "api", "--host", "127.0.0.1", "--port",
             str(args.port), "--workers", str(args.workers), "--log-level", "warning"], env=env)
        base = f"http://127.0.0.1:{args.port}"
        wait_ready(base, proc)
        headers = {"Authorization": f"Bearer {key}"}
        model_id = upload_model(base, headers)
        body: dict[str, object] = {"model_id": model_id, "dataset": "colored-mnist",
                                   "suite": [{"benchmark": "clean"}]}
        ids = [httpx.post(f"{base}/evaluations", json=body, headers=headers).json()["id"]
               for _ in range(50)]
        cpu_before = cpu_seconds(proc.pid)
        polled, submitted = asyncio.run(run_load(base, key, args, ids, body))
        cpu = cpu_seconds(proc.pid) - cpu_before
        answered = len(polled.latencies) + len(submitted.latencies)
        print(f"{args.duration:.0f} s, target {args.rate:.0f} polls/s over {args.pollers} "
              f"connections, {args.submitters} submitters, {args.workers} API processes, "
              f"{os.cpu_count()} CPUs")
        print(polled.line("poll GET /evaluations/{id}"))
        print(submitted.line("submit POST /evaluations"))
        print(f"API processes: {cpu:.1f} CPU-seconds for {answered} requests, "
              f"{1000 * cpu / max(answered, 1):.2f} ms of CPU per request")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        with psycopg.connect(args.pg, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        redis.Redis.from_url(args.redis).delete("evaluations")
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0


def upload_model(base: str, headers: dict[str, str]) -> str:
    """A model to evaluate, built without torch: a safetensors file of zeros shaped like the
    registry's small CNN."""
    import json
    import struct

    shapes = small_cnn_shapes()
    header: dict[str, object] = {}
    offset = 0
    for tensor, shape in shapes.items():
        size = 4
        for dim in shape:
            size *= dim
        header[tensor] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    blob = struct.pack("<Q", len(raw)) + raw + bytes(offset)
    meta = {"name": "load", "architecture": ARCHITECTURE, "num_classes": 2,
            "input_shape": [3, 28, 28]}
    resp = httpx.post(f"{base}/models", headers=headers, files={"file": ("m.safetensors", blob)},
                      data={"metadata": json.dumps(meta)})
    if resp.status_code != 201:
        raise SystemExit(f"model upload failed: {resp.status_code} {resp.text}")
    return str(resp.json()["id"])


def small_cnn_shapes() -> dict[str, list[int]]:
    """The registry's shapes for the small CNN, with 4 classes and 3 input channels."""
    import json
    from importlib import resources

    table = json.loads(resources.files("service.models").joinpath("architectures.json")
                       .read_text())
    return {k: [2 if d == "K" else 3 if d == "C" else int(d) for d in shape]
            for k, shape in table[ARCHITECTURE].items()}


if __name__ == "__main__":
    sys.exit(main())
