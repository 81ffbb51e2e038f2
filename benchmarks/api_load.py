"""Load on ``robustscope api`` over PostgreSQL: polling at a fixed rate plus concurrent
submissions, for a fixed time; prints requests/s, p50/p99 latency and errors.

    uv run python benchmarks/api_load.py [--rate 300] [--duration 60] [--pollers 16]
        [--submitters 20] [--submit-rate 20] [--workers 2] [--pg postgresql://postgres@127.0.0.1:5432/postgres]
        [--redis redis://127.0.0.1:6379/13] [--conditional]

It creates a private database on the given server, migrates it, starts ``robustscope api``
with ``--workers`` processes against it and Redis (a database number of its own), creates
evaluations to poll, then runs:

- ``--pollers`` connections that together send ``GET /evaluations/{id}`` at ``--rate``
  requests/s, on a fixed schedule (open loop: a late answer does not slow the schedule, and
  latency counts from the scheduled time, so a stalled server shows in p99);
- ``--submitters`` connections that together send ``POST /evaluations`` at
  ``--submit-rate`` requests/s, on a fixed schedule too (20 CI jobs submitting one
  evaluation a second each, by default); ``--submit-rate 0`` makes each submitter send back
  to back instead, a stress test that takes whatever the server gives it.

``--conditional`` makes the pollers send ``If-None-Match`` with the ``ETag`` of their last
answer for that job, as a careful client would (unchanged jobs answer 304 with no body).

The load generator runs on the same cores as the server, so it is as lean as a client can be:
raw keep-alive HTTP/1.1 on asyncio streams under uvloop (httpx cost about as much CPU per
request as the server did). It prints its own CPU beside the API processes'.

Quotas are turned off for the run (the submissions would otherwise meet the active-jobs
quota). At the end the server is stopped, the database dropped and the queue it filled in
Redis deleted (only that key).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
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
import uvloop

from core.db import make_engine, make_sessionmaker, transaction
from core.keys import create_key
from core.migrate import upgrade

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


class Connection:
    """One keep-alive HTTP/1.1 connection, as lean as a client can be: prebuilt request bytes,
    the status line and ``Content-Length`` parsed, nothing else. The load generator shares the
    machine's cores with the API; httpx spent about as much CPU per request as the server."""

    def __init__(self, host: str, port: int, key: str) -> None:
        self.host, self.port = host, port
        self.head = (f"Host: {host}:{port}\r\nAuthorization: Bearer {key}\r\n").encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes | None = None,
                      extra: bytes = b"") -> tuple[int, bytes, bytes]:
        """Status, head (lowered) and body of one request."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        message = f"{method} {path} HTTP/1.1\r\n".encode() + self.head + extra
        if body is not None:
            message += (b"Content-Type: application/json\r\nContent-Length: "
                        + str(len(body)).encode() + b"\r\n\r\n" + body)
        else:
            message += b"\r\n"
        try:
            self.writer.write(message)
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            lowered = head.lower()
            at = lowered.find(b"content-length:")
            if at >= 0:
                length = int(lowered[at + 15:lowered.index(b"\r\n", at)])
            payload = await self.reader.readexactly(length) if length else b""
            if b"connection: close" in lowered:
                await self.close()
            return status, lowered, payload
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def poll(conn: Connection, ids: list[str], start: float, interval: float,
               offset: int, stride: int, end: float, tally: Tally,
               conditional: bool = False) -> None:
    n = offset
    etags: dict[str, bytes] = {}
    while True:
        due = start + n * interval
        if due >= end:
            return
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        error = None
        job = ids[n % len(ids)]
        try:
            extra = etags.get(job, b"") if conditional else b""
            status, head, _ = await conn.request("GET", f"/evaluations/{job}", extra=extra)
            if status == 200 and conditional:
                at = head.find(b"\r\netag:")
                if at >= 0:
                    value = head[at + 7:head.index(b"\r\n", at + 2)].strip()
                    etags[job] = b"If-None-Match: " + value + b"\r\n"
            elif status != 200 and not (conditional and status == 304):
                error = str(status)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            error = type(exc).__name__
        tally.add(time.perf_counter() - due, error)
        n += stride


async def submit(conn: Connection, body: bytes, start: float, interval: float, offset: int,
                 stride: int, end: float, tally: Tally) -> None:
    """``POST /evaluations`` on a fixed schedule (open loop, latency from the scheduled time),
    or back to back when ``interval`` is 0."""
    n = offset
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    while True:
        due = start + n * interval if interval else time.perf_counter()
        if due >= end:
            return
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        error = None
        try:
            status, _, _ = await conn.request("POST", "/evaluations", body)
            if status != 202:
                error = str(status)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            error = type(exc).__name__
        tally.add(time.perf_counter() - due, error)
        n += stride


async def run_load(port: int, key: str, args: argparse.Namespace, ids: list[str],
                   body: dict[str, object]) -> tuple[Tally, Tally]:
    pollers = [Connection("127.0.0.1", port, key) for _ in range(args.pollers)]
    submitters = [Connection("127.0.0.1", port, key) for _ in range(args.submitters)]
    raw = json.dumps(body).encode()
    start = time.perf_counter() + 0.5
    polled, submitted = Tally(start=start), Tally(start=start)
    end = start + args.duration
    interval = 1.0 / args.rate
    try:
        await asyncio.gather(
            *(poll(c, ids, start, interval, i, args.pollers, end, polled, args.conditional)
              for i, c in enumerate(pollers)),
            *(submit(c, raw, start, 1.0 / args.submit_rate if args.submit_rate else 0.0, i,
                     args.submitters, end, submitted)
              for i, c in enumerate(submitters)))
    finally:
        for c in pollers + submitters:
            await c.close()
    return polled, submitted


def cpu_seconds(root: int) -> dict[str, float]:
    """User + system CPU seconds of ``root`` and its children (the API's worker processes),
    and of the database and broker servers on this machine (all their processes)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = {"api": 0.0, "postgres": 0.0, "redis": 0.0}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                name, _, rest = fh.read().partition("(")[2].rpartition(")")
            fields = rest.split()
        except OSError:
            continue
        pid, ppid = int(entry), int(fields[1])
        seconds = (int(fields[11]) + int(fields[12])) / tick
        if pid == root or ppid == root:
            total["api"] += seconds
        elif name == "postgres":  # with its exited children (connections that closed)
            total["postgres"] += seconds + (int(fields[13]) + int(fields[14])) / tick
        elif name.startswith("redis-server"):
            total["redis"] += seconds
    return total


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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
    p.add_argument("--submitters", type=int, default=20, help="submitting connections")
    p.add_argument("--submit-rate", type=float, default=20.0,
                   help="submissions/s in total, on a fixed schedule; 0: each submitter "
                        "sends back to back")
    p.add_argument("--workers", type=int, default=2, help="API processes")
    p.add_argument("--port", type=int, default=8791)
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    p.add_argument("--conditional", action="store_true",
                   help="pollers send If-None-Match with the ETag of their last answer")
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
            [sys.executable, "-m", "robustscope.cli", "api", "--host", "127.0.0.1", "--port",
             str(args.port), "--workers", str(args.workers), "--log-level", "warning"], env=env)
        base = f"http://127.0.0.1:{args.port}"
        wait_ready(base, proc)
        headers = {"Authorization": f"Bearer {key}"}
        model_id = upload_model(base, headers)
        body: dict[str, object] = {"model_id": model_id, "dataset": "colored-mnist",
                                   "suite": [{"benchmark": "clean"}]}
        ids = [httpx.post(f"{base}/evaluations", json=body, headers=headers).json()["id"]
               for _ in range(50)]
        cpu_before, own_before = cpu_seconds(proc.pid), own_cpu_seconds()
        polled, submitted = uvloop.run(run_load(args.port, key, args, ids, body))
        cpu_after, own = cpu_seconds(proc.pid), own_cpu_seconds() - own_before
        cpu = cpu_after["api"] - cpu_before["api"]
        servers = {k: cpu_after[k] - cpu_before[k] for k in ("postgres", "redis")}
        answered = len(polled.latencies) + len(submitted.latencies)
        print(f"{args.duration:.0f} s, target {args.rate:.0f} polls/s over {args.pollers} "
              f"connections{' (conditional GET)' if args.conditional else ''}, "
              f"{args.submitters} submitters "
              f"({f'{args.submit_rate:.0f}/s' if args.submit_rate else 'back to back'}), "
              f"{args.workers} API processes, "
              f"{os.cpu_count()} CPUs")
        print(polled.line("poll GET /evaluations/{id}"))
        print(submitted.line("submit POST /evaluations"))
        print(f"API processes: {cpu:.1f} CPU-seconds for {answered} requests, "
              f"{1000 * cpu / max(answered, 1):.2f} ms of CPU per request")
        print(f"load generator: {own:.1f} CPU-seconds, "
              f"{1000 * own / max(answered, 1):.2f} ms per request")
        print(f"PostgreSQL: {servers['postgres']:.1f} CPU-seconds, Redis: "
              f"{servers['redis']:.1f} CPU-seconds (all of each server's processes)")
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
    from importlib import resources

    table = json.loads(resources.files("service.models").joinpath("architectures.json")
                       .read_text())
    return {k: [2 if d == "K" else 3 if d == "C" else int(d) for d in shape]
            for k, shape in table[ARCHITECTURE].items()}


if __name__ == "__main__":
    sys.exit(main())
