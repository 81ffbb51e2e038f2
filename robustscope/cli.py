"""The ``robustscope`` command: run the service's parts, manage keys, evaluate from a pipeline."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from robustscope import client, reproduce


def _settings_env(data_dir: str | None) -> None:
    if data_dir:
        os.environ["ROBUSTSCOPE_DATA_DIR"] = data_dir


def cmd_migrate(args: argparse.Namespace) -> int:
    from core.migrate import upgrade
    from core.settings import get_settings

    upgrade(get_settings().database_url, args.revision)
    print(f"database at {args.revision}")
    return 0


def cmd_apikey(args: argparse.Namespace) -> int:
    from core.db import make_engine, make_sessionmaker, transaction
    from core.keys import create_key, webhook_secret
    from core.settings import get_settings
    from core.webhook_policy import standard_secret

    engine = make_engine(get_settings().database_url)
    with transaction(make_sessionmaker(engine)) as session:
        key = create_key(session, args.owner, name=args.name)
        session.flush()
        secret = webhook_secret(session, args.owner)
    print(key)
    print(f"webhook signing secret for {args.owner} (unless the deployment sets "
          f"ROBUSTSCOPE_WEBHOOK_SIGNING_SECRET): {standard_secret(secret or '')}",
          file=sys.stderr)
    return 0


def cmd_apikey_list(args: argparse.Namespace) -> int:
    from core.db import make_engine, make_sessionmaker
    from core.keys import list_keys
    from core.settings import get_settings

    engine = make_engine(get_settings().database_url)
    with make_sessionmaker(engine)() as session:
        rows = list_keys(session, args.owner)
    for row in rows:
        state = f"revoked {row.revoked_at.isoformat()}" if row.revoked_at else "active"
        print(f"{row.prefix}\t{row.created_at.isoformat()}\t{state}\t{row.name or ''}")
    return 0


def cmd_apikey_revoke(args: argparse.Namespace) -> int:
    from core.db import make_engine, make_sessionmaker, transaction
    from core.errors import NotFound
    from core.keys import key_prefix, revoke
    from core.settings import get_settings

    # A whole key or its prefix (the second part of rs_<prefix>_<secret>, as listed).
    prefix = key_prefix(args.key) if args.key.startswith("rs_") else args.key
    engine = make_engine(get_settings().database_url)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            row = revoke(session, prefix)
    except NotFound as exc:
        print(f"robustscope: {exc.detail}", file=sys.stderr)
        return 1
    print(f"revoked key {row.prefix} of {row.owner}")
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    """One process per core is the production default: the API is CPU-bound Python, so one
    process saturates one core. Each process opens at most ``DB_POOL_SIZE`` +
    ``DB_MAX_OVERFLOW`` + ``DB_POLL_CONNECTIONS`` (5 + 5 + 5) database connections: processes
    times that must stay under PostgreSQL's ``max_connections`` (100 by default), with room
    left for the workers."""
    import uvicorn

    workers = args.workers or int(os.environ.get("ROBUSTSCOPE_API_WORKERS", "0")) or (
        os.cpu_count() or 1)
    uvicorn.run("service.app:create_app", factory=True, host=args.host, port=args.port,
                workers=workers, log_level=args.log_level, access_log=False,
                http="service.http.connections:GuardedHTTP")
    return 0


def _sandbox_refused() -> str | None:
    """Why this machine cannot run models in the sandbox, or None where it can (or where
    ``ROBUSTSCOPE_SANDBOX=off`` says not to)."""
    from core.settings import get_settings

    cfg = get_settings()
    if cfg.sandbox == "off":
        print("robustscope: ROBUSTSCOPE_SANDBOX=off: uploaded models run inside the worker "
              "process, with its secrets and files (a single trusted user only)",
              file=sys.stderr)
        return None
    # The probe runs the real engine child in a jail, end to end (import torch, load a tiny
    # model, answer), in the worker's code and a process of its own: this module never
    # imports workers/.
    env = {**os.environ, "ROBUSTSCOPE_DATA_DIR": str(cfg.data_dir), "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, "-m", "workers.sandbox.jail"], env=env,
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
        reason = "\n".join(lines)[-1500:] if lines else f"the probe exited {res.returncode}"
        return (f"robustscope: the worker cannot build its sandbox ({reason}); it refuses to "
                "run uploaded models without one. Set ROBUSTSCOPE_SANDBOX=off only for a "
                "single trusted user.")
    if res.stdout.strip():
        print(f"robustscope: {res.stdout.strip()}", file=sys.stderr)
    return None


def cmd_worker(args: argparse.Namespace) -> int:
    """Become a Celery worker (exec: same pid, signals go straight to Celery).

    The worker code lives in ``workers/``, which imports torch; this module never imports it.
    """
    refused = _sandbox_refused()
    if refused:
        print(refused, file=sys.stderr)
        return 2
    if args.device:
        os.environ["ROBUSTSCOPE_DEVICE"] = args.device
    node = node_name(args.name)
    if args.name:  # the job records say which worker ran them
        os.environ["ROBUSTSCOPE_WORKER_NAME"] = node
    os.environ["ROBUSTSCOPE_WORKER_QUEUES"] = args.queues
    argv = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
            f"--pool={args.pool}", "--concurrency=1", "-Q", args.queues, "--loglevel=INFO",
            "-n", node, "--without-gossip", "--without-mingle"]
    os.execv(sys.executable, argv)


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}(@[A-Za-z0-9][A-Za-z0-9.-]{0,99})?$")


def node_name(name: str | None) -> str:
    """The Celery node name: ``NAME@host`` (NAME as given where it names a host), else
    ``robustscope-<pid>@host``."""
    if not name:
        return f"robustscope-{os.getpid()}@{socket.gethostname()}"
    if not _NAME.match(name):
        raise SystemExit(f"robustscope: --name {name!r}: letters, digits, '.', '_' and '-' "
                         "(up to 100), optionally @host")
    return name if "@" in name else f"{name}@{socket.gethostname()}"


def _local_key(data_dir: Path) -> str:
    """The key ``robustscope up`` prints: created once, kept in the data directory (0600)."""
    from core.db import make_engine, make_sessionmaker, transaction
    from core.keys import create_key, ensure_key
    from core.settings import get_settings

    path = data_dir / "local-api-key"
    engine = make_engine(get_settings().database_url)
    with transaction(make_sessionmaker(engine)) as session:
        if path.exists():
            key = path.read_text().strip()
            ensure_key(session, "local", key)
        else:
            key = create_key(session, "local")
            path.touch(mode=0o600)
            path.write_text(key + "\n")
    engine.dispose()
    return key


@dataclass
class _Worker:
    """One worker process of ``robustscope up``: its queues, its log, and where that log stood
    when it started (the ready line is looked for after it)."""

    name: str
    queues: str
    what: str  # what starts once it is ready, for the message
    node: str  # its Celery node name (its ready line names it)
    proc: subprocess.Popen[bytes]
    log: Path
    offset: int
    started: float


def up_workers(count: int, cores: int) -> list[tuple[str, str, str, int]]:
    """``robustscope up``'s worker processes: ``count`` for evaluations and trainings (their
    jobs' threads split the cores between them; one keeps PyTorch's default) and one for
    dataset ingests, so an upload never waits behind a training. Each: name, queues, what it
    starts, threads (0: the default)."""
    threads = 0 if count == 1 else max(1, cores // count)
    jobs = [("worker" if count == 1 else f"worker-{i + 1}", "evaluations,webhooks",
             "evaluations and trainings", threads) for i in range(count)]
    return [*jobs, ("ingest", "ingest", "dataset ingests", 0)]


def _start_workers(data_dir: Path, count: int) -> list[_Worker]:
    workers = []
    for name, queues, what, threads in up_workers(count, os.cpu_count() or 1):
        log_path = data_dir / f"{name}.log"
        node = node_name(name)
        env = {**os.environ, **({"ROBUSTSCOPE_THREADS": str(threads)} if threads else {})}
        with log_path.open("ab") as log:
            offset = log.tell()
            proc = subprocess.Popen(
                [sys.executable, "-m", "robustscope.cli", "worker", "--queues", queues,
                 "--name", node], stdout=log, stderr=subprocess.STDOUT, env=env)
        workers.append(_Worker(name, queues, what, node, proc, log_path, offset,
                               time.monotonic()))
    return workers


async def _announce_ready(w: _Worker) -> None:
    """Prints when ``w`` is ready to take jobs (Celery logs ``<node name> ready.``), or that
    it exited."""
    mark = f"{w.node} ready."
    while True:
        with w.log.open("rb") as f:
            f.seek(w.offset)
            text = f.read().decode("utf-8", "replace")
        if any(line.rstrip().endswith(mark) for line in text.splitlines()):
            print(f"{w.name} ready after {time.monotonic() - w.started:.0f} s: {w.what} "
                  "start now", flush=True)
            return
        if w.proc.poll() is not None:
            print(f"robustscope: the {w.name} process exited with status {w.proc.returncode} "
                  f"before it was ready; see {w.log}", file=sys.stderr, flush=True)
            return
        await asyncio.sleep(0.25)


def cmd_up(args: argparse.Namespace) -> int:
    """The embedded shape: SQLite, the SQLAlchemy broker, the worker processes, the API."""
    import uvicorn

    from core.migrate import upgrade
    from core.settings import get_settings
    from service.app import create_app

    for var in ("ROBUSTSCOPE_DATABASE_URL", "ROBUSTSCOPE_BROKER_URL"):
        os.environ.pop(var, None)
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    os.environ["ROBUSTSCOPE_DATA_DIR"] = str(data_dir)
    get_settings.cache_clear()
    settings = get_settings()
    refused = _sandbox_refused()
    if refused:
        print(refused, file=sys.stderr)
        return 2
    upgrade(settings.database_url)
    key = _local_key(data_dir)
    workers = _start_workers(data_dir, args.workers)
    config = uvicorn.Config(create_app(settings), host=args.host, port=args.port,
                            log_level="warning", http="service.http.connections:GuardedHTTP")
    server = uvicorn.Server(config)

    async def serve() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        watchers = []
        if server.started:
            print(f"robustscope is up at http://{args.host}:{args.port}", flush=True)
            print(f"API key (owner 'local'): {key}", flush=True)
            print(f"data: {data_dir}   worker logs: "
                  f"{', '.join(str(w.log) for w in workers)}", flush=True)
            print("the workers are starting (PyTorch, the sandbox check): jobs posted now "
                  "wait in the queue until a worker says it is ready", flush=True)
            watchers = [asyncio.create_task(_announce_ready(w)) for w in workers]
        await task
        for watcher in watchers:
            watcher.cancel()

    def stop(*_: object) -> None:
        server.should_exit = True

    signal.signal(signal.SIGTERM, stop)
    try:
        asyncio.run(serve())
    finally:
        for w in workers:
            w.proc.terminate()
        for w in workers:
            try:
                w.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                w.proc.kill()
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    try:
        return client.evaluate(
            server=args.server, api_key=args.api_key, checkpoint=args.checkpoint,
            metadata_file=Path(args.metadata), dataset=args.dataset, suite=args.suite,
            seed=args.seed, public=args.public, do_wait=args.wait, thresholds=args.min,
            interval=args.interval, n_examples=args.n_examples, split=args.split,
            params=args.dataset_params,
            gating=client.Gate(baseline=args.baseline, max_drops=args.max_drop,
                               fmt=args.format, output=args.output and Path(args.output),
                               mlflow_run=args.mlflow_run))
    except client.ClientError as exc:
        print(f"robustscope: {exc}", file=sys.stderr)
        return exc.code


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


EVALUATE_ENVIRONMENT = """\
environment:
  ROBUSTSCOPE_SERVER      the service's address (--server)
  ROBUSTSCOPE_API_KEY     the API key (--api-key)
  MLFLOW_TRACKING_URI     the MLflow tracking server, for --mlflow-run and models:/ checkpoints
  MLFLOW_RUN_ID           log to this run (as --mlflow-run)
  MLFLOW_EXPERIMENT_NAME, MLFLOW_EXPERIMENT_ID
                          without a run: log to a new run in this experiment

