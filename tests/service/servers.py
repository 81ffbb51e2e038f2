"""A real uvicorn server in a thread, for tests that need sockets (keep-alive, chunked bodies),
the memory of this process (which serves it), and a private PostgreSQL cluster that a test may
stop (never the shared one)."""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def serve(app: FastAPI) -> Iterator[int]:
    with serve_asgi(app, lifespan="on") as port:
        yield port


@contextmanager
def serve_asgi(app: Any, http: type[asyncio.Protocol] | str = "auto",
               lifespan: Literal["on", "off"] = "off") -> Iterator[int]:
    """Any ASGI app served by uvicorn in a thread, with the HTTP protocol ``http``."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=http,
                                           log_level="warning", lifespan=lifespan))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def rss() -> int:
    """This process's resident memory in bytes (the server of :func:`serve` runs in it)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


class PrivateCluster:
    """``initdb`` into a temporary directory and ``pg_ctl`` on a free port, as ``postgres``."""

    def __init__(self) -> None:
        bin_dir = pg_bin()
        if bin_dir is None or shutil.which("runuser") is None or os.geteuid() != 0:
            raise RuntimeError("needs PostgreSQL server binaries and root (to run as postgres)")
        self.bin = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="rs-pg-"))
        shutil.chown(self.dir, "postgres")
        self.port = free_port()
        self._as_postgres("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres")

    def _as_postgres(self, tool: str, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / tool), *args],
                       check=True, capture_output=True, timeout=120)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self._as_postgres("pg_ctl", "-D", str(self.dir / "data"), "-w", "-l",
                          str(self.dir / "log"), "-o",
                          f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1",
                          "start")

    def stop(self) -> None:
        self._as_postgres("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w",
                          "stop")

    def remove(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)
