"""Slow connections against ``robustscope api``: how long the server holds them, and whether a
normal request is still answered meanwhile.

    uv run python benchmarks/slow_connections.py [--connections 1000] [--header-timeout 10]
        [--body-timeout 10] [--interval 1.0] [--max-connections 1000]

It starts ``robustscope api`` (one process, SQLite in a temporary directory, a bootstrap key)
and opens ``--connections`` connections on loopback, all at once: half send a request head one
byte every ``--interval`` seconds and never finish it; the other half send a whole head of an
authenticated ``POST /evaluations`` announcing a 1 MB JSON body, then the body one byte every
``--interval`` seconds. While they trickle, a normal ``GET /health`` is sent every second on a
connection of its own. It prints, per kind, how many connections the server closed and the
longest any was held (from its first byte), and the latency of the normal requests.

The same client code serves ``tests/service/test_connections.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEY = "rs_slowbench_0123456789abcdef"


@dataclass
class Held:
    kind: str  # "head", "body" or "idle"
    opened: float  # monotonic seconds
    closed: float | None  # when the server closed it; None: still open at the end
    answer: bytes  # what the server sent before closing

    @property
    def seconds(self) -> float | None:
        return None if self.closed is None else self.closed - self.opened


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def api_server(env: dict[str, str], database_url: str | None = None) -> Iterator[int]:
    """``robustscope api`` in a subprocess (one process) on a free port, with ``env`` (names
    without the ``ROBUSTSCOPE_`` prefix) and a bootstrap key :data:`KEY`; yields the port."""
    work = Path(tempfile.mkdtemp(prefix="rs-slow-"))
    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTSCOPE_")}
    full |= {"PYTHONUNBUFFERED": "1", "ROBUSTSCOPE_DATA_DIR": str(work / "var"),
             "ROBUSTSCOPE_BOOTSTRAP_KEY": KEY}
    if database_url is None:
        from core.migrate import upgrade

        database_url = f"sqlite:///{work / 'robustscope.db'}"
        upgrade(database_url)
    full["ROBUSTSCOPE_DATABASE_URL"] = database_url
    full |= {f"ROBUSTSCOPE_{k}": v for k, v in env.items()}
    log = (work / "api.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "robustscope.cli", "api", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--log-level", "warning"],
        cwd=ROOT, env=full, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                    if s.recv(100).startswith(b"HTTP/1.1 200"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("robustscope api did not start:\n"
                                   + (work / "api.log").read_text())
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def _opening(kind: str, body_bytes: int) -> bytes:
    if kind == "head":
        return b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n"
    if kind == "body":
        return (b"POST /evaluations HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                b"authorization: Bearer " + KEY.encode() + b"\r\n"
                b"content-type: application/json\r\n"
                b"content-length: " + str(body_bytes).encode() + b"\r\n\r\n")
    return b""


async def _one(port: int, kind: str, interval: float, until: float, body_bytes: int) -> Held:
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    opened = loop.time()
    answer = bytearray()
    closed: float | None = None

    async def read() -> None:
        nonlocal closed
        try:
            while True:
                chunk = await reader.read(4096)
                if not chunk:
                    break
                answer.extend(chunk)
        except OSError:
            pass
        closed = loop.time()

    reading = asyncio.create_task(read())
    try:
        first = _opening(kind, body_bytes)
        if first:
            writer.write(first)
        trickle = b"x-slow: " if kind == "head" else b"{" + b" " * body_bytes
        i = 0
        while closed is None and loop.time() < until and kind != "idle":
            await asyncio.sleep(interval)
            if closed is not None:
                break
            writer.write(trickle[i % len(trickle):i % len(trickle) + 1])
            i += 1
            try:
                await writer.drain()
            except OSError:
                break
        remaining = until - loop.time()
        if closed is None and remaining > 0:
            await asyncio.wait([reading], timeout=remaining)
    finally:
        reading.cancel()
        writer.close()
    return Held(kind, opened, closed, bytes(answer))


async def slow_clients(port: int, counts: dict[str, int], interval: float, hold: float,
                       body_bytes: int = 1 << 20) -> list[Held]:
    """Opens ``counts[kind]`` connections of each kind at once and trickles on each for at most
    ``hold`` seconds; returns when every one is closed by the server or ``hold`` has passed."""
    until = asyncio.get_running_loop().time() + hold
    jobs = [_one(port, kind, interval, until, body_bytes)
            for kind, n in counts.items() for _ in range(n)]
    return list(await asyncio.gather(*jobs))


async def get_health(port: int) -> tuple[int, float]:
    """One ``GET /health`` on a new connection: (status, seconds)."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        data = await reader.read()
    finally:
        writer.close()
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, loop.time() - began


async def _run(port: int, args: argparse.Namespace) -> None:
    half = args.connections // 2
    attack = asyncio.create_task(slow_clients(
        port, {"head": half, "body": args.connections - half}, args.interval,
        hold=max(args.header_timeout, args.body_timeout) * 2 + 10))
    polls: list[tuple[int, float]] = []
    while not attack.done():
        await asyncio.sleep(1.0)
        began = time.monotonic()
        try:
            polls.append(await asyncio.wait_for(get_health(port), 30))
        except (OSError, TimeoutError):
            polls.append((0, time.monotonic() - began))
    held = attack.result()
    print(f"{args.connections} slow connections, one byte every {args.interval} s; "
          f"API_HEADER_TIMEOUT={args.header_timeout}, API_BODY_TIMEOUT={args.body_timeout}, "
          f"API_MAX_CONNECTIONS={args.max_connections}")
    print("| kind | connections | closed by the server | held p50 (s) | held max (s) |")
    print("|---|---|---|---|---|")
    for kind in ("head", "body"):
        rows = [h for h in held if h.kind == kind]
        times = sorted(h.seconds for h in rows if h.seconds is not None)
        p50 = times[len(times) // 2] if times else float("nan")
        most = times[-1] if times else float("nan")
        print(f"| {kind} | {len(rows)} | {len(times)} | {p50:.2f} | {most:.2f} |")
    by_status: dict[int, list[float]] = {}
    for status, seconds in polls:
        by_status.setdefault(status, []).append(seconds)
    print(f"normal GET /health meanwhile, one a second ({len(polls)}): " + "; ".join(
        f"{'no answer' if status == 0 else status}: {len(times)}, slowest "
        f"{max(times) * 1000:.0f} ms" for status, times in sorted(by_status.items())))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--header-timeout", type=float, default=10.0)
    p.add_argument("--body-timeout", type=float, default=10.0)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--max-connections", type=int, default=1000)
    args = p.parse_args()
    env = {"API_HEADER_TIMEOUT": str(args.header_timeout),
           "API_BODY_TIMEOUT": str(args.body_timeout),
           "API_MAX_CONNECTIONS": str(args.max_connections)}
    with api_server(env) as port:
        asyncio.run(_run(port, args))


if __name__ == "__main__":
    main()