exit codes: 0 passed, 1 the evaluation failed, 2 usage, 3 a gate failed, 4 the server refused
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robustscope", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser(
        "up", help="start the embedded service: API, workers, SQLite, broker",
        description="Start robustscope on this machine with no servers to install: migrate a "
                    "SQLite database in the data folder, start worker processes on an "
                    "embedded broker (--workers for evaluations and trainings, one for dataset "
                    "ingests, so an upload never waits behind a training), serve the API, and "
                    "print its address, an API key for the owner 'local' and when each worker "
                    "is ready. Stop it with Ctrl-C.")
    up.add_argument("--host", default="127.0.0.1",
                    help="address the API listens on (default: %(default)s, this machine only; "
                         "0.0.0.0 for every interface)")
    up.add_argument("--port", type=int, default=8000,
                    help="port the API listens on (default: %(default)s)")
    up.add_argument("--data-dir", default=os.environ.get("ROBUSTSCOPE_DATA_DIR", "var"),
                    help="folder for the database, the broker, checkpoints, datasets, results, "
                         "the API key and the worker logs; created if missing (default: "
                         "$ROBUSTSCOPE_DATA_DIR, else ./var)")
    up.add_argument("--workers", type=positive, default=1,
                    help="worker processes for evaluations and trainings, their threads split "
                         "between them (default: %(default)s); dataset ingests have one more")
    up.set_defaults(fn=cmd_up)

    api = sub.add_parser("api", help="run the API server (production shape)")
    api.add_argument("--host", default="0.0.0.0")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=0,
                     help="API processes (default: ROBUSTSCOPE_API_WORKERS, else one per core)")
    api.add_argument("--log-level", default="info")
    api.set_defaults(fn=cmd_api)

    worker = sub.add_parser("worker", help="run a worker (one per GPU)")
    worker.add_argument("--queues", default="evaluations,webhooks,ingest")
    worker.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: auto)")
    worker.add_argument("--pool", default="solo", choices=("solo", "prefork", "threads"))
    worker.add_argument("--name", default=None,
                        help="the worker's name (its Celery node name, NAME@host unless it "
                             "names a host), shown in the job records it runs (default: "
                             "robustscope-<pid>@host)")
    worker.set_defaults(fn=cmd_worker)

    mig = sub.add_parser("migrate", help="upgrade the database schema")
    mig.add_argument("--revision", default="head")
    mig.set_defaults(fn=cmd_migrate)

    key = sub.add_parser("apikey", help="manage API keys")
    key_sub = key.add_subparsers(dest="action", required=True)
    create = key_sub.add_parser("create", help="create a key for OWNER and print it")
    create.add_argument("owner")
    create.add_argument("--name", default=None, help="a label shown by 'apikey list'")
    create.set_defaults(fn=cmd_apikey)
    listing = key_sub.add_parser("list", help="list OWNER's keys (prefix, created, state)")
    listing.add_argument("owner")
    listing.set_defaults(fn=cmd_apikey_list)
    rev = key_sub.add_parser("revoke", help="revoke a key, given whole or by its prefix")
    rev.add_argument("key")
    rev.set_defaults(fn=cmd_apikey_revoke)

    ev = sub.add_parser(
        "evaluate", help="submit a checkpoint and (with --wait) gate on results",
        description=client.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EVALUATE_ENVIRONMENT)
    ev.add_argument("checkpoint", help="a checkpoint file (safetensors, TorchScript, "
                    "torch.export), or models:/NAME/VERSION of an MLflow registry")
    ev.add_argument("--metadata", required=True, help="model metadata JSON/YAML file")
    ev.add_argument("--dataset", required=True)
    ev.add_argument("--suite", default="standard",
                    help="suite JSON/YAML file or a preset name (default: standard, which runs "
                         "AutoAttack: slow on a CPU; a CI gate names a small suite)")
    ev.add_argument("--split", help="the split to measure on (default: test)")
    ev.add_argument("--n-examples", type=int, metavar="N",
                    help="measure on N examples of the split, drawn from --seed (the same N "
                         "and seed give the same examples, so a baseline compares one by one)")
    ev.add_argument("--dataset-params", metavar="JSON|FILE",
                    help="a built-in dataset's generator parameters, e.g. "
                         "'{\"correlation\": 0.8}'")
    ev.add_argument("--server", default=os.environ.get("ROBUSTSCOPE_SERVER",
                                                       "http://127.0.0.1:8000"),
                    help="the service (default: $ROBUSTSCOPE_SERVER, else "
                         "http://127.0.0.1:8000)")
    ev.add_argument("--api-key", default=os.environ.get("ROBUSTSCOPE_API_KEY"),
                    help="the API key (default: $ROBUSTSCOPE_API_KEY)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--public", action="store_true")
    ev.add_argument("--wait", action="store_true", help="follow progress; print the results")
    ev.add_argument("--min", action="append", default=[],
                    metavar="[BENCHMARK.]METRIC[@KEY=VALUE,...]=MINIMUM",
                    help="fail (exit 3) unless every result row this selects reaches MINIMUM; "
                         "a bare METRIC must belong to one benchmark only; repeatable")
    ev.add_argument("--baseline", metavar="EVALUATION_ID|model:NAME",
                    help="compare with this evaluation on the same examples (model:NAME: the "
                         "newest succeeded one of that model with the same dataset, suite, "
                         "split, seed and --n-examples)")
    ev.add_argument("--max-drop", action="append", default=[],
                    metavar="[BENCHMARK.]METRIC[@KEY=VALUE,...]=DROP",
                    help="fail (exit 3) when a selected metric is worse than the baseline's "
                         "by more than DROP and McNemar's exact test gives p < 0.05; "
                         "repeatable; needs --baseline")
    ev.add_argument("--format", choices=("text", "json", "junit"), default="text",
                    help="text (tables), json (the evaluation record with the comparison and "
                         "the gate) or junit (XML: one test case per threshold and drop limit)")
    ev.add_argument("--output", metavar="FILE", help="write the --format output here, not to "
                    "standard output")
    ev.add_argument("--mlflow-run", metavar="RUN_ID",
                    help="log the results, suite, report and record to this MLflow run "
                         "(default: $MLFLOW_RUN_ID; the mlflow extra)")
    ev.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    ev.set_defaults(fn=cmd_evaluate)

    rep = sub.add_parser("reproduce", help="run the paper's trade-off through the API and "
                         "print its tables (docs/REPRODUCTION.md)")
    rep.add_argument("--scale", default="default", choices=("tiny", "small", "default", "paper"))
    rep.add_argument("--correlation", type=float, default=None,
                     help="train background correlation (default: the scale's)")
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument("--server", default=os.environ.get("ROBUSTSCOPE_SERVER",
                                                        "http://127.0.0.1:8000"))
    rep.add_argument("--api-key", default=os.environ.get("ROBUSTSCOPE_API_KEY"))
    rep.set_defaults(fn=lambda a: reproduce.main(a.server, a.api_key, a.scale, a.seed,
                                                 a.correlation))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.fn(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
